"""Seconds per `--disp-train` step in float32 against bfloat16 compute, side by side on one machine.

The step is slimc's own `train_masks` on the dense SmolLM2 (weights frozen, the hypernetwork warm-started from a
selection that drops 64 of the 576 dims of every index set), one Brown calibration window of `--seq-len` tokens a
step, as a `--disp-train` compile runs it. The dtypes alternate rep by rep (float32, bfloat16, float32, ...), so a
neighbour on the shared cores slows both alike; the table gives each dtype's median seconds per step and the ratio.

    python benchmarks/disp_train_speed.py --steps 20 --reps 3             # torch's default threads
    OMP_NUM_THREADS=1 python benchmarks/disp_train_speed.py --threads 1   # one core
"""
from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=20, help="training steps per rep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens a step (--disp-seq-len)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from slimc import data
    from slimc.calibrate import catch_block_inputs, compute_dtype, decoder_layers
    from slimc.capture import block_shape, capture_structures
    from slimc.disp_train import MaskSites, train_masks
    from slimc.load import load_model

    loaded = load_model(args.model)
    model, layers = loaded.model, decoder_layers(loaded.model)
    windows = data.calibration_samples(loaded.tokenizer, "brown", 32, args.seq_len, 0)
    structures = capture_structures(layers, catch_block_inputs(model, windows[:1, :16]))
    shapes = [block_shape(b, s) for b, s in zip(layers, structures)]
    widths = [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes]
    sites = [MaskSites.of(b, s) for b, s in zip(layers, structures)]
    hidden = shapes[0].hidden_size
    init_keep = torch.ones(len(layers), 4, hidden, dtype=torch.bool)
    init_keep[:, :, -64:] = False
    target = sum(sh.disp_params(*w, *[hidden - 64] * 4) for sh, w in zip(shapes, widths))

    per_step: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for _ in range(args.reps):
        for name in per_step:
            with compute_dtype(getattr(torch, name)):
                r = train_masks(model, sites, shapes, widths, init_keep, windows, args.steps, target)
            per_step[name].append(r.seconds / args.steps)
    f32, bf16 = (statistics.median(per_step[n]) for n in ("float32", "bfloat16"))
    print(f"\n{args.model}, {torch.get_num_threads()} thread(s), {args.seq_len} tokens a step, "
          f"median of {args.reps} reps of {args.steps} steps\n")
    print("| compute | s / step | tokens / s |\n|---|---|---|")
    for name, s in (("float32", f32), ("bfloat16", bf16)):
        print(f"| {name} | {s:.3f} | {args.seq_len / s:.0f} |")
    print(f"\nbfloat16 / float32 time: {bf16 / f32:.2f} x")


if __name__ == "__main__":
    main()
