"""One comparison of structured-pruning methods on one model, side by side: slimc's methods, the published
baselines inside slimc (magnitude, wanda-sp, flap) and the peers' own outputs (benchmarks/peers.py), at the
same fractions of decoder-block parameters removed.

Per row: Brown perplexity (evaluation split, 2048-token windows, first --ppl-tokens tokens), zero-shot
accuracy through `slimc eval --tasks` (the seven tasks of the papers, a seeded subset of --limit documents per
task, the same for every row), and with --speed the onnxruntime prefill speedup of every row's model, the
peers' included (`slimc bench --against MODEL`, prompt 512, batch 1; rows already evaluated get it too). Every compile and evaluation runs as the CLI a user runs, in its own
process; results are appended to OUT/results.json as they come, so a re-run skips finished rows.

    python benchmarks/peers.py setup && python benchmarks/peers.py prune --out bench-out/peers   # peers first
    python benchmarks/compare.py --out bench-out/compare --peers bench-out/peers                # ~2 h here
    python benchmarks/compare.py --out bench-out/compare --report                              # table + figure
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from slimc import skill

HERE = Path(__file__).resolve().parent
METHODS = ("slimgpt", "slimgpt+disp", "magnitude", "wanda-sp", "flap")
TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
CHANCE = {"boolq": 0.5, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5, "arc_easy": 0.25,
          "arc_challenge": 0.25, "openbookqa": 0.25}


def slimc(*args: str) -> None:
    cmd = [sys.executable, "-m", "slimc.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def file_stem(row_name: str) -> str:
    """A row's name on disk: its compiled model directory, its -eval.json and -speed.json ("slimgpt@0.2" -> "slimgpt-0.2")."""
    return row_name.replace("@", "-")


def block_fraction_removed(model_dir: Path) -> float:
    return json.loads((model_dir / "slimc_plan.json").read_text())["achieved_sparsity"]


def evaluate(model: str, out_json: Path, args) -> dict:
    slimc("eval", model, "--ppl", "brown", "--seq-len", "2048", "--max-tokens", str(args.ppl_tokens),
          "--tasks", ",".join(TASKS), "--limit", str(args.limit), "--json", str(out_json))
    return json.loads(out_json.read_text())


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save():
        results_path.write_text(json.dumps(results, indent=2))

    jobs = [("dense", None, None)]
    for ratio in args.ratios:
        jobs += [(f"{m}@{ratio:g}", m, ratio) for m in args.methods]
    if args.peers:
        summary = json.loads((Path(args.peers) / "peers.json").read_text())
        for row in summary if isinstance(summary, list) else summary.get("outputs", []):
            if row.get("error") or not row.get("dir"):
                results.setdefault(f"{row['peer']}@{row.get('requested')}", {"error": row.get("error", "no output")})
                continue
            jobs.append((f"{row['peer']}@{row['requested']:g}", "peer", row))
    for name, method, spec in jobs:
        if name in results and "tasks" in results[name]:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        t0 = time.perf_counter()
        row: dict = {}
        try:
            if method is None:
                model = args.model
                row["fraction_removed"] = 0.0
            elif method == "peer":
                model = spec["dir"]
                row.update(fraction_removed=spec["achieved_fraction"], peer=spec)
            else:
                model = str(out / file_stem(name))
                if not Path(model, "slimc_plan.json").is_file():
                    t = time.perf_counter()
                    slimc("compile", args.model, "-o", model, "--sparsity", str(spec), "--method", method,
                          "--overwrite")
                    row["compile_s"] = time.perf_counter() - t
                row["fraction_removed"] = block_fraction_removed(Path(model))
            row.update(evaluate(model, out / f"{file_stem(name)}-eval.json", args))
        except RuntimeError as e:
            row["error"] = str(e)[-1500:]
            print(row["error"], file=sys.stderr)
        row["seconds"] = time.perf_counter() - t0
        results[name] = row
        save()
    if args.speed:
        measure_speed(results, out, args, save)


def measure_speed(results: dict, out: Path, args, save) -> None:
    """onnxruntime prefill (and batch-1 decode) of every row's model against the dense one, side by side in one
    `slimc bench` run per row; a model compiled for another target is exported once into slimc's cache."""
    for name, row in results.items():
        if name == "dense" or "tasks" not in row or "onnx" in row:
            continue
        model = row["peer"]["dir"] if "peer" in row else str(out / file_stem(name))
        print(f"[{time.strftime('%H:%M:%S')}] {name}: onnxruntime speed", flush=True)
        speed_json = out / f"{file_stem(name)}-speed.json"
        try:
            slimc("bench", model, "--against", args.model, "--runtime", "onnxruntime", "--prompts", "512",
                  "--batches", "1", "--json", str(speed_json))
            row["onnx"] = json.loads(speed_json.read_text())
        except RuntimeError as e:
            row["onnx"] = {"error": str(e)[-1500:]}
            print(row["onnx"]["error"], file=sys.stderr)
        save()


def kept_table(paths: list[str], convention: str = "acc") -> str:
    """Accuracy rows of `slimc eval --tasks --json` outputs against the dense column the first one carries
    (`--against`): per-task accuracy (the convention's metric), the average and the dense skill kept above
    chance (`slimc.skill`), each with its error -- paired where both runs logged every document's outcome."""
    runs = {Path(p).stem: json.loads(Path(p).read_text()) for p in paths}
    dense = next(iter(runs.values())).get("against")
    if not dense or "tasks" not in dense:
        raise SystemExit(f"{paths[0]}: no dense column (run slimc eval with --against)")
    tasks = [t for t in dense["tasks"] if all(t in r["tasks"] for r in runs.values())]
    metric = {t: skill.metric_of(t, convention) for t in tasks}
    header = "| model | " + " | ".join(f"{t} ({metric[t]})" for t in tasks) + " | kept above chance |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in [(f"dense ({dense['model']})", dense), *runs.items()]:
        accs = " | ".join(f"{row['tasks'][t][metric[t]]:.3f} ± {row['tasks'][t][metric[t] + '_stderr']:.3f}"
                          for t in tasks)
        if row is dense:
            kept = "–"
        else:
            k = skill.kept_above_chance(row, dense, convention)
            kept = f"{k.value:.1%} ± {k.stderr:.1%}" + (" (paired)" if k.paired else "")
        lines.append(f"| {name} | {accs} | {kept} |")
    n = ", ".join(f"{t} {dense['tasks'][t]['n']}" for t in tasks)
    skilled = ", ".join(skill.skilled_tasks(dense, convention))
    lines += ["", f"n per task: {n}; kept above chance over {skilled} (dense > chance + 2 SE)."]
    return "\n".join(lines)


def onnx_speedup(row: dict) -> str:
    o = row.get("onnx")
    if not o:
        return "–"
    if "error" in o:
        return "failed (results.json)"
    prefill = [r for r in o.get("rows", []) if r.get("phase") == "prefill"]
    if not prefill or "speedup" not in prefill[0]:
        return "–"
    return f"{prefill[0]['speedup']:.2f}× (ideal {prefill[0]['ideal']:.2f}×)"  # the FLOP-ideal: a check on noise


def report(args) -> None:
    out = Path(args.out)
    results = json.loads((out / "results.json").read_text())
    for extra in args.also or []:  # rows measured by another run (e.g. the peers, run beside on one core each)
        results.update({k: v for k, v in json.loads((Path(extra) / "results.json").read_text()).items() if k != "dense"})
    dense = results["dense"]
    header = ("| row | removed | Brown PPL | " + " | ".join(TASKS) + " | average | kept above chance | onnx prefill |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    n = {t: dense["tasks"][t]["n"] for t in TASKS}

    def order(item):  # dense, then by fraction removed (to the nearest 10 %), then by name
        name, row = item
        return (name != "dense", round(row.get("fraction_removed") or 0, 1), name)

    for name, row in sorted(results.items(), key=order):
        if "error" in row:
            lines.append(f"| {name} | – | failed: {row['error'].splitlines()[-1][:80]} |" + " |" * (len(TASKS) + 3))
            continue
        accs = " | ".join(f"{row['tasks'][t]['acc']:.3f}" for t in TASKS)
        kept = "–" if name == "dense" else f"{skill.kept_above_chance(row, dense).value:.0%}"
        lines.append(f"| {name} | {row['fraction_removed']:.1%} | {row['ppl']:.2f} | {accs} | "
                     f"{row['average']:.3f} ± {row['average_stderr'] or math.nan:.3f} | {kept} | {onnx_speedup(row)} |")
    lines.append("")
    lines.append("n per task: " + ", ".join(f"{t} {n[t]}" for t in TASKS) + f" (seeded subset, --limit {dense['limit']}); "
                 f"PPL over {dense['tokens']:,} tokens in {dense['windows']} windows of {dense['seq_len']}; "
                 f"kept above chance over {', '.join(skill.skilled_tasks(dense))} (dense > chance + 2 SE).")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    figure(results, HERE / "figures" / "compare_smollm2.png")


def figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense"]
    by_method: dict = {}
    for name, row in results.items():
        if name == "dense" or "error" in row:
            continue
        by_method.setdefault(name.split("@")[0], []).append(row)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, rows in sorted(by_method.items()):
        rows = sorted(rows, key=lambda r: r["fraction_removed"])
        xs = [0.0] + [100 * r["fraction_removed"] for r in rows]
        ax1.plot(xs, [dense["ppl"]] + [r["ppl"] for r in rows], marker="o", label=method)
        ax2.plot(xs, [dense["average"]] + [r["average"] for r in rows], marker="o", label=method)
    ax1.set_yscale("log")
    ax1.set_ylabel("Brown perplexity (eval split, 2048-token windows)")
    ax2.axhline(sum(CHANCE.values()) / len(CHANCE), color="grey", ls=":", label="chance")
    ax2.set_ylabel("average zero-shot accuracy (7 tasks)")
    for ax in (ax1, ax2):
        ax.set_xlabel("decoder-block parameters removed (%)")
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: slimc methods, baselines and peers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="bench-out/compare")
    p.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.2, 0.5])
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m not in ("", "none")],
                   default=list(METHODS), help="slimc methods to compile (none: only dense and the peers)")
    p.add_argument("--peers", help="directory written by benchmarks/peers.py (its peers.json)")
    p.add_argument("--limit", type=int, default=50, help="documents per task (seeded subset, the same for every row)")
    p.add_argument("--ppl-tokens", type=int, default=32768)
    p.add_argument("--speed", action="store_true", help="also onnxruntime prefill speedup of every row's model")
    p.add_argument("--report", action="store_true", help="only write the table and the figure")
    p.add_argument("--also", nargs="*", help="--report: merge the rows of these other --out directories")
    p.add_argument("--kept", nargs="+", metavar="EVAL_JSON",
                   help="only print the accuracy table of these `slimc eval --tasks --json` files, the dense column "
                        "from the first one's --against, kept above chance with its standard error")
    p.add_argument("--convention", choices=sorted(skill.CONVENTIONS), default="acc",
                   help="--kept: acc on every task, or papers (acc_norm on hellaswag, arc_challenge, openbookqa)")
    args = p.parse_args()
    if args.kept:
        print(kept_table(args.kept, args.convention))
    else:
        report(args) if args.report else run(args)


if __name__ == "__main__":
    main()
