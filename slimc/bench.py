"""`slimc bench`: pruned vs dense, side by side in one run, on the runtime the model is served with.

Prefill tokens/s at several prompt lengths and decode ms/token at batch 1 and 8; the measurements of the two
models are interleaved rep by rep (shared, noisy machines) and the median is kept. Next to each measured
speedup the FLOP-ideal one (every matmul of the forward at that shape, dense over pruned) and their ratio.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .compat import with_cache
from .errors import SlimcError
from .exporters.onnx import IO_FILE, ONNX_DIR, export_onnx
from .load import model_fingerprint

PROMPTS = (128, 512, 2048)
DECODE_BATCHES = (1, 8)
DECODE_CONTEXT = 128
RUNTIMES = ("onnxruntime", "torch", "vllm")


def forward_macs(config, batch: int, seq: int, past: int) -> int:
    """Multiply-accumulates of every matmul in one forward: q/k/v/o, gate/up/down (each at the hidden dims the
    layer reads / writes: DISP's gathers and scatters count zero), attention scores and context, lm_head (all
    positions' logits, as the exported graph computes them)."""
    from .layout import layer_layouts

    total = 0
    for l in layer_layouts(config):
        q, kv, f, d = l.num_attention_heads, l.num_key_value_heads, l.intermediate_size, l.head_dim
        total += seq * l.attn_in_dims * d * (q + 2 * kv) + seq * q * d * l.attn_out_dims  # projections
        total += 2 * seq * l.mlp_in_dims * f + seq * f * l.mlp_out_dims  # gated MLP
        total += 2 * q * seq * (past + seq) * d  # scores and context
    total += seq * config.hidden_size * config.vocab_size
    return batch * total


def _median_interleaved(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _TorchRunner:
    def __init__(self, model):
        self.model = model.eval()
        self.config = model.config

    @torch.no_grad()
    def prefill(self, batch, seq):
        ids = torch.randint(0, self.config.vocab_size, (batch, seq))
        return lambda: self.model(ids, use_cache=False)

    @torch.no_grad()
    def decode(self, batch, context, steps):
        from transformers import DynamicCache

        ids = torch.randint(0, self.config.vocab_size, (batch, context))

        def run():
            cached = with_cache(self.model, DynamicCache())  # outside the timed loop: it reads a signature
            out = self.model(ids, **cached)
            tok = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = self.model(tok, **cached)
                tok = out.logits[:, -1:].argmax(-1)
            return time.perf_counter() - t0
        return run


class _OrtRunner:
    def __init__(self, onnx_dir, config, threads=None):
        from .runtime_onnx import OnnxDecoder

        # dense and pruned sessions take turns on the same cores: without spinning off, the idle threads of
        # one busy-wait through the other's run (measured 4x slowdowns of whichever runs second)
        self.dec = OnnxDecoder(onnx_dir, threads=threads, spinning=False)
        self.config = config

    def prefill(self, batch, seq):
        ids = np.random.default_rng(0).integers(0, self.config.vocab_size, (batch, seq))
        mask, pos = np.ones((batch, seq), np.int64), np.tile(np.arange(seq), (batch, 1))
        cache = self.dec.empty_cache(batch)
        return lambda: self.dec.step(ids, mask, pos, cache)

    def decode(self, batch, context, steps):
        def run():
            cache = self.dec.empty_cache(batch, context, seed=0)
            tok = np.zeros((batch, 1), np.int64)
            t0 = time.perf_counter()
            for i in range(steps):
                n = context + i + 1
                logits, cache = self.dec.step(tok, np.ones((batch, n), np.int64), np.full((batch, 1), n - 1), cache)
                tok = logits.numpy()[:, -1:].argmax(-1)
            return time.perf_counter() - t0
        return run


def _onnx_export_dir(spec: str, model) -> Path:
    """`model`'s ONNX export, cached by model fingerprint (export takes minutes): the dense model's, and a
    pruned model's compiled without --target onnx (a slimc output for another runtime, a peer's checkpoint)."""
    from .assets import cache_dir

    d = cache_dir() / "onnx-exports" / model_fingerprint(model)
    if not (d / ONNX_DIR / IO_FILE).is_file():
        print(f"slimc: exporting {spec} to ONNX once (cached in {d})")
        export_onnx(model, d)
    return d / ONNX_DIR


def run_bench(out: str, runtime: str = "onnxruntime", against: str | None = None, prompts=PROMPTS,
              batches=DECODE_BATCHES, decode_steps: int = 16, reps: int = 3, threads: int | None = None) -> dict:
    from .load import load_model

    out_dir = Path(out)
    plan_path = out_dir / "slimc_plan.json"
    if not against:
        if not plan_path.is_file():
            raise SlimcError(f"{out} is not a slimc output (no slimc_plan.json): pass --against DENSE_MODEL")
        against = json.loads(plan_path.read_text()).get("source_model")
        if not against:
            raise SlimcError("the plan names no source model: pass --against MODEL")
    if runtime not in RUNTIMES:
        raise SlimcError(f"unknown runtime {runtime!r} (choose from {', '.join(RUNTIMES)})")
    if runtime == "vllm":
        from .vllm.bench import ensure_vllm_available

        vllm_device = ensure_vllm_available()  # before minutes of model loading
    pruned = load_model(str(out_dir), allow_slimc=True)
    dense = load_model(against, dtype="float32")
    cfg_d, cfg_p = dense.model.config, pruned.model.config
    if runtime == "vllm":
        from .vllm.bench import measure_pair

        t = measure_pair(str(out_dir), against, dense, prompts, batches, decode_steps, DECODE_CONTEXT, reps,
                         device=vllm_device)
        prefill = {seq: {k: t[k]["prefill_s"][seq] for k in t} for seq in prompts}
        decode = {b: {k: t[k]["decode_s_per_token"][b] for k in t} for b in batches}
        rows = timing_rows(cfg_d, cfg_p, prefill, decode, decode_steps)
        return _result(runtime, out_dir, against, None, dense, pruned, rows, device=vllm_device)
    if runtime == "torch":
        runners = {"dense": _TorchRunner(dense.model), "pruned": _TorchRunner(pruned.model.float())}
    else:
        compiled = out_dir / ONNX_DIR
        pruned_onnx = compiled if (compiled / IO_FILE).is_file() else _onnx_export_dir(out, pruned.model)
        runners = {"dense": _OrtRunner(_onnx_export_dir(against, dense.model), dense.model.config, threads),
                   "pruned": _OrtRunner(pruned_onnx, pruned.model.config, threads)}
    prefill, decode = {}, {}
    for seq in prompts:
        fns = {k: r.prefill(1, seq) for k, r in runners.items()}
        for fn in fns.values():
            fn()  # warm-up
        prefill[seq] = _median_interleaved(fns, reps)
    for batch in batches:
        fns = {k: r.decode(batch, DECODE_CONTEXT, decode_steps) for k, r in runners.items()}
        for fn in fns.values():
            fn()
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                times[k].append(fn() / decode_steps)
        decode[batch] = {k: statistics.median(v) for k, v in times.items()}
    rows = timing_rows(cfg_d, cfg_p, prefill, decode, decode_steps)
    return _result(runtime, out_dir, against, threads or torch.get_num_threads(), dense, pruned, rows)


def timing_rows(cfg_d, cfg_p, prefill: dict, decode: dict, decode_steps: int) -> list[dict]:
    """Table rows from median seconds: prefill {seq: {"dense", "pruned"}} per prompt, decode {batch: ...}
    per generated token; each with the FLOP-ideal speedup at that shape and measured / ideal."""
    rows = []
    for seq, t in prefill.items():
        ideal = forward_macs(cfg_d, 1, seq, 0) / forward_macs(cfg_p, 1, seq, 0)
        rows.append({"phase": "prefill", "batch": 1, "tokens": seq, "dense_tok_s": seq / t["dense"],
                     "pruned_tok_s": seq / t["pruned"], "speedup": t["dense"] / t["pruned"], "ideal": ideal})
    ctx = DECODE_CONTEXT + decode_steps // 2
    for batch, t in decode.items():
        ideal = forward_macs(cfg_d, batch, 1, ctx) / forward_macs(cfg_p, batch, 1, ctx)
        rows.append({"phase": "decode", "batch": batch, "tokens": decode_steps, "dense_ms_tok": 1000 * t["dense"],
                     "pruned_ms_tok": 1000 * t["pruned"], "speedup": t["dense"] / t["pruned"], "ideal": ideal})
    for r in rows:
        r["measured_over_ideal"] = r["speedup"] / r["ideal"]
    return rows


def _result(runtime, out_dir, against, threads, dense, pruned, rows, device: str = "cpu") -> dict:
    return {"runtime": runtime, "device": device, "model": str(out_dir), "against": against, "threads": threads,
            "params_dense": sum(p.numel() for p in dense.model.parameters()),
            "params_pruned": sum(p.numel() for p in pruned.model.parameters()), "rows": rows}


def format_bench(r: dict) -> str:
    lines = [f"{r['runtime']} ({r['device']}): {r['model']} vs {r['against']} "
             f"({r['params_pruned']:,} vs {r['params_dense']:,} params)",
             "| phase | batch | tokens | dense | pruned | speedup | FLOP-ideal | measured/ideal |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        if row["phase"] == "prefill":
            d, p = f"{row['dense_tok_s']:.0f} tok/s", f"{row['pruned_tok_s']:.0f} tok/s"
        else:
            d, p = f"{row['dense_ms_tok']:.1f} ms/tok", f"{row['pruned_ms_tok']:.1f} ms/tok"
        lines.append(f"| {row['phase']} | {row['batch']} | {row['tokens']} | {d} | {p} | {row['speedup']:.2f}x | "
                     f"{row['ideal']:.2f}x | {row['measured_over_ideal']:.2f} |")
    return "\n".join(lines)
