"""Quality, compile time and memory of slimc on a real model and real text (default: SmolLM2-135M + Brown).

Rows: dense; slimgpt at each --ratios; at --ablation-ratio the ablations magnitude, --no-compensate,
--head-score column and the uniform schedule. Every compile runs in its own process so its peak RSS is its
own; perplexity uses the reference protocol (non-overlapping windows, first token of each unscored).
Also measures the floor for compile time: two forward passes of the calibration set through all blocks.

    python benchmarks/quality.py --out bench-out/quality            # full table (about 1-2 h on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def measured_compile(args: list[str]) -> dict:
    """Run `slimc compile ARGS` in a child process; return its wall time and peak RSS."""
    code = ("import resource, sys, time, json; from slimc.cli import main; t=time.perf_counter(); "
            "rc=main(sys.argv[1:]); print('@@'+json.dumps({'rc': rc, 'wall_s': time.perf_counter()-t, "
            "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024}))")
    proc = subprocess.run([sys.executable, "-c", code, "compile", *args], capture_output=True, text=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("@@")]
    if proc.returncode or not line or json.loads(line[0][2:])["rc"]:
        raise RuntimeError(f"compile failed: {proc.stderr[-3000:]}")
    return json.loads(line[0][2:])


def forward_floor(model_name: str, samples: int, seq_len: int, batch: int, compute: str = "float32") -> dict:
    """Seconds for two forward passes of the calibration set through every decoder block (no pruning), the blocks'
    matmuls in `compute` (a --compute-dtype value: the floor of a compile that computes in it)."""
    from slimc import data
    from slimc.calibrate import catch_block_inputs, compute_dtype, decoder_layers, resolve_compute_dtype, run_block
    from slimc.load import load_model

    loaded = load_model(model_name)
    ids = data.calibration_samples(loaded.tokenizer, "brown", samples, seq_len, 0)
    inputs = catch_block_inputs(loaded.model, ids)
    t0 = time.perf_counter()
    with compute_dtype(resolve_compute_dtype(compute, "cpu")):
        for block in decoder_layers(loaded.model):
            run_block(block, inputs, batch, "cpu", keep_outputs=False)
            inputs.hidden = run_block(block, inputs, batch, "cpu")
    return {"two_passes_s": time.perf_counter() - t0, "dense_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def evaluate(path: str, seq_len: int, max_tokens: int) -> dict:
    from slimc import data
    from slimc.evaluate import perplexity
    from slimc.load import load_model

    loaded = load_model(path, allow_slimc=True)
    windows = data.eval_windows(loaded.tokenizer, "brown", seq_len, max_tokens)
    r = perplexity(loaded.model, windows)
    r["params"] = sum(p.numel() for p in loaded.model.parameters())
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="bench-out/quality")
    p.add_argument("--ratios", default="0.2,0.3,0.5")
    p.add_argument("--ablation-ratio", type=float, default=0.3)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--only", help="comma list of row names to run (default: all)")
    p.add_argument("--extra", default="", help="extra compile args for every row, e.g. '--gqa query'")
    p.add_argument("--retime", help="comma list of compiled rows (and/or 'floor') to time again, one at a time on "
                                    "an otherwise idle machine; replaces their compile time and peak RSS only")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    common = ["--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len), *args.extra.split()]
    a = str(args.ablation_ratio)
    rows = {"dense": None}
    for r in args.ratios.split(","):
        rows[f"slimgpt-{r}"] = ["--sparsity", r]
    rows.update({
        f"magnitude-{a}": ["--sparsity", a, "--method", "magnitude"],
        f"no-compensate-{a}": ["--sparsity", a, "--no-compensate"],
        f"head-score-column-{a}": ["--sparsity", a, "--head-score", "column"],
        f"uniform-schedule-{a}": ["--sparsity", a, "--schedule", "uniform"],
    })
    if args.retime:
        retime(args.retime.split(","), rows, results, args, common)
        results_path.write_text(json.dumps(results, indent=2))
        print(markdown(results, args))
        return
    only = set(args.only.split(",")) if args.only else None
    if "floor" not in results and (only is None or "floor" in only):
        results["floor"] = forward_floor(args.model, args.calib_samples, args.seq_len, 8)
        results_path.write_text(json.dumps(results, indent=2))
    for name, extra in rows.items():
        if (only and name not in only) or name in results:
            continue
        print(f"== {name}", flush=True)
        row = {}
        if extra is None:
            row.update(evaluate(args.model, args.eval_seq_len, args.max_tokens))
        else:
            target = out / name
            row["compile"] = measured_compile([args.model, "-o", str(target), "--overwrite", *common, *extra])
            row["report"] = json.loads((target / "report.json").read_text())["params"]
            row.update(evaluate(str(target), args.eval_seq_len, args.max_tokens))
        results[name] = row
        results_path.write_text(json.dumps(results, indent=2))
    print(markdown(results, args))


def retime(names: list[str], rows: dict, results: dict, args, common: list[str]) -> None:
    """Timings taken while evals or tests share the 2 cores are not worth reporting: re-measure them alone."""
    import tempfile

    for name in names:
        print(f"== retime {name}", flush=True)
        if name == "floor":
            results["floor"] = forward_floor(args.model, args.calib_samples, args.seq_len, 8)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            results[name]["compile"] = measured_compile([args.model, "-o", str(Path(tmp) / name), *common, *rows[name]])
        results[name]["compile"]["retimed"] = True


def markdown(results: dict, args) -> str:
    dense = results.get("dense", {})
    floor = results.get("floor", {})
    lines = ["| row | block params removed | model params | PPL | PPL / dense | compile s | compile / floor | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if name == "floor":
            continue
        rep, comp = r.get("report", {}), r.get("compile", {})
        ratio = f"{r['ppl'] / dense['ppl']:.2f}" if dense else ""
        removed = f"{rep['blocks_reduction']:.1%}" if rep else "0"
        floor_ratio = f"{comp['wall_s'] / floor['two_passes_s']:.2f}" if comp and floor else ""
        lines.append(f"| {name} | {removed} | {r['params']:,} | {r['ppl']:.2f} | {ratio} | "
                     f"{comp.get('wall_s', 0):.0f} | {floor_ratio} | {comp.get('peak_rss_mb', 0):.0f} |")
    if floor:
        lines.append(f"\nfloor: two forward passes of {args.calib_samples}x{args.seq_len} calibration tokens through "
                     f"all blocks = {floor['two_passes_s']:.0f} s; dense fp32 model process peak RSS "
                     f"{floor['dense_rss_mb']:.0f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
