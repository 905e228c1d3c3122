"""Calibration plumbing: catch the first block's inputs, run one block over all cached samples, and
accumulate H = 2/n X^T X for chosen linears. Only one block is ever worked on at a time; the cached hidden
states live on `cache_device` (CPU when pruning on a GPU), or in files when they exceed the activation budget
(slimc.activations)."""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from . import activations
from .activations import SpillDir
from .compat import CACHE_KWARGS


class _Caught(Exception):
    pass


# The dtype the decoder blocks' matmuls run in while a compile calibrates, reconstructs and distils (None: the
# weights' own). Set once per compile (compute_dtype) rather than passed through every pass: each forward of a
# block goes through forward_precision. Hessians are still accumulated in float32 (from the inputs the blocks
# computed), and OBS itself runs outside these forwards in float32 / float64.
_COMPUTE_DTYPE: ContextVar[torch.dtype | None] = ContextVar("slimc_compute_dtype", default=None)


def bfloat16_is_fast(device) -> bool:
    """Whether `device` runs bfloat16 matmuls natively: a CUDA GPU with bfloat16, or a CPU with AMX tiles (Xeon
    Sapphire Rapids and later: 11 x float32's throughput on an FFN-shaped matmul, BENCHMARKS.md §1).
    Elsewhere bfloat16 is emulated and slower than float32."""
    d = torch.device(device)
    if d.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if d.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def resolve_compute_dtype(name: str, device) -> torch.dtype:
    """--compute-dtype: float32, bfloat16, or auto (bfloat16 where it is native, else float32)."""
    if name == "auto":
        return torch.bfloat16 if bfloat16_is_fast(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


@contextmanager
def compute_dtype(dtype: torch.dtype | None):
    """Inside, forward_precision autocasts the blocks' matmuls to `dtype` (None or float32: no autocast)."""
    token = _COMPUTE_DTYPE.set(None if dtype == torch.float32 else dtype)
    try:
        yield
    finally:
        _COMPUTE_DTYPE.reset(token)


def active_compute_dtype() -> torch.dtype:
    """The compute dtype the current compile runs its forwards in (float32 outside compute_dtype)."""
    return _COMPUTE_DTYPE.get() or torch.float32


def forward_precision(device):
    """The autocast context for a forward (and its backward) of model layers under the current compute dtype."""
    dtype = _COMPUTE_DTYPE.get()
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


@dataclass
class BlockInputs:
    hidden: torch.Tensor  # [n_samples, seq_len, hidden]
    kwargs: dict  # shared keyword inputs of every block (position embeddings, mask, position ids)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


@torch.no_grad()
def catch_block_inputs(model: nn.Module, samples: torch.Tensor, device: torch.device | str = "cpu",
                       cache_device: torch.device | str = "cpu", spill: SpillDir | None = None) -> BlockInputs:
    """Run the model up to its first decoder block for every sample and keep that block's inputs (in RAM on
    `cache_device`, or in a file of `spill`). Samples are run one at a time, so the kwargs (rotary embeddings,
    mask) have batch 1 and broadcast."""
    layer0 = decoder_layers(model)[0]
    seen: dict = {}

    def hook(module, args, kwargs):
        seen["hidden"] = args[0] if args else kwargs["hidden_states"]
        seen["kwargs"] = {k: v for k, v in kwargs.items()
                          if k not in ("hidden_states", *CACHE_KWARGS, "use_cache")}
        raise _Caught

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    hidden = None
    try:
        for i in range(samples.shape[0]):
            try:
                model(samples[i : i + 1].to(device), use_cache=False)
            except _Caught:
                pass
            if hidden is None:  # filled in place: never the stream twice (a list and its concatenation)
                shape, dtype = (samples.shape[0], *seen["hidden"].shape[1:]), seen["hidden"].dtype
                hidden = spill.empty(shape, dtype) if spill else torch.empty(shape, dtype=dtype, device=cache_device)
            hidden[i] = seen["hidden"][0]
            activations.release(hidden, i, i + 1)
    finally:
        handle.remove()
    return BlockInputs(hidden, to_device(seen["kwargs"], device))


class HessianAccumulator:
    """Running H = 2/n sum X^T X of a linear's input, via a forward pre-hook."""

    def __init__(self, linear: nn.Linear):
        n = linear.in_features
        self.H = torch.zeros(n, n, dtype=torch.float64, device=linear.weight.device)
        self.n = 0
        self.handle = linear.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2 / self.n) ** 0.5
        # in float32 even inside a bfloat16 forward: a bfloat16 X^T X rounds every entry of H to 3 digits
        with torch.autocast(x.device.type, enabled=False):
            self.H += (x.T @ x).double()

    def remove(self) -> torch.Tensor:
        self.handle.remove()
        return self.H


class OutputEnergyAccumulator:
    """Running 2/n sum y_j^2 of each output j of a linear (H's units: equals w_j H w_j^T of its input), via a
    forward hook -- what dropping an output row costs, for a fraction of a Hessian's price."""

    def __init__(self, linear: nn.Linear):
        self.energy = torch.zeros(linear.out_features, dtype=torch.float64, device=linear.weight.device)
        self.n = 0
        self.handle = linear.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        y = output.detach().reshape(-1, output.shape[-1]).double()
        m = y.shape[0]
        self.energy *= self.n / (self.n + m)
        self.n += m
        self.energy += 2 / self.n * y.pow(2).sum(0)


@contextmanager
def collect_hessians(block: nn.Module, paths: list[str], output_energies: tuple[str, ...] = ()):
    """H of the inputs of the linears at `paths` (and output energies of those at `output_energies`), keyed by
    path; energies under (path, "energy")."""
    accs = {p: HessianAccumulator(block.get_submodule(p)) for p in paths}
    accs.update({(p, "energy"): OutputEnergyAccumulator(block.get_submodule(p)) for p in output_energies})
    try:
        yield accs
    finally:
        for a in accs.values():
            a.handle.remove()


def _load_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand memory freed by torch back to the OS. glibc keeps freed blocks of a few MB to tens of MB (each batch's
    attention scores and activations) in its heap, so without this a compile's resident set grows by hundreds of
    MB over what is live (SmolLM2, 32 x 512, streamed: peak 1.29 GB without, 1.04 GB with; ~4 % more time)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@torch.no_grad()
def run_batches(fn, hidden: torch.Tensor, batch_size: int, device, keep_outputs: bool = True,
                stop: int | None = None) -> torch.Tensor | None:
    """`fn` over the cached samples [0, stop) in batches; returns its outputs where the inputs are cached (RAM,
    or a new file beside a spilled stream), written in place batch by batch."""
    out, x, y = None, None, None
    n = hidden.shape[0] if stop is None else min(stop, hidden.shape[0])
    for start in range(0, n, batch_size):
        end = min(start + batch_size, n)
        x = hidden[start:end].to(device)
        with forward_precision(device):
            y = fn(x)
        if keep_outputs:
            if out is None:
                out = activations.empty_like(hidden, (n, *y.shape[1:]), y.dtype)
            out[start:end] = y
            activations.release(out, start, end)
        activations.release(hidden, start, end)
    del x, y
    release_freed_memory()
    return out


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def block_output(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block returns (some transformers versions return them in a tuple)."""
    return _first(block(x, **kwargs))


def run_block(block: nn.Module, inputs: BlockInputs, batch_size: int, device, keep_outputs: bool = True,
              stop: int | None = None) -> torch.Tensor | None:
    """Forward the cached samples [0, stop) (all by default) through `block` in batches (see run_batches)."""
    return run_batches(lambda x: block_output(block, x, inputs.kwargs), inputs.hidden, batch_size, device,
                       keep_outputs, stop)


class _Stopped(Exception):
    pass


@contextmanager
def stop_before(module: nn.Module):
    """Inside, a forward that reaches `module` ends there (raising _Stopped); forward pre-hooks registered on it
    earlier -- a HessianAccumulator -- still see its input. Saves computing what nothing reads."""
    def hook(mod, args):
        raise _Stopped

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# the pre-norm residual block of Llama, Mistral and Qwen2/3: h = x + attn(norm1(x)); y = h + mlp(norm2(h))
_HALF_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


@dataclass
class BlockHalves:
    """A decoder block run as its two residual halves, so that calibration runs only the half a statistic needs:
    o_proj's Hessian needs only the attention half, down_proj's only the pruned attention and the MLP up to
    down_proj, and the pruned block's outputs only the MLP half on top of the attention half already run."""
    block: nn.Module
    kwargs: dict

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        return x + _first(b.self_attn(hidden_states=b.input_layernorm(x), **self.kwargs))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        b = self.block
        return h + b.mlp(b.post_attention_layernorm(h))

    def mlp_input_stats(self, h: torch.Tensor, stop_at: nn.Module) -> None:
        """The MLP on h only as far as `stop_at` (down_proj): its pre-hooks see the input, nothing after runs."""
        with stop_before(stop_at):
            try:
                self.block.mlp(self.block.post_attention_layernorm(h))
            except _Stopped:
                pass


@torch.no_grad()
def block_halves(block: nn.Module, inputs: BlockInputs, device) -> BlockHalves | None:
    """The block as two halves if it is the pre-norm residual form, checked on one cached sample against the
    block's own forward; None for any other form (the caller runs the whole block instead)."""
    if not all(isinstance(getattr(block, part, None), nn.Module) for part in _HALF_PARTS):
        return None
    halves = BlockHalves(block, inputs.kwargs)
    x = inputs.hidden[:1].to(device)
    try:
        whole = block_output(block, x, inputs.kwargs)
        same = torch.allclose(halves.mlp(halves.attention(x)), whole, rtol=1e-5, atol=1e-6)
    except Exception:  # a block whose parts take other arguments: not this form
        same = False
    return halves if same else None
