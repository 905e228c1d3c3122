"""`--target onnx`: one ONNX decoder with per-layer KV-cache inputs/outputs for onnxruntime.

The graph comes from torch.export (torch.onnx dynamo exporter) of a thin wrapper around the materialized
model: flat `past.{i}.key/value` tensors in (each layer with its own KV-head count), logits and
`present.{i}.key/value` out. Batch, sequence, past and total lengths are dynamic; prefill is the same model
fed past tensors of length 0 (one graph, no duplicated weights). A parity check against torch runs right
after export and its result is stored in io.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from slimc.compat import with_cache
from slimc.errors import SlimcError
from slimc.layout import global_head_dim, layer_layouts

ONNX_DIR = "onnx"
ONNX_FILE = "model.onnx"
IO_FILE = "io.json"
# torch fp32 vs onnxruntime CPU fp32, max |difference| of every output over max(1, max |torch output|):
# fp32 sums in another order drift with depth and magnitude (seen: tiny models ~1e-7, SmolLM2 pruned by
# 50 % 8e-5 absolute on logits of magnitude ~30, 2.5e-6 relative); a wrong graph is off by O(1).
PARITY_RTOL = 1e-4


def kv_layout(config) -> list[int]:
    return [layout.num_key_value_heads for layout in layer_layouts(config)]


def head_dim(config) -> int:
    return global_head_dim(config)


class _DecoderWithCache(nn.Module):
    """(input_ids, attention_mask, position_ids, *past) -> (logits, *present), cache as flat tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **with_cache(self.model, cache))
        present = []
        for i in range(self.n_layers):
            present += [cache.layers[i].keys, cache.layers[i].values]
        return (out.logits, *present)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{kind}.{i}.{part}" for kind in ("past",) for i in range(n_layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *kv]
    outputs = ["logits", *[name.replace("past", "present") for name in kv]]
    return inputs, outputs


def sample_inputs(config, batch: int, seq: int, past: int, dtype=torch.float32, seed: int = 0) -> tuple:
    """Random decoder inputs; sizes > 1 everywhere so no dynamic axis is specialised to 1 at export."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv = []
    for heads in kv_layout(config):
        kv += [torch.randn(batch, heads, past, head_dim(config), generator=g, dtype=dtype) for _ in range(2)]
    return (ids, mask, pos, *kv)


@torch.no_grad()
def export_onnx(model: nn.Module, out_dir: Path) -> dict:
    """Export `model` to out_dir/onnx/model.onnx and check it against torch; returns the io description."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SlimcError(f"--target onnx needs the optional dependencies onnx, onnxscript and onnxruntime "
                         f"(pip install 'slimc[onnx]'): {e}") from e
    config = model.config
    n = config.num_hidden_layers
    wrapper = _DecoderWithCache(model.float().eval()).eval()  # a fresh Module starts in training mode
    names_in, names_out = io_names(n)
    batch, seq, past, total = (torch.export.Dim(name) for name in ("batch", "sequence", "past", "total"))
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
               "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in range(2 * n))}
    target = out_dir / ONNX_DIR
    target.mkdir(parents=True, exist_ok=True)
    args = sample_inputs(config, batch=2, seq=3, past=5)
    torch.onnx.export(wrapper, args, str(target / ONNX_FILE), dynamo=True, dynamic_shapes=dynamic,
                      input_names=names_in, output_names=names_out, optimize=True, verbose=False)
    io = {
        "format": "slimc.onnx-io/1",
        "file": ONNX_FILE,
        "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "total"],
                   "position_ids": ["batch", "sequence"],
                   **{f"past.{i}.{p}": ["batch", kv, "past", head_dim(config)]
                      for i, kv in enumerate(kv_layout(config)) for p in ("key", "value")}},
        "outputs": {"logits": ["batch", "sequence", config.vocab_size],
                    **{f"present.{i}.{p}": ["batch", kv, "total", head_dim(config)]
                       for i, kv in enumerate(kv_layout(config)) for p in ("key", "value")}},
        "num_layers": n, "kv_heads": kv_layout(config), "head_dim": head_dim(config), "dtype": "float32",
        "usage": "prefill: past.* of length 0, attention_mask of ones over the prompt, position_ids 0..S-1; "
                 "decode: feed present.* back as past.*, extend attention_mask by one, next position id",
    }
    io["parity_max_abs_diff"], io["parity_max_rel_diff"] = check_parity(wrapper, target / ONNX_FILE, config, names_in)
    if io["parity_max_rel_diff"] > PARITY_RTOL:
        raise RuntimeError(f"ONNX export does not match torch: max |diff| {io['parity_max_abs_diff']:.2e} "
                           f"({io['parity_max_rel_diff']:.2e} of the output scale, tolerance {PARITY_RTOL:.0e})")
    (target / IO_FILE).write_text(json.dumps(io, indent=2))
    return io


def max_abs_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max())


def output_scale(ref: torch.Tensor) -> float:
    return max(1.0, float(ref.abs().max()))


def relative_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| over max(1, max |ref|): the scale-aware parity measure of PARITY_RTOL."""
    return max_abs_diff(got, ref) / output_scale(ref)


@torch.no_grad()
def check_parity(wrapper: nn.Module, path: Path, config, names_in: list[str]) -> tuple[float, float]:
    """(max absolute, max relative) difference of all outputs, torch vs onnxruntime, on shapes other than the
    export sample's: a prefill with empty cache, and decodes whose past is the cache torch computed for a
    prefix (random-normal past tensors are out of distribution: they amplify fp32 drift tenfold on a deep
    model and test nothing more)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst_abs = worst_rel = 0.0
    for batch, seq, past in ((3, 4, 7), (1, 9, 0), (1, 1, 12)):
        args = sample_inputs(config, batch, seq, past, seed=batch * 100 + seq)
        if past:
            prefix = sample_inputs(config, batch, past, 0, seed=batch * 100 + seq + 1)
            args = (*args[:3], *wrapper(*prefix)[1:])
        ref = wrapper(*args)
        got = session.run(None, {k: v.numpy() for k, v in zip(names_in, args)})
        for g, r in zip(got, ref):
            diff = max_abs_diff(torch.from_numpy(g), r)
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / output_scale(r))
    return worst_abs, worst_rel
