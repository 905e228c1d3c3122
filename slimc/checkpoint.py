"""Safetensors checkpoints written tensor by tensor, in one file or in shards with model.safetensors.index.json.

The layout (which tensor goes in which file, at which offset) is fixed up front from the names, shapes and
dtypes alone, so a streamed compile writes each pruned block into its place as soon as the block is done,
never holding the whole model, and a resumed compile reopens the same files. Both compile paths write through
here, so a streamed and an in-memory compile of the same model give the same bytes."""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SlimcError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
METADATA = {"format": "pt"}  # transformers refuses safetensors without it
# safetensors' dtype names
DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
               torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL", torch.float64: "F64"}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Shard:
    file: str
    entries: list  # [Entry], in file order
    offsets: dict  # name -> (begin, end) within the data section
    header: bytes  # 8-byte length + JSON header, padded to 8 bytes

    @property
    def size(self) -> int:
        return len(self.header) + sum(e - b for b, e in self.offsets.values())


def state_entries(model: torch.nn.Module, float_dtype: torch.dtype | None = None) -> list[Entry]:
    """The tensors a checkpoint of `model` holds, in state-dict order; a tied lm_head is stored once.
    `float_dtype`: what floating tensors will be stored as (a meta skeleton's are fp32; index sets stay int)."""
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    return [Entry(k, tuple(v.shape), float_dtype if float_dtype and v.is_floating_point() else v.dtype)
            for k, v in model.state_dict().items() if k not in tied]


def plan_shards(entries: list[Entry], max_shard_bytes: int | None) -> list[Shard]:
    """Fill shards in order up to max_shard_bytes (a tensor larger than that gets a shard of its own), as
    transformers' save_pretrained does; None: one file."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if max_shard_bytes and groups[-1] and size + e.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    n = len(groups)
    shards = []
    for k, group in enumerate(groups):
        name = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        offsets, pos, header = {}, 0, {"__metadata__": METADATA}
        for e in group:
            offsets[e.name] = (pos, pos + e.nbytes)
            header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [pos, pos + e.nbytes]}
            pos += e.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        shards.append(Shard(name, group, offsets, struct.pack("<Q", len(text)) + text))
    return shards


class CheckpointWriter:
    """Writes tensors into their planned places. `resume=True` reopens files a killed compile left, keeping
    the tensors already in them (whoever resumes knows which those are)."""

    def __init__(self, directory: Path, entries: list[Entry], max_shard_bytes: int | None = None, resume: bool = False):
        self.directory = Path(directory)
        self.shards = plan_shards(entries, max_shard_bytes)
        self.where = {e.name: (s, e) for s in self.shards for e in s.entries}
        self.written: set[str] = set()
        self.fds = {}
        for s in self.shards:
            path = self.directory / s.file
            if resume:  # the finished blocks' bytes must be there, exactly where this layout puts them
                ok = path.is_file() and path.stat().st_size == s.size
                if ok:
                    with open(path, "rb") as f:
                        ok = f.read(len(s.header)) == s.header
                if not ok:
                    raise SlimcError(f"--resume: {path} is missing or does not hold the checkpoint this compile writes: "
                                     "use --overwrite to start over")
                fd = os.open(path, os.O_RDWR)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.pwrite(fd, s.header, 0)
                os.ftruncate(fd, s.size)  # sparse until written
            self.fds[s.file] = fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where:
            raise RuntimeError(f"{name} is not in the checkpoint's layout")
        shard, entry = self.where[name]
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RuntimeError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the layout has {entry.shape} {entry.dtype}")
        data = tensor.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()
        begin = len(shard.header) + shard.offsets[name][0]
        view = memoryview(data)
        while view:  # pwrite may write less than asked
            n = os.pwrite(self.fds[shard.file], view, begin)
            view, begin = view[n:], begin + n
        self.written.add(name)

    def close(self, expect_all: bool = True) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
        missing = [n for n in self.where if n not in self.written]
        if expect_all and missing:
            raise RuntimeError(f"checkpoint incomplete: {missing[:5]} never written")
        if expect_all and len(self.shards) > 1:
            index = {"metadata": {"total_size": sum(e.nbytes for _, e in self.where.values())},
                     "weight_map": {n: s.file for n, (s, _) in sorted(self.where.items())}}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def files(self) -> list[str]:
        return [s.file for s in self.shards] + ([INDEX_FILE] if len(self.shards) > 1 else [])


def write_state(model: torch.nn.Module, directory: Path, max_shard_bytes: int | None = None) -> None:
    """The in-memory path: every tensor of `model` through the same layout a streamed compile uses."""
    state = model.state_dict()
    writer = CheckpointWriter(directory, state_entries(model), max_shard_bytes)
    for name in writer.where:
        writer.write(name, state[name])
    writer.close()
