"""onnxruntime CPU speed of compiled slimc outputs vs the dense model, side by side (`slimc bench`).

Takes existing slimc output directories (e.g. the ones benchmarks/quality.py wrote), adds the ONNX export
to each when missing (what `--target onnx` writes), then runs the bench and prints one markdown table.

    python benchmarks/onnx_speed.py bench-out/quality/slimgpt-0.2 bench-out/quality/slimgpt-0.3 ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from slimc.bench import format_bench, run_bench
from slimc.exporters.onnx import ONNX_DIR, export_onnx
from slimc.load import load_model


def ensure_onnx(out: Path) -> None:
    if not (out / ONNX_DIR / "io.json").is_file():
        loaded = load_model(str(out), allow_slimc=True)
        export_onnx(loaded.model, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outputs", nargs="+")
    p.add_argument("--against", default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--prompts", default="128,512,2048", help="prefill lengths")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--json", default="bench-out/onnx_speed.json")
    args = p.parse_args()
    results = {}
    for out in map(Path, args.outputs):
        ensure_onnx(out)
        r = run_bench(str(out), "onnxruntime", args.against, prompts=tuple(map(int, args.prompts.split(","))),
                      batches=tuple(map(int, args.batches.split(","))), reps=args.reps, decode_steps=args.decode_steps)
        print(format_bench(r), flush=True)
        results[out.name] = r
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
