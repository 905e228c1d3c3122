"""Choose `--distill-epochs` / `--distill-lr` without recompiling: distil one compiled output several ways.

A compile with `--distill-epochs N` prunes first and distils last, on the same calibration windows; the pruning
does not depend on the distillation settings. So each setting here starts from the same compiled OUT (reloaded
fresh, fp32), rebuilds the windows that OUT's plan records (plain text + chat mix, same seed), distils with
slimc's own `distill()`, and scores perplexity at two windows and the chat metrics — on held-out text and the
probe prompts when choosing; `--ppl` and `--chat` take comma lists, paired in order, to score the same distilled
model on the choosing text and the reported one. The pipeline distils before the output's dtype cast, here after
it: the starting weights differ by that rounding only (fp32 sources such as a GGUF: not at all).

    python benchmarks/distill_sweep.py bench-out/levers-eval/0.3 --settings 1:5e-5,1:2e-4,2:2e-4 \
        --ppl brown-heldout --chat probe --results bench-out/kd/results-heldout.json

    python benchmarks/distill_sweep.py bench-out/levers-eval/0.5+rec --settings 2:2e-4 \
        --ppl brown-heldout,brown --chat probe,eval --results bench-out/kd/results-0.5rec.json

Settings are EPOCHS:LR[:WINDOWS]; `0:0` scores OUT as it is. WINDOWS is `all` (default: the plain and chat
windows, as a compile distils), `chat` (the chat windows only), `all+selfN` (all, plus every window of a larger
self-generated chat set: the dense model's answers to the built-in instructions and to N instructions about
passages of the calibration text, where a compile uses 48) or `all+trainN` (all, plus N windows of fresh text
from the calibration source's train split: Brown's 368 files in no other split). `--save DIR` (one setting only)
keeps the distilled model as a full output — OUT's files with its weights replaced — for `slimc eval --tasks` and
the like; DIR/distilled.json says how it was made (OUT's report and model card describe the model before
distillation).
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


def extra_self_instructions(which: str) -> int | None:
    """N of WINDOWS `all+selfN` (N >= 1), else None."""
    head, _, n = which.partition("+self")
    return int(n) if head == "all" and n.isdigit() and int(n) > 0 else None


def extra_self_windows(plan: dict, dense, dense_key: str, n_derived: int):
    """Windows of a larger self-generated chat set than a compile makes: the built-in calibration instructions
    plus `n_derived` instructions about passages of the calibration text, answered by the dense model (cached
    like the compile's own set), packed as the compile packs its chat windows, all of them."""
    from slimc import chat, data

    calib = plan["calibration"]
    text = data.load_text(calib["source"], "calibration")
    own = chat.self_generated_conversations(dense.model, dense.tokenizer, text, plan["seed"], dense_key,
                                            n_derived=n_derived)
    return chat.pack_windows(dense.tokenizer, own, calib["seq_len"], len(own))


def extra_train_windows(which: str) -> int | None:
    """N of WINDOWS `all+trainN` (N >= 1), else None."""
    head, _, n = which.partition("+train")
    return int(n) if head == "all" and n.isdigit() and int(n) > 0 else None


def train_windows(plan: dict, dense, n: int):
    """`n` windows of fresh text for distillation: the calibration source's train split (Brown: the 368 files in
    none of calibration, evaluation and held-out), seeded, in text order — fewer if it holds fewer, as a compile's
    `--distill-windows` takes them."""
    from slimc import data

    calib = plan["calibration"]
    return data.distillation_windows(dense.tokenizer, calib["source"], n, calib["seq_len"], plan["seed"])


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
        if which not in ("all", "chat") and extra_self_instructions(which) is None and extra_train_windows(which) is None:
            raise argparse.ArgumentTypeError(f"{setting!r}: WINDOWS is all, chat, all+selfN or all+trainN")
        settings.append((setting, epochs, lr, which))
    return settings


def parse_list(choices=None):
    def parse(text: str) -> list[str]:
        items = text.split(",")
        bad = [i for i in items if not i or (choices is not None and i not in choices)]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {sorted(choices)}" if choices else "empty item")
        return items
    return parse


def save(model, out: Path, save_dir: Path, how: dict) -> None:
    """OUT's files with the distilled weights, cast back to OUT's dtype, written beside and renamed into place."""
    import shutil

    from slimc.checkpoint import INDEX_FILE, SINGLE_FILE, write_state
    from slimc.load import read_source_config
    from slimc.materialize import cast_state

    out_dtype = read_source_config(str(out), allow_slimc=True).dtype  # as loading OUT reads it (torch_dtype too)
    tmp = save_dir.with_name(save_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out, tmp, ignore=shutil.ignore_patterns(SINGLE_FILE, INDEX_FILE, "model-*.safetensors"))
    write_state(cast_state(model, out_dtype), tmp)
    (tmp / "distilled.json").write_text(json.dumps(how, indent=2) + "\n")
    tmp.rename(save_dir)
    print(f"== saved the distilled model to {save_dir}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a compiled slimc output (OUT)")
    p.add_argument("--settings", required=True, type=parse_settings, help="comma list of EPOCHS:LR[:WINDOWS]")
    p.add_argument("--ppl", default=["brown-heldout"], type=parse_list(), help="comma list of perplexity texts")
    p.add_argument("--windows", default="512,2048")
    p.add_argument("--max-tokens", type=int, default=32_768)
    p.add_argument("--chat", default=["probe"], type=parse_list(PROMPT_SETS),
                   help=f"comma list of prompt sets ({', '.join(sorted(PROMPT_SETS))}), one per --ppl text")
    p.add_argument("--chat-tokens", type=int, default=128)
    p.add_argument("--results", required=True)
    p.add_argument("--save", metavar="DIR", help="write the distilled model here (one setting only)")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16"],
                   help="the matmuls' dtype while distilling (default: OUT's compile's; float32 for outputs from before "
                        "--compute-dtype existed)")
    args = p.parse_args()
    if len(args.ppl) != len(args.chat):
        p.error("--ppl and --chat pair up: give them the same number of items")
    if args.save and (len(args.settings) != 1 or Path(args.save).exists()):
        p.error("--save takes one setting and a DIR that does not exist yet")

    from slimc import chat, data
    from slimc.calibrate import compute_dtype, resolve_compute_dtype
    from slimc.distill import distill
    from slimc.evaluate import perplexity
    from slimc.exporters.hf import PLAN_FILE
    from slimc.load import load_model, model_fingerprint

    out = Path(args.out)
    plan = json.loads((out / PLAN_FILE).read_text())
    # as the compile of OUT would have distilled (its report's option; before the option: float32)
    dtype_name = args.compute_dtype or json.loads((out / "report.json").read_text())["config"].get("compute_dtype", "float32")
    dense = load_model(plan["source_model"], dtype="float32")
    dense_key = model_fingerprint(dense.model)
    samples, n_plain = calibration_windows(plan, dense, dense_key)
    scorings = []  # (text, prompt set, prompts, the dense answers to them)
    for text, prompt_set in zip(args.ppl, args.chat):
        prompts = chat.chat_prompts(PROMPT_SETS[prompt_set])
        scorings.append((text, prompt_set, prompts,
                         chat.reference_answers(dense.model, dense.tokenizer, prompts, args.chat_tokens, dense_key)))
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    for setting, epochs, lr, which in args.settings:
        train = samples[n_plain:] if which == "chat" else samples
        if extra_self_instructions(which):
            import torch

            train = torch.cat([samples, extra_self_windows(plan, dense, dense_key, extra_self_instructions(which))])
        if extra_train_windows(which):
            import torch

            train = torch.cat([samples, train_windows(plan, dense, extra_train_windows(which))])
        student = load_model(str(out), dtype="float32", allow_slimc=True)
        distilled = None
        if epochs:
            t = time.perf_counter()
            with compute_dtype(resolve_compute_dtype(dtype_name, "cpu")):
                distilled = distill(student.model, dense.model, train, epochs, lr, seed=plan["seed"]).__dict__
            distilled["seconds"] = time.perf_counter() - t
            print(f"== {out.name} {setting}: {distilled}", flush=True)
        student.model.eval()
        for text, prompt_set, prompts, reference in scorings:
            key = f"{out.name} {setting} on {text}/{prompt_set}"
            row: dict = {"out": str(out), "epochs": epochs, "lr": lr, "windows": which, "text": text,
                         "compute_dtype": dtype_name,
                         "prompts": prompt_set, "calibration_windows": list(samples.shape),
                         "distill_windows": list(train.shape)}
            if distilled is not None:
                row["distill"] = distilled
            for w in (int(x) for x in args.windows.split(",")):
                windows = data.eval_windows(student.tokenizer, text, w, args.max_tokens)
                row[f"ppl_{w}"] = perplexity(student.model, windows)["ppl"]
            c = chat.chat_fidelity(student.model, student.tokenizer, prompts, reference, args.chat_tokens)
            row["chat"] = {k: c[k] for k in ("nll", "answered", "agreement")}
            print(f"== {key}: {json.dumps({k: v for k, v in row.items() if k.startswith('ppl') or k == 'chat'})}",
                  flush=True)
            results = {**(json.loads(results_path.read_text()) if results_path.exists() else {}), key: row}
            results_path.write_text(json.dumps(results, indent=2))
        if args.save:  # after scoring: the cast to OUT's dtype must not change the figures above
            save(student.model, out, Path(args.save), {"from": str(out), "setting": setting, "distill": distilled})
        del student


if __name__ == "__main__":
    main()
