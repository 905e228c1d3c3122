"""Command line: `slimc compile`, `slimc eval`, `slimc bench`, `slimc assets fetch`. User errors print one line, exit 2."""
from __future__ import annotations

import argparse
import json
import sys

from .config import COMPUTE_DTYPES, DISP_TRAIN_CUTS, METHODS
from .plan import SCHEDULES
from .errors import Interrupted, SlimcError


class _OneLineParser(argparse.ArgumentParser):
    """A bad option prints one line, not argparse's whole usage block (subcommand parsers inherit this class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="slimc", description="Make Hugging Face causal LMs structurally smaller.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="prune a model and write a smaller checkpoint")
    c.add_argument("model", help="local HF dir, .gguf file, hub id, or built-in name (smollm2-135m)")
    c.add_argument("-o", "--output", required=True, help="output directory (must not exist)")
    c.add_argument("--sparsity", type=float, default=0.2, help="fraction of decoder-block attention+FFN params to remove")
    c.add_argument("--target", default="hf", choices=["hf", "vllm", "onnx"])
    c.add_argument("--method", default="slimgpt", choices=list(METHODS),
                   help="slimgpt: heads + FFN channels (default); disp: each block reads/writes its own hidden dims; "
                        "slimgpt+disp: both, the budget split per block by error per parameter; baselines: magnitude, "
                        "wanda-sp (|W|*||X|| scores), flap (fluctuation scores, global adaptive widths, bias "
                        "compensation)")
    c.add_argument("--schedule", default="log", choices=SCHEDULES,
                   help="per-layer widths: log / linear / uniform shapes, or measured (each layer's head and FFN "
                        "costs measured on the calibration text, the budget split by error per parameter)")
    c.add_argument("--calib", default="brown",
                   help="brown | wikitext2 | c4 | PATH to a .txt file or directory | a .jsonl of conversations")
    c.add_argument("--calib-samples", type=int,
                   help="calibration windows (default 128, or all a shorter text holds, said so)")
    c.add_argument("--chat-calib", default="auto", choices=["auto", "on", "off"],
                   help="mix chat-formatted windows into calibration (auto: when the model has a chat template)")
    c.add_argument("--chat-mix", type=float, default=0.5,
                   help="chat windows per --calib-samples window, added on top (default chosen on held-out prompts)")
    c.add_argument("--chat-data", default="both", choices=["self", "framed", "both"],
                   help="chat windows from the dense model's own answers, from calibration text framed as "
                        "conversations, or half each")
    c.add_argument("--seq-len", type=int, help="tokens per calibration window (default 512)")
    c.add_argument("--gqa", default="query", choices=["groups", "query"],
                   help="query: drop query heads evenly from every KV group; groups: drop whole KV groups")
    c.add_argument("--gqa-order", default="joint", choices=["joint", "sequential"],
                   help="--gqa query: remove the cheapest head of every KV group per OBS round (joint), or the "
                        "cheapest head among groups that still owe one, re-scoring after each (sequential)")
    c.add_argument("--ffn-group-max", type=int, default=1024,
                   help="largest group of FFN channels one OBS round removes (rounds shrink to 8 channels)")
    c.add_argument("--head-rounding", default="floor", choices=["floor", "nearest"],
                   help="floor: drop a head unit only when the layer's target covers it whole")
    c.add_argument("--align-ffn", type=int, default=None,
                   help="round kept FFN widths to a multiple of this (default: measured per target, see README)")
    c.add_argument("--tp", type=int, default=1, help="make every layer valid for this tensor-parallel size")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="output dtype (default: the source's)")
    c.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPES,
                   help="dtype of the blocks' matmuls while calibrating, reconstructing and distilling (weights and "
                        "Hessians stay float32); auto (default): bfloat16 where the device runs it natively (CPUs with "
                        "AMX, GPUs with bfloat16), else float32")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu", help="cpu | cuda")
    c.add_argument("--batch-size", type=int, default=8, help="calibration samples per block forward")
    c.add_argument("--resume", action="store_true",
                   help="continue the unfinished compile kept in OUT.partial (a killed or interrupted run of the same "
                        "command) from its last finished block")
    c.add_argument("--max-shard-size", help="write the safetensors in shards of at most this size (e.g. 2GB), with "
                                            "model.safetensors.index.json")
    c.add_argument("--stream", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="hold one decoder block in memory at a time: each block's weights are read from the source "
                        "(safetensors or GGUF) when it is calibrated and written to OUT as soon as it is pruned; "
                        "auto (default): whenever the source is local and no option needs the whole model")
    c.add_argument("--activation-budget", metavar="SIZE",
                   help="RAM for the cached calibration activations (block inputs and outputs; the dense stream too "
                        "with --reconstruct / --refit), e.g. 8GB; beyond it they spill to files under --offload-dir "
                        "(default: a quarter of this machine's RAM)")
    c.add_argument("--offload-dir", metavar="DIR",
                   help="where activations beyond --activation-budget go (default: OUT.partial/activations, removed "
                        "with it); use a fast local disk")
    c.add_argument("--plan-only", action="store_true", help="write only the plan (per-layer widths)")
    c.add_argument("--plan", help="reuse the per-layer widths of a plan JSON")
    c.add_argument("--no-compensate", dest="compensate", action="store_false", help="ablation: no OBS weight update")
    c.add_argument("--head-score", default="grouped", choices=["grouped", "column"],
                   help="ablation: score heads by summed per-column errors")
    c.add_argument("--reconstruct", action="store_true",
                   help="after pruning a block, fit its kept weights to the dense block's outputs (Adam)")
    c.add_argument("--refit", action="store_true",
                   help="after OBS, refit each pruned block's kept q/k/v, o, gate/up and down weights in closed form "
                        "so that, on the pruned stream, they reproduce the dense block's projections on the dense stream")
    c.add_argument("--reconstruct-epochs", type=int, default=2, help="passes over the calibration windows")
    c.add_argument("--reconstruct-lr", type=float, default=3e-3,
                   help="Adam's step size (3e-3 chosen on held-out Brown at 50 %%, BENCHMARKS.md §8)")
    c.add_argument("--reconstruct-batch", type=int, default=2, metavar="N",
                   help="calibration windows per Adam step (2 beat 8 on held-out Brown at 50 %%, BENCHMARKS.md §8)")
    c.add_argument("--reconstruct-weighting", default="energy", choices=["energy", "fisher"],
                   help="fisher: each output dim's error weighted by the loss's sensitivity there (one backward pass "
                        "of the dense model on 16 windows); energy: the plain squared error, dominated by outlier dims")
    c.add_argument("--distill-epochs", type=int, default=0,
                   help="after pruning, passes of distillation from the dense model on the calibration windows")
    c.add_argument("--distill-lr", type=float, default=2e-4,
                   help="Adam's step size (2e-4 chosen on held-out Brown at 30 %%, BENCHMARKS.md §8)")
    c.add_argument("--distill-windows", type=int, default=0, metavar="N",
                   help="distil on N more --seq-len windows of fresh text besides the calibration windows: Brown's "
                        "train split (its files in no other split) for --calib brown, else the --calib text")
    c.add_argument("--disp-train", type=int, default=0, metavar="STEPS",
                   help="DISP methods: learn the hidden-dim masks with the paper's hypernetwork for STEPS steps, "
                        "warm-started from the training-free selection (model weights frozen)")
    c.add_argument("--disp-lr", type=float, default=1e-3)
    c.add_argument("--disp-lambda", type=float, default=2.0, help="weight of the parameter-budget loss term")
    c.add_argument("--disp-seq-len", type=int, default=256, help="tokens per --disp-train sample")
    c.add_argument("--disp-train-channels", action="store_true",
                   help="slimgpt+disp: learn the FFN channels with the masks too (the paper's fifth mask; worse than "
                        "the dims alone on held-out text at 2,400 steps, BENCHMARKS.md section 6)")
    c.add_argument("--disp-train-cut", choices=DISP_TRAIN_CUTS, default="compensated",
                   help="cut --disp-train's learned dims (and channels) with the OBS compensation of the kept "
                        "columns, or as the masks trained them (masked: dropped, nothing refitted)")
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")

    e = sub.add_parser("eval", help="perplexity, chat fidelity and zero-shot accuracy of a model or a compiled output")
    e.add_argument("model")
    e.add_argument("--ppl", help="perplexity text: brown | brown-heldout | wikitext2 | c4 | PATH "
                                 "(default: brown, unless only --chat or --tasks is asked for)")
    e.add_argument("--chat", nargs="?", const="builtin", metavar="PROMPTS.jsonl",
                   help="chat fidelity against the dense model's greedy answers, on the built-in prompt set or "
                        "a JSONL of conversations")
    e.add_argument("--chat-tokens", type=int, default=128, help="longest answer generated for --chat")
    e.add_argument("--tasks", metavar="LIST",
                   help="zero-shot accuracy through lm-eval on these comma-separated tasks, offline: piqa, hellaswag, "
                        "winogrande, boolq, arc_easy, arc_challenge, openbookqa, lambada ('all': the first seven); "
                        "with a model hub, any lm-eval task")
    e.add_argument("--limit", type=int, help="--tasks: score a seeded subset of N documents per task (the same "
                                              "documents for every model; default: the whole split)")
    e.add_argument("--against", help="the dense model, measured beside in the same run (default for --chat's "
                                     "reference: the plan's source model)")
    e.add_argument("--seq-len", type=int, default=2048)
    e.add_argument("--max-tokens", type=int, default=100_000, help="score the first N tokens (0: all)")
    e.add_argument("--batch-size", type=int, help="sequences per forward (default: 1 for perplexity, 16 for --tasks)")
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", help="also write the result as JSON to this path")

    b = sub.add_parser("bench", help="pruned vs dense speed, side by side, on a runtime")
    b.add_argument("model", help="a slimc output directory (any other checkpoint with --against; onnxruntime: "
                                 "exported once into the cache unless compiled with --target onnx)")
    b.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "torch", "vllm"])
    b.add_argument("--against", help="the dense model (default: the plan's source model)")
    b.add_argument("--prompts", default="128,512,2048", help="prefill prompt lengths")
    b.add_argument("--batches", default="1,8", help="decode batch sizes")
    b.add_argument("--decode-steps", type=int, default=16)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--threads", type=int, help="intra-op threads for onnxruntime")
    b.add_argument("--json", help="also write the results as JSON to this path")

    a = sub.add_parser("assets", help="offline default assets (SmolLM2 GGUF, Brown corpus)")
    a.add_argument("action", choices=["fetch", "path"])
    return p


def _compile(args) -> None:
    from .pipeline import compile_model
    from .config import CompileConfig

    opts = {k: v for k, v in vars(args).items() if k != "command"}
    compile_model(CompileConfig(**opts))
    print(f"wrote {args.output}")


def _eval(args) -> None:
    from .evaluate import format_eval, run_eval

    r = run_eval(args.model, ppl=args.ppl, seq_len=args.seq_len, max_tokens=args.max_tokens or None,
                 batch_size=1 if args.batch_size is None else args.batch_size, dtype=args.dtype,
                 device=args.device, chat=args.chat, chat_tokens=args.chat_tokens, against=args.against,
                 tasks=args.tasks, limit=args.limit, task_batch_size=16 if args.batch_size is None else args.batch_size)
    print(format_eval(r))
    if args.json:
        _write_json(r, args.json)


def _bench(args) -> None:
    from .bench import format_bench, run_bench

    def ints(text):
        try:
            return tuple(int(x) for x in text.split(","))
        except ValueError:
            raise SlimcError(f"expected a comma-separated list of integers, got {text!r}") from None

    r = run_bench(args.model, args.runtime, args.against, ints(args.prompts), ints(args.batches),
                  args.decode_steps, args.reps, args.threads)
    print(format_bench(r))
    if args.json:
        _write_json(r, args.json)


def _write_json(result: dict, path: str) -> None:
    from .report import strict_json

    with open(path, "w") as f:
        f.write(strict_json(result))


def _assets(args) -> None:
    from . import assets

    paths = assets.fetch_all()
    for name, path in paths.items():
        print(f"{name}: {path}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "compile":
        from . import interrupt

        interrupt.install()  # Ctrl-C stops a compile at a safe point, keeping its finished blocks
    try:
        {"compile": _compile, "eval": _eval, "bench": _bench, "assets": _assets}[args.command](args)
    except SlimcError as e:
        print(f"slimc: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"slimc: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("slimc: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("slimc: error: out of memory: lower --calib-samples / --batch-size or use --device cuda", file=sys.stderr)
        return 1
    except Exception as e:  # out-of-memory on GPU surfaces as a RuntimeError subclass
        if "out of memory" in str(e).lower():
            print("slimc: error: out of memory: lower --batch-size or --calib-samples", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
