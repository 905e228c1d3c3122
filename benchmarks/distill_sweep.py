"""Choose `--distill-epochs` / `--distill-lr` without recompiling: distil one compiled output several ways.

A compile with `--distill-epochs N` prunes first and distils last, on the same calibration windows; the pruning
does not depend on the distillation settings. So each setting here starts from the same compiled OUT (reloaded
fresh, fp32), rebuilds the windows that OUT's plan records (plain text + chat mix, same seed), distils with
slimc's own `distill()`, and scores perplexity at two windows and the chat metrics — on held-out text and the
probe prompts when choosing. The pipeline distils before the output's dtype cast, here after it: the starting
weights differ by that rounding only (fp32 sources such as a GGUF: not at all).

    python benchmarks/distill_sweep.py bench-out/levers-eval/0.3 --settings 1:5e-5,1:2e-4,2:2e-4 \
        --ppl brown-heldout --chat probe --results bench-out/kd/results-heldout.json

Settings are EPOCHS:LR[:WINDOWS]; `0:0` scores OUT as it is. WINDOWS is `all` (default: the plain and chat
windows, as a compile distils) or `chat` (the chat windows only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from chat import PROMPT_SETS  # noqa: E402


def calibration_windows(plan: dict, dense, dense_key: str):
    """The [n, seq_len] windows the compile of this plan calibrated (and would distil) on, and how many of the
    first are plain text (the chat windows follow)."""
    import torch

    from slimc import chat, data

    calib = plan["calibration"]
    samples = data.calibration_samples(dense.tokenizer, calib["source"], calib["samples"], calib["seq_len"],
                                       plan["seed"], strict=False)
    mix = calib.get("chat")
    if mix:
        windows, info = chat.calibration_windows(dense.model, dense.tokenizer, calib["source"], samples.shape[0],
                                                 calib["seq_len"], plan["seed"], mix["mix"], mix["kind"], dense_key)
        if info != mix:  # the compile's own record of its chat windows: anything else is not the same calibration
            raise SystemExit(f"rebuilt chat windows {info} differ from the plan's {mix}")
        return torch.cat([samples, windows]), samples.shape[0]
    return samples, samples.shape[0]


def parse_settings(text: str) -> list[tuple[str, int, float, str]]:
    """`EPOCHS:LR[:WINDOWS],…` -> (setting, epochs, lr, windows) each, checked before minutes of loading."""
    settings = []
    for setting in text.split(","):
        parts = setting.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            epochs, lr = int(parts[0]), float(parts[1])
        except ValueError:
            raise argparse.ArgumentTypeError(f"{setting!r} is not EPOCHS:LR[:WINDOWS]") from None
        which = parts[2] if len(parts) == 3 else "all"
        if which not in ("all", "chat"):
            raise argparse.ArgumentTypeError(f"{setting!r}: WINDOWS is all or chat")
        settings.append((setting, epochs, lr, which))
    return settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a compiled slimc output (OUT)")
    p.add_argument("--settings", required=True, type=parse_settings, help="comma list of EPOCHS:LR[:WINDOWS]")
    p.add_argument("--ppl", default="brown-heldout")
    p.add_argument("--windows", default="512,2048")
    p.add_argument("--max-tokens", type=int, default=32_768)
    p.add_argument("--chat", choices=sorted(PROMPT_SETS), default="probe")
    p.add_argument("--chat-tokens", type=int, default=128)
    p.add_argument("--results", required=True)
    args = p.parse_args()

    from slimc import chat, data
    from slimc.distill import distill
    from slimc.evaluate import perplexity
    from slimc.exporters.hf import PLAN_FILE
    from slimc.load import load_model, model_fingerprint

    out = Path(args.out)
    plan = json.loads((out / PLAN_FILE).read_text())
    dense = load_model(plan["source_model"], dtype="float32")
    dense_key = model_fingerprint(dense.model)
    samples, n_plain = calibration_windows(plan, dense, dense_key)
    prompts = chat.chat_prompts(PROMPT_SETS[args.chat])
    reference = chat.reference_answers(dense.model, dense.tokenizer, prompts, args.chat_tokens, dense_key)
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for setting, epochs, lr, which in args.settings:
        train = samples[n_plain:] if which == "chat" else samples
        key = f"{out.name} {setting}"
        row: dict = {"out": str(out), "epochs": epochs, "lr": lr, "windows": which, "text": args.ppl,
                     "prompts": args.chat, "calibration_windows": list(samples.shape),
                     "distill_windows": list(train.shape)}
        student = load_model(str(out), dtype="float32", allow_slimc=True)
        if epochs:
            t = time.perf_counter()
            row["distill"] = distill(student.model, dense.model, train, epochs, lr, seed=plan["seed"]).__dict__
            row["distill"]["seconds"] = time.perf_counter() - t
            print(f"== {key}: {row['distill']}", flush=True)
        student.model.eval()
        for w in (int(x) for x in args.windows.split(",")):
            windows = data.eval_windows(student.tokenizer, args.ppl, w, args.max_tokens)
            row[f"ppl_{w}"] = perplexity(student.model, windows)["ppl"]
        c = chat.chat_fidelity(student.model, student.tokenizer, prompts, reference, args.chat_tokens)
        row["chat"] = {k: c[k] for k in ("nll", "answered", "agreement")}
        print(f"== {key}: {json.dumps({k: v for k, v in row.items() if k.startswith('ppl') or k == 'chat'})}", flush=True)
        results = {**(json.loads(results_path.read_text()) if results_path.exists() else {}), key: row}
        results_path.write_text(json.dumps(results, indent=2))
        del student


if __name__ == "__main__":
    main()
