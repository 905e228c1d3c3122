"""Where the calibration activations live: in RAM while they fit a budget, else in files under --offload-dir.

Each block is calibrated by running every cached sample through it, and its outputs become the next block's
inputs: one [samples, seq_len, hidden] fp32 stream per side, 4.3 GB for 128 x 2048 tokens of an 8B model, two
of them live at once (inputs and outputs), two more when reconstruction or refit keeps the dense model's stream.
Beyond the budget each stream is a file mapped into memory (MAP_SHARED), so the rest of slimc indexes it like
any tensor. The pages a batch touched are handed back once the batch is done (madvise DONTNEED): the data stays
in the file and the page cache, which the kernel may write out and drop, so the process's resident set holds a
batch of each stream rather than the streams. On CUDA the streams stay on the CPU either way; only batches move.

Spilled files are unlinked when their tensor dies, unless a resumable compile pinned them as the state it
continues from (`pin` / `unpin`)."""
from __future__ import annotations

import ctypes
import math
import mmap
import os
import weakref
from itertools import count
from pathlib import Path

import torch

from .errors import SlimcError

MADV_DONTNEED = 4
FILE_PREFIX = "slimc-act-"
DEFAULT_BUDGET_FRACTION = 0.25  # of the machine's RAM, when --activation-budget is not given

_live: dict[int, Path] = {}  # storage address of each spilled tensor alive -> its file
_pinned: set[Path] = set()
_numbers = count()


def _load_madvise():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc.madvise
    except (OSError, AttributeError):  # not glibc: pages are left to the kernel
        return None


_MADVISE = _load_madvise()


def stream_bytes(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    return math.prod(shape) * dtype.itemsize


class SpillDir:
    """A directory of spilled activation streams."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SlimcError(f"--offload-dir {self.directory}: cannot create it ({e.strerror})") from None

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised stream backed by a new file (sparse until written)."""
        path = self.directory / f"{FILE_PREFIX}{os.getpid()}-{next(_numbers):05d}.bin"
        try:
            with open(path, "wb") as f:
                f.truncate(stream_bytes(shape, dtype))
        except OSError as e:
            path.unlink(missing_ok=True)
            raise SlimcError(f"--offload-dir {self.directory}: cannot write activations there ({e.strerror})") from None
        return open_spilled(path, shape, dtype)


def open_spilled(path: Path, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stream held in `path` (written by SpillDir.empty), mapped, not read."""
    numel = math.prod(shape)
    if not path.is_file() or path.stat().st_size != numel * dtype.itemsize:
        raise SlimcError(f"activation file {path} is missing or does not hold a {list(shape)} {dtype} stream")
    flat = torch.from_file(str(path), shared=True, size=numel, dtype=dtype)
    # a tensor of its own over the mapping (not a view), so views taken later keep it -- and its file -- alive
    tensor = torch.empty(0, dtype=dtype).set_(flat.untyped_storage(), 0, shape)
    del flat
    ptr = tensor.untyped_storage().data_ptr()
    _live[ptr] = path
    weakref.finalize(tensor, _forget, ptr, path)
    return tensor


def _forget(ptr: int, path: Path) -> None:
    if _live.get(ptr) == path:
        del _live[ptr]
    if path not in _pinned:
        path.unlink(missing_ok=True)


def spill_path(t: torch.Tensor | None) -> Path | None:
    """The file a spilled stream (or a view of one) lives in; None for a tensor in RAM."""
    if t is None or t.device.type != "cpu":
        return None
    return _live.get(t.untyped_storage().data_ptr())


def empty_like(t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new stream placed where `t` is: a file beside t's when t is spilled, else RAM."""
    path = spill_path(t)
    if path is not None:
        return SpillDir(path.parent).empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=t.device)


def place(t: torch.Tensor | None, spill: SpillDir | None) -> torch.Tensor | None:
    """`t` moved into a spilled stream when the compile spills and it is not spilled yet (a resumed stream)."""
    if t is None or spill is None or spill_path(t) is not None:
        return t
    out = spill.empty(tuple(t.shape), t.dtype)
    for start in range(0, t.shape[0], 8):
        out[start : start + 8] = t[start : start + 8]
        release(out, start, start + 8)
    return out


def release(t: torch.Tensor | None, start: int = 0, stop: int | None = None) -> None:
    """Hand back the resident pages of rows [start, stop) of a spilled stream (a no-op for RAM). The rows' data
    stays in the file; the next read faults it back in from the page cache or the disk."""
    if _MADVISE is None or spill_path(t) is None or not t.is_contiguous() or t.numel() == 0:
        return
    n = t.shape[0]
    stop = n if stop is None else min(stop, n)
    if stop <= start:
        return
    row = t[0].numel() * t.element_size()
    begin, end = t.data_ptr() + start * row, t.data_ptr() + stop * row
    begin = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the range only
    end = end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin:
        _MADVISE(begin, end - begin, MADV_DONTNEED)


def release_all() -> None:
    """Every spilled stream's pages handed back (between blocks: what random-access readers pulled in)."""
    if _MADVISE is None:
        return
    for ptr in list(_live):
        # the storage's own extent: it starts at ptr and is as long as its file
        path = _live.get(ptr)
        if path is not None and path.is_file():
            size = path.stat().st_size // mmap.PAGESIZE * mmap.PAGESIZE
            if size:
                _MADVISE(ptr, size, MADV_DONTNEED)


def pin(path: Path) -> None:
    """Keep `path` when its tensor dies: a resumable compile continues from it."""
    _pinned.add(path)


def unpin(path: Path) -> None:
    """No longer needed to resume: unlinked now if its tensor is gone, else when the tensor dies."""
    _pinned.discard(path)
    if path not in _live.values():
        path.unlink(missing_ok=True)


def choose(shape: tuple[int, ...], streams: int, budget_bytes: int | None, directory: Path) -> SpillDir | None:
    """Spill (a SpillDir) when `streams` activation streams of `shape` would exceed the budget, else None (RAM)."""
    if budget_bytes is None:
        from .stream import memory_total

        budget_bytes = int(memory_total() * DEFAULT_BUDGET_FRACTION)
    return SpillDir(directory) if streams * stream_bytes(shape) > budget_bytes else None
