"""A streamed compile's source weights: the model as a skeleton on the meta device, each tensor read from the
checkpoint only when its block is worked on, in fp32, under its transformers name.

Two checkpoint kinds: safetensors (one file or an index of shards; each tensor's bytes read at the offset its
header gives, no memory map) and GGUF (header parsed once with the `gguf` reader, each tensor read at its offset
and dequantized on its own, q/k rows of llama-architecture files put back from llama.cpp's rotary order, as
transformers' GGUF loader does). The values are exactly what `load_model(..., dtype="float32")` holds."""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .checkpoint import DTYPE_NAMES
from .errors import SlimcError
from .load import LoadedModel, SourceConfig, load_tokenizer, read_source_config


SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class TensorReader:
    def get(self, name: str) -> torch.Tensor:  # an fp32 tensor the caller owns
        raise NotImplementedError


class SafetensorsSource:
    """Each tensor's bytes are read from the file at its offset (the header says where), not memory-mapped: a
    mapping keeps every page it touched in the process's resident set until it is closed, so one pass over the
    checkpoint (the fingerprint) held the whole file in memory (8-layer bf16 model: peak 2.9 GB instead of 1 GB)."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            paths = {name: directory / f for name, f in weight_map.items()}
        elif (directory / "model.safetensors").is_file():
            paths = {}
            single = directory / "model.safetensors"
        else:
            raise SlimcError(f"{directory} has no model.safetensors or model.safetensors.index.json: a streamed compile "
                             "reads safetensors or GGUF checkpoints (pass --stream off to load it whole)")
        self.headers = {}  # file -> (header, start of its data section)
        for path in set(paths.values()) or {single}:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            self.headers[path] = (header, 8 + n)
        self.files = paths or {name: single for name in self.headers[single][0]}

    @contextmanager
    def open(self):
        outer = self
        handles: dict = {}

        class Reader(TensorReader):
            def get(self, name: str) -> torch.Tensor:
                path = outer.files.get(name)
                if path is None:
                    raise SlimcError(f"tensor {name} is not in the checkpoint (pass --stream off to load it whole)")
                header, data_start = outer.headers[path]
                info = header[name]
                begin, end = info["data_offsets"]
                f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
                f.seek(data_start + begin)
                raw = bytearray(f.read(end - begin))
                t = torch.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info["dtype"]]) if raw else torch.empty(0)
                return t.reshape(info["shape"]).to(torch.float32, copy=True)

        try:
            yield Reader()
        finally:
            for f in handles.values():
                f.close()


class GGUFSource:
    """The file's header is parsed once (gguf's reader maps the whole file and takes seconds to walk it); after
    that each tensor's bytes are read from its offset and dequantized on their own, no mapping kept."""

    def __init__(self, path: Path, config):
        from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map

        self.path = path
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        self.arch_name = bytes(field.parts[field.data[0]]).decode()
        arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == self.arch_name), None)
        if arch is None:
            raise SlimcError(f"GGUF architecture {self.arch_name!r} is unknown to the installed gguf package")
        self.name_map = get_tensor_name_map(arch, config.num_hidden_layers)
        # where each tensor's bytes are, as the reader would view them: (offset, numpy dtype, count, shape, type)
        self.tensors = {t.name: (int(t.data_offset), t.data.dtype, int(t.data.size), tuple(t.data.shape), t.tensor_type)
                        for t in reader.tensors}
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        del reader

    def _gguf_name(self, name: str) -> str:
        base, _, suffix = name.rpartition(".")
        gguf_name = self.name_map.get_name(base)
        found = f"{gguf_name}.{suffix}" if gguf_name else None
        if found not in self.tensors and name == "lm_head.weight":
            found = "token_embd.weight"  # tied output: llama.cpp stores the embedding once
        if found not in self.tensors:
            raise SlimcError(f"tensor {name} is not in {self.path.name}")
        return found

    @contextmanager
    def open(self):
        import numpy as np
        from gguf.quants import dequantize

        outer = self

        class Reader(TensorReader):
            def get(self, name: str) -> torch.Tensor:
                gguf_name = outer._gguf_name(name)
                offset, dtype, count, shape, kind = outer.tensors[gguf_name]
                f.seek(offset)
                raw = np.fromfile(f, dtype=dtype, count=count).reshape(shape)
                w = dequantize(raw, kind)
                if outer.arch_name == "llama" and gguf_name.endswith(("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                                      "attn_k.bias")):
                    w = unpermute_rotary_rows(w, outer.heads if ".attn_q." in gguf_name else outer.kv_heads)
                return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).copy())

        with open(self.path, "rb") as f:
            yield Reader()


def unpermute_rotary_rows(w, n_heads: int):
    """Undo llama.cpp's conversion of q/k rows: per head, it interleaves the two rotary halves (rows
    0, d/2, 1, d/2+1, ...); transformers' rotary code wants the halves back in order."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def streamable_source(spec: str) -> bool:
    """Whether `--stream auto` streams MODEL: the built-in model, a .gguf file, or a local directory of safetensors
    (a hub id or a directory of .bin files loads whole unless --stream is asked for)."""
    from .load import BUILTIN_MODELS

    if spec in BUILTIN_MODELS:
        return True
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        return p.is_file()
    return p.is_dir() and any((p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))


def open_source(src: SourceConfig):
    if "gguf_file" in src.extra:
        return GGUFSource(Path(src.path) / src.extra["gguf_file"], src.config)
    directory = Path(src.path)
    if not directory.is_dir():  # a hub id: the snapshot on disk (downloaded once, like from_pretrained does)
        try:
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(src.path, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
        except Exception as e:
            raise SlimcError(f"cannot fetch {src.spec} from the hub: {str(e).splitlines()[0]}") from e
    return SafetensorsSource(directory)


def load_skeleton(spec: str) -> LoadedModel:
    """The model with every decoder block (and an untied lm_head) on the meta device, and what the first block's
    inputs need (embeddings, final norm, rotary tables) in fp32."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    src = read_source_config(spec)
    source = open_source(src)
    if "gguf_file" not in src.extra:
        src = read_source_config(str(source_dir(source)))  # a hub id: the snapshot's config from here on
        src.spec = spec
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32, attn_implementation="sdpa")
    layers = model.model.layers
    later = {id(p) for p in layers.parameters()}  # read when needed, like an untied lm_head
    if not src.config.tie_word_embeddings:
        later.add(id(model.lm_head.weight))
    with source.open() as reader, torch.no_grad():
        for name, p in list(model.named_parameters()):
            if id(p) not in later:
                _assign(model, name, reader.get(name))
    if src.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for name, module in model.named_modules():
        if any(b.is_meta for b in module.buffers(recurse=False)) and not name.startswith("model.layers."):
            if not type(module).__name__.endswith("RotaryEmbedding"):
                raise SlimcError(f"cannot stream {spec}: module {name} holds buffers slimc does not know how to rebuild")
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_module(leaf, type(module)(config=model.config))
    try:
        model.generation_config = GenerationConfig.from_pretrained(src.path, **src.extra)
    except Exception:  # no generation_config.json: what from_pretrained derives from the model config
        model.generation_config = GenerationConfig.from_model_config(src.config)
    model.eval()
    return LoadedModel(model, load_tokenizer(src), spec, src.family, src.dtype, source)


def source_dir(source) -> Path:
    return next(iter(source.files.values())).parent


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    parent, _, leaf = name.rpartition(".")
    module = model.get_submodule(parent)
    old = module._parameters[leaf]
    if tuple(old.shape) != tuple(tensor.shape):
        raise SlimcError(f"tensor {name} has shape {tuple(tensor.shape)} in the checkpoint, the config says "
                         f"{tuple(old.shape)}")
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad)


def fetch_block(loaded: LoadedModel, i: int) -> nn.Module:
    """Read block i's weights from the source (fp32) into its skeleton."""
    block = loaded.model.model.layers[i]
    with loaded.source.open() as reader, torch.no_grad():
        for name, _ in list(block.named_parameters()):
            _assign(block, name, reader.get(f"model.layers.{i}.{name}"))
    return block


def release_block(loaded: LoadedModel, i: int) -> None:
    from .calibrate import release_freed_memory

    loaded.model.model.layers[i].to("meta")
    release_freed_memory()


def fetch_rest(loaded: LoadedModel) -> list[str]:
    """Read every parameter still on the meta device (the whole dense model, for a moment); returns their names."""
    names = [name for name, p in loaded.model.named_parameters() if p.is_meta]
    with loaded.source.open() as reader, torch.no_grad():
        for name in names:
            _assign(loaded.model, name, reader.get(name))
    return names


def release(loaded: LoadedModel, names: list[str]) -> None:
    for name in names:
        parent, _, leaf = name.rpartition(".")
        module = loaded.model.get_submodule(parent)
        module._parameters[leaf] = nn.Parameter(module._parameters[leaf].to("meta"), requires_grad=False)
