"""Chat fidelity of pruned instruct models: plain-text calibration against chat-mixed calibration.

Each row is compiled in its own process (wall time and peak RSS are its own) unless its output already
exists, then evaluated in this process: Brown perplexity (optional) and `slimc eval --chat` metrics against the
dense model's greedy answers (NLL of the dense answers, share answered, ROUGE-L agreement).

    # choosing defaults: held-out Brown files 04-06 and the probe prompts (never the reported ones)
    python benchmarks/chat.py --out bench-out/chat --rows plain-0.3,self-0.3,framed-0.3,both-0.3 \
        --ppl brown-heldout --max-tokens 32768 --prompts probe
    # reporting: Brown evaluation split and the built-in eval prompts
    python benchmarks/chat.py --out bench-out/chat --rows dense,plain-0.2,chat-0.2,plain-0.3,chat-0.3,plain-0.5,chat-0.5

Row names: `dense`, or KIND-RATIO[-OPTION...] with KIND one of plain (`--chat-calib off`), chat (the defaults),
self / framed / both (`--chat-data KIND`); options mixM (`--chat-mix M`), rec (`--reconstruct`), lrX
(`--reconstruct-lr X`), epN (`--reconstruct-epochs N`), kdN (`--distill-epochs N`), klrX (`--distill-lr X`),
disp (`--method disp`), sd (`--method slimgpt+disp`), dtN (`--disp-train N`), dtc (`--disp-train-channels`),
masked (`--disp-train-cut masked`); e.g. `self-0.3-mix1.0`, `both-0.3-rec-lr3e-4`, `chat-0.5-sd-dt300`,
`plain-0.5-sd-dt2400-dtc`, `plain-0.5-sd-dt2400-masked`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from quality import measured_compile  # noqa: E402

PROMPT_SETS = {"eval": "builtin", "probe": str(HERE.parent / "slimc" / "prompts" / "probe.jsonl")}


def compile_args(name: str) -> list[str]:
    # options start with a letter, so a dash inside a number (lr3e-4) does not split
    head, *rest = re.split(r"-(?=[a-z])", name)
    kind, ratio = head.split("-", 1)
    args = ["--sparsity", ratio]
    if kind == "plain":
        args += ["--chat-calib", "off"]
    elif kind in ("self", "framed", "both"):
        args += ["--chat-data", kind]
    elif kind != "chat":
        raise SystemExit(f"unknown row kind {kind!r}")
    for r in rest:
        if r.startswith("mix"):
            args += ["--chat-mix", r[3:]]
        elif r == "rec":
            args += ["--reconstruct"]
        elif r.startswith("lr"):
            args += ["--reconstruct-lr", r[2:]]
        elif r.startswith("kd"):
            args += ["--distill-epochs", r[2:]]
        elif r.startswith("klr"):
            args += ["--distill-lr", r[3:]]
        elif r.startswith("ep"):
            args += ["--reconstruct-epochs", r[2:]]
        elif r == "disp":
            args += ["--method", "disp"]
        elif r == "sd":
            args += ["--method", "slimgpt+disp"]
        elif r == "dtc":
            args += ["--disp-train-channels"]
        elif r == "masked":
            args += ["--disp-train-cut", "masked"]
        elif r.startswith("dt"):
            args += ["--disp-train", r[2:]]
        else:
            raise SystemExit(f"unknown row option {r!r}")
    return args


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", default="bench-out/chat")
    p.add_argument("--rows", required=True, help="comma list of row names (see above)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--extra", default="--align-ffn 1", help="compile args for every row")
    p.add_argument("--ppl", default="brown", help="perplexity text; 'none' to skip perplexity")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=100_000)
    p.add_argument("--prompts", default="eval", choices=sorted(PROMPT_SETS))
    p.add_argument("--chat-tokens", type=int, default=128)
    p.add_argument("--results", help="results file (default: OUT/results-PPL-PROMPTS.json)")
    p.add_argument("--rescore", action="store_true",
                   help="recompute 'answered' of the stored answers with the current rule, then print the table")
    args = p.parse_args()

    from slimc.evaluate import run_eval

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = Path(args.results or out / f"results-{args.ppl}-{args.prompts}.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if args.rescore:
        rescore(results, args.model)
        results_path.write_text(json.dumps(results, indent=2))
        print(markdown(results))
        return
    common = ["--calib-samples", str(args.calib_samples), *args.extra.split()]
    for name in args.rows.split(","):
        if name in results:
            continue
        print(f"== {name}", flush=True)
        row: dict = {}
        target = args.model
        if name != "dense":
            target = str(out / name)
            if not (out / name / "report.json").is_file():
                row["compile"] = measured_compile([args.model, "-o", target, "--overwrite", *common, *compile_args(name)])
            rep = json.loads((out / name / "report.json").read_text())
            row["params"] = rep["params"]
            row["calibration"] = rep["plan"]["calibration"]
            row["compile_seconds_report"] = rep["seconds"]["total"]
        r = run_eval(target, ppl=None if args.ppl == "none" else args.ppl, seq_len=args.seq_len,
                     max_tokens=args.max_tokens, chat=PROMPT_SETS[args.prompts], chat_tokens=args.chat_tokens)
        row["eval"] = r
        results[name] = row
        results_path.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def rescore(results: dict, model: str) -> None:
    """'answered' depends only on the answer text and the prompt's template: re-judge stored answers."""
    from slimc import chat
    from slimc.load import load_model

    tokenizer = load_model(model).tokenizer
    for row in results.values():
        c = row["eval"]["chat"]
        for a in c["answers"]:
            a["answered"] = chat.is_answer(a["answer"], chat.echo_grams(tokenizer, [{"role": "user", "content": a["prompt"]}]))
        c["answered"] = sum(a["answered"] for a in c["answers"]) / len(c["answers"])


def markdown(results: dict) -> str:
    dense = results.get("dense", {}).get("eval", {})
    lines = ["| row | block params removed | calibration windows (plain + chat) | PPL | PPL / dense | "
             "NLL of dense answers | Δ NLL vs dense | answered | agreement (ROUGE-L) | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in results.items():
        e, c = row["eval"], row["eval"].get("chat", {})
        cal = row.get("calibration", {})
        windows = f"{cal.get('samples', 0)} + {cal.get('chat', {}).get('windows', 0)}" if cal else ""
        removed = f"{row['params']['blocks_reduction']:.1%}" if "params" in row else "0"
        ppl = f"{e['ppl']:.2f}" if "ppl" in e else ""
        ratio = f"{e['ppl'] / dense['ppl']:.3f}" if "ppl" in e and "ppl" in dense else ""
        dnll = f"{c['nll'] - dense['chat']['nll']:+.3f}" if c and dense.get("chat") else ""
        comp = row.get("compile", {}).get("wall_s") or row.get("compile_seconds_report")
        lines.append(f"| {name} | {removed} | {windows} | {ppl} | {ratio} | {c.get('nll', 0):.3f} | {dnll} | "
                     f"{c.get('answered', 0):.1%} | {c.get('agreement', 0):.3f} | {comp or 0:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
