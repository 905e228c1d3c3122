"""SlimGPT's quality levers one at a time (issue 12): each row is a default compile plus the levers its name lists.

Every row is compiled in its own process (its wall time is its own, `measured_compile`) unless OUT/ROW already
holds a compile, then scored in this process: perplexity at two evaluation windows (512 and 2048 tokens) on one
text, and optionally the chat metrics (`--chat PROMPTS`: NLL of the dense model's answers, share answered).

    # choosing defaults: held-out Brown files 04-06 (never the evaluation split) and the probe prompts
    python benchmarks/levers.py --out bench-out/levers --ppl brown-heldout \
        --rows dense,0.5,0.5+fg128,0.5+seq,0.5+rec,0.5+kd1
    # the chosen defaults on the evaluation split
    python benchmarks/levers.py --out bench-out/levers-eval --ppl brown --rows dense,0.2,0.5

Row names: `dense`, or RATIO[+LEVER...]; levers: fgN (`--ffn-group-max N`), seq (`--gqa-order sequential`),
sched-NAME (`--schedule NAME`), refit (`--refit`), rec (`--reconstruct`), rlrX (`--reconstruct-lr X`), rw-NAME (`--reconstruct-weighting NAME`), repN
(`--reconstruct-epochs N`), rbsN (`--reconstruct-batch N`), kdN (`--distill-epochs N`), klrX (`--distill-lr X`), calN (`--calib-samples N`),
slN (`--seq-len N`), sd (`--method slimgpt+disp`), align1 (`--align-ffn 1`), bf16 / f32 (`--compute-dtype bfloat16` /
`float32`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chat import PROMPT_SETS  # noqa: E402
from quality import measured_compile  # noqa: E402

PREFIXED = [("fg", "--ffn-group-max"), ("sched-", "--schedule"), ("rlr", "--reconstruct-lr"),
            ("rep", "--reconstruct-epochs"), ("rbs", "--reconstruct-batch"), ("rw-", "--reconstruct-weighting"), ("klr", "--distill-lr"), ("kd", "--distill-epochs"),
            ("cal", "--calib-samples"), ("sl", "--seq-len")]
FLAGS = {"seq": ["--gqa-order", "sequential"], "rec": ["--reconstruct"], "refit": ["--refit"], "sd": ["--method", "slimgpt+disp"],
         "align1": ["--align-ffn", "1"], "bf16": ["--compute-dtype", "bfloat16"], "f32": ["--compute-dtype", "float32"]}
LEVER_STAGES = ("measure", "refit", "reconstruct", "distill")


def compile_args(name: str) -> list[str]:
    ratio, *levers = name.split("+")
    args = ["--sparsity", ratio]
    for lever in levers:
        if lever in FLAGS:
            args += FLAGS[lever]
            continue
        for prefix, option in PREFIXED:
            if lever.startswith(prefix) and lever != prefix:
                args += [option, lever[len(prefix):]]
                break
        else:
            raise SystemExit(f"unknown lever {lever!r} in row {name!r}")
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="bench-out/levers")
    p.add_argument("--rows", required=True, help="comma list of row names (see above)")
    p.add_argument("--extra", default="", help="compile args for every row")
    p.add_argument("--ppl", default="brown-heldout", help="perplexity text")
    p.add_argument("--windows", default="512,2048", help="evaluation window lengths")
    p.add_argument("--max-tokens", type=int, default=32_768)
    p.add_argument("--chat", choices=sorted(PROMPT_SETS), help="also the chat metrics on these prompts")
    p.add_argument("--results", help="results file (default: OUT/results-PPL.json)")
    args = p.parse_args()

    from slimc.evaluate import run_eval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results or out / f"results-{args.ppl}.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    windows = [int(w) for w in args.windows.split(",")]
    for name in args.rows.split(","):
        row = results.get(name, {})
        target = args.model
        if name != "dense":
            target = str(out / name)
            if not (out / name / "report.json").is_file():
                print(f"== compile {name}", flush=True)
                row["compile"] = measured_compile([args.model, "-o", target, "--overwrite", *args.extra.split(),
                                                   *compile_args(name)])
            rep = json.loads((out / name / "report.json").read_text())
            row["params"], row["seconds"] = rep["params"], rep["seconds"]
        for w in windows:
            if f"ppl_{w}" not in row:
                print(f"== {name}: perplexity at {w}", flush=True)
                row[f"ppl_{w}"] = run_eval(target, ppl=args.ppl, seq_len=w, max_tokens=args.max_tokens)["ppl"]
        if args.chat and "chat" not in row:
            c = run_eval(target, chat=PROMPT_SETS[args.chat])["chat"]
            row["chat"] = {k: c[k] for k in ("nll", "answered", "agreement")}
        # re-read before writing: another run may have added rows to the same file meanwhile
        results = {**(json.loads(results_path.read_text()) if results_path.exists() else {}), name: row}
        results_path.write_text(json.dumps(results, indent=2))
    print(markdown(results, windows))


def markdown(results: dict, windows: list[int]) -> str:
    dense = results.get("dense", {})
    # the levers' own stages against the calibration passes of the same compile: a ratio survives shared cores
    head = ("| row | removed | " + " | ".join(f"PPL@{w} | / dense" for w in windows)
            + " | chat NLL | answered | compile s | lever stages / calibrate |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, row in results.items():
        cells = [name, f"{row['params']['blocks_reduction']:.1%}" if "params" in row else "0"]
        for w in windows:
            v, d = row.get(f"ppl_{w}"), dense.get(f"ppl_{w}")
            cells += [f"{v:.2f}" if v else "", f"{v / d:.3f}" if v and d else ""]
        c = row.get("chat", {})
        cells += [f"{c['nll']:.3f}" if c else "", f"{c['answered']:.0%}" if c else ""]
        comp = row.get("compile", {}).get("wall_s") or row.get("seconds", {}).get("total")
        cells.append(f"{comp:.0f}" if comp else "")
        sec = row.get("seconds", {})
        lever = sum(sec.get(k, 0.0) for k in LEVER_STAGES)
        cells.append(f"{lever / sec['calibrate']:.2f}" if sec.get("calibrate") else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
