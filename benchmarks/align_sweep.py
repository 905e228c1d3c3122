"""Which FFN widths does a runtime like? Time one gated MLP (SmolLM2's hidden size) for a sweep of
intermediate widths, on onnxruntime CPU (exported through torch.onnx, what `--target onnx` serves) or eager
torch (what `--target hf` runs), and report time per kept channel relative to widths that are multiples of 64.

    python benchmarks/align_sweep.py --runtime onnxruntime --hidden 576 --tokens 512 --widths 1216:1281
    python benchmarks/align_sweep.py --runtime torch --hidden 576 --tokens 512 --widths 1216:1281
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate, self.up = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False)
        self.down = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


def build_session(hidden: int, width: int, tokens: int, tmp: Path):
    import onnxruntime as ort

    path = tmp / f"mlp{width}.onnx"
    with torch.no_grad():
        torch.onnx.export(GatedMLP(hidden, width).eval(), (torch.randn(1, tokens, hidden),), str(path), dynamo=True,
                          verbose=False)
    # Idle intra-op threads of one session spin and steal the cores from the next session run in the
    # interleaved loop (measured: 4x slower, and bimodal per session); one session at a time does not spin.
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def build_runners(runtime: str, hidden: int, widths: list[int], tokens: int, tmp: Path) -> dict:
    x = np.random.default_rng(0).standard_normal((1, tokens, hidden), dtype=np.float32)
    if runtime == "onnxruntime":
        sessions = {w: build_session(hidden, w, tokens, tmp) for w in widths}
        feeds = {w: {s.get_inputs()[0].name: x} for w, s in sessions.items()}  # built once, outside the timing
        return {w: (lambda s=s, feed=feeds[w]: s.run(None, feed)) for w, s in sessions.items()}
    xt = torch.from_numpy(x)

    def runner(mlp):
        def run():
            with torch.no_grad():
                mlp(xt)
        return run
    return {w: runner(GatedMLP(hidden, w).eval()) for w in widths}


def time_widths(runtime: str, hidden: int, widths: list[int], tokens: int, reps: int, tmp: Path) -> dict[int, float]:
    """Median time per width. Rounds visit every width in a fresh random order, so slow drifts of a shared
    machine spread over all widths instead of biasing a contiguous range of them."""
    runners = build_runners(runtime, hidden, widths, tokens, tmp)
    for run in runners.values():
        run()
    times = {w: [] for w in widths}
    rng = np.random.default_rng(1)
    for _ in range(reps):
        for w in rng.permutation(widths):
            w = int(w)
            t0 = time.perf_counter()
            runners[w]()
            times[w].append(time.perf_counter() - t0)
    return {w: statistics.median(v) for w, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runtime", choices=("onnxruntime", "torch"), default="onnxruntime")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--widths", default="1216:1281", help="start:stop (python range) of widths")
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    start, stop = map(int, args.widths.split(":"))
    with tempfile.TemporaryDirectory() as tmp:
        rows = sorted(time_widths(args.runtime, args.hidden, list(range(start, stop)), args.tokens, args.reps, Path(tmp)).items())
    # cost per channel, normalised by the median of widths that are multiples of 64
    per_channel = {w: t / w for w, t in rows}
    ref = statistics.median(v for w, v in per_channel.items() if w % 64 == 0) if any(w % 64 == 0 for w, _ in rows) \
        else statistics.median(per_channel.values())
    print(f"{args.runtime}, {torch.get_num_threads()} threads, hidden {args.hidden}, {args.tokens} tokens, "
          f"median of {args.reps} interleaved reps")
    print("| width | ms | time per channel vs multiples of 64 | largest power-of-2 divisor |")
    print("|---|---|---|---|")
    for w, t in rows:
        print(f"| {w} | {1000 * t:.2f} | {per_channel[w] / ref:.3f} | {w & -w} |")
    for k in (1, 8, 16, 32, 64):
        sel = [per_channel[w] / ref for w, _ in rows if w % k == 0]
        print(f"multiples of {k}: {len(sel)} widths, median relative cost per channel {statistics.median(sel):.3f}")


if __name__ == "__main__":
    main()
