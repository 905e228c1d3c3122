"""The compile report: per-layer table, parameter counts, stage times, greedy samples (plain text and, for a
model with a chat template, a chat turn with the probe's answered share); JSON + PNG + a model card."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .chat import PROBE_MIN_ANSWERED, describe_mix
from .plan import PruningPlan

SAMPLE_PROMPT = "The history of the city begins"


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str = SAMPLE_PROMPT, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def build_report(cfg, plan: PruningPlan, rows: list[dict], params_before: int, params_after: int,
                 seconds: dict, sample: str, chat_probe: dict | None = None, distilled: dict | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> dict:
    report = {
        "config": cfg.to_dict(),
        "plan": plan.to_dict(),
        "layers": rows,
        "params": {
            "model_before": params_before, "model_after": params_after,
            "model_reduction": 1 - params_after / params_before,
            "blocks_before": plan.block_params_dense, "blocks_after": plan.block_params_pruned,
            "blocks_reduction": plan.achieved_sparsity,
        },
        "seconds": seconds,
        "levers": levers(cfg.to_dict(), plan.schedule, rows, seconds, distilled),
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "sample": sample,
        "chat_probe": chat_probe,
    }
    if distilled:
        report["distill"] = distilled
    return report


def distill_setting(cfg: dict, distilled: dict | None) -> str:
    """`--distill-epochs` as it ran: which epoch the held-out windows kept, and the KL it took them to."""
    setting = f"{cfg['distill_epochs']} epochs, lr {cfg['distill_lr']:g}"
    if cfg.get("distill_windows"):
        setting += f", calibration + {cfg['distill_windows']} windows of fresh text"
    if not distilled:
        return setting
    if not distilled["kept"]:
        return f"{setting}; none kept (held-out KL {distilled['kl_before']:.3f} never went down)"
    return (f"{setting}; kept epoch {distilled['best_epoch']} (held-out KL {distilled['kl_before']:.3f} -> "
            f"{distilled['kl_after']:.3f})")


def levers(cfg: dict, schedule: str, rows: list[dict], seconds: dict, distilled: dict | None = None) -> list[dict]:
    """The quality levers of issue 12, each with whether it ran and the seconds its own stage took (levers that
    only change how OBS proceeds have no stage of their own: their cost is inside `prune`)."""
    fits = [row["reconstruct"] for row in rows if "reconstruct" in row]
    refits = [row["refit"] for row in rows if "refit" in row]
    out = [
        {"lever": "schedule", "setting": schedule, "seconds": seconds.get("measure")},
        {"lever": "gqa order", "setting": cfg.get("gqa_order", "joint") if cfg.get("gqa") == "query" else "n/a (groups)"},
        {"lever": "ffn group max", "setting": cfg.get("ffn_group_max")},
        {"lever": "refit", "setting": f"kept in {sum(f['kept'] for f in refits)}/{len(refits)} blocks"
         if cfg.get("refit") else "off", "seconds": seconds.get("refit")},
        {"lever": "reconstruct", "setting": (f"{cfg['reconstruct_epochs']} epochs, lr {cfg['reconstruct_lr']:g}, "
                                             # reports from before --reconstruct-batch stepped on --batch-size
                                             f"{cfg.get('reconstruct_batch') or cfg.get('batch_size')} windows a step, "
                                             f"{cfg.get('reconstruct_weighting', 'energy')}-weighted; kept in "
                                             f"{sum(f['kept'] for f in fits)}/{len(fits)} blocks")
         if cfg.get("reconstruct") else "off", "seconds": seconds.get("reconstruct")},
        {"lever": "distill", "setting": distill_setting(cfg, distilled) if cfg.get("distill_epochs") else "off",
         "seconds": seconds.get("distill")},
    ]
    return out


def levers_line(r: dict) -> str:
    parts = []
    for lever in r.get("levers", []):
        cost = f" ({lever['seconds']:.0f}s)" if lever.get("seconds") else ""
        parts.append(f"{lever['lever']} {lever['setting']}{cost}")
    # the matmuls' dtype changes both the time and (a little) the statistics: said with the levers
    if r.get("compute_dtype", "float32") != "float32":
        parts.append(f"compute {r['compute_dtype']}")
    return "levers: " + ", ".join(parts)


def chat_warning(r: dict) -> str | None:
    probe = r.get("chat_probe")
    if probe and probe["answered"] < PROBE_MIN_ANSWERED:
        n = probe["prompts"]
        return (f"warning: the pruned model answers only {round(probe['answered'] * n)} of {n} built-in chat probe "
                f"prompts (dense instruct models answer all): try a lower --sparsity or calibrate on text in the "
                f"format you serve (README: pruning an instruct model)")
    return None


def format_plan(plan: PruningPlan) -> str:
    lines = [f"plan: {plan.schedule} schedule, gqa={plan.gqa}, target {plan.sparsity:.1%}, "
             f"achieved {plan.achieved_sparsity:.2%} of decoder-block parameters",
             f"{'layer':>5} {'heads':>6} {'kv':>4} {'ffn':>6} {'target':>7} {'ratio':>7}"]
    for i, l in enumerate(plan.layers):
        lines.append(f"{i:>5} {l.num_attention_heads:>6} {l.num_key_value_heads:>4} {l.intermediate_size:>6} "
                     f"{l.target_ratio:>7.3f} {l.ratio:>7.3f}")
    return "\n".join(lines)


DIM_COLUMNS = (("attn_in_dims", "a.in"), ("attn_out_dims", "a.out"), ("mlp_in_dims", "m.in"), ("mlp_out_dims", "m.out"))


def format_report(r: dict) -> str:
    p = r["params"]
    disp = any("attn_in_dims" in row for row in r["layers"])
    dims_head = "".join(f" {title:>6}" for _, title in DIM_COLUMNS) if disp else ""
    lines = [f"{'layer':>5} {'heads':>6} {'kv':>4} {'ffn':>6}{dims_head} {'ratio':>7} {'rel.err':>9} {'peak MB':>8}"]
    for row in r["layers"]:
        dims = "".join(f" {row[key]:>6}" for key, _ in DIM_COLUMNS) if disp else ""
        peak = f"{row['peak_rss_mb']:>8,}" if "peak_rss_mb" in row else f"{'-':>8}"  # rows resumed from older slimc
        lines.append(f"{row['layer']:>5} {row['heads']:>6} {row['kv_heads']:>4} {row['ffn']:>6}{dims} "
                     f"{row['ratio']:>7.3f} {row['rel_error']:>9.4f} {peak}")
    lines += [
        f"decoder-block params: {p['blocks_before']:,} -> {p['blocks_after']:,} "
        f"({p['blocks_reduction']:.2%} removed; target {r['plan']['sparsity']:.1%})",
        f"whole-model params:   {p['model_before']:,} -> {p['model_after']:,} ({p['model_reduction']:.2%} removed)",
        describe_mix(r["plan"].get("calibration", {})),
        levers_line(r),
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items()),
        f"sample: {r['sample']!r}",
    ]
    lines += disp_train_lines(r)
    lines += chat_lines(r)
    warning = chat_warning(r)
    if warning:
        lines.append(warning)
    return "\n".join(lines)


def disp_train_lines(r: dict) -> list[str]:
    t = r.get("disp_train")
    if not t:
        return []
    return [f"disp-train: {t['steps']} steps x {t['window_tokens']} tokens ({t['tokens']:,} tokens) in {t['seconds']:.0f}s; "
            f"loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}; {t['dims_flipped']} hidden-dim choices"
            + (f" and {t['channels_flipped']} FFN-channel choices" if t.get("channels_learned") else "")
            + " changed from the training-free selection"
            + ("; cut as the masks trained them (no compensation)" if t.get("cut") == "masked" else "")]


def chat_lines(r: dict) -> list[str]:
    """The chat sample and the probe's answered share, for the printed report and the model card."""
    probe = r.get("chat_probe")
    if not probe:
        return []
    return [f"chat sample: {probe['sample']['prompt']!r} -> {probe['sample']['answer']!r}",
            f"chat probe: answered {probe['answered']:.0%} of {probe['prompts']} built-in prompts"]


def strict_json(result, indent: int | None = 2) -> str:
    """Strict JSON, which every reader parses (not only Python's): a number that is not finite (a kept share
    with no skilled task, an error lm-eval could not give, a loss that diverged) is written as null."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x

    return json.dumps(finite(result), indent=indent, allow_nan=False)


def write_report(r: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(strict_json(r))
    (out_dir / "README.md").write_text(model_card(r))
    plot_widths(r, out_dir / "widths.png")


def error_windows(r: dict) -> str:
    """Which calibration windows the blocks' errors were measured on (SlimGPT measures on the first few only)."""
    counts = {row.get("rel_error_windows") for row in r["layers"]}
    return f"the first {counts.pop()} calibration windows" if len(counts) == 1 and None not in counts \
        else "the calibration windows"


def model_card(r: dict) -> str:
    """OUT/README.md: what this checkpoint is, how it was made, what was measured at compile time, how to use it."""
    plan, p, cfg = r["plan"], r["params"], r["config"]
    lines = [
        f"# {plan['source_model']}, pruned by slimc ({plan['achieved_sparsity']:.0%} of decoder-block parameters)",
        "",
        f"- source: `{plan['source_model']}`",
        f"- method: {plan['method']}, {plan['schedule']} schedule, gqa={plan['gqa']}, target {plan['sparsity']:.0%}, "
        f"achieved {plan['achieved_sparsity']:.2%} of decoder-block parameters",
        f"- parameters: {p['model_before']:,} -> {p['model_after']:,} ({p['model_reduction']:.1%} fewer in the whole model)",
        f"- {describe_mix(plan.get('calibration', {}))}",
        f"- {levers_line(r)}",
        f"- target runtime: {cfg['target']}; slimc {plan.get('slimc_version', '')}, seed {plan.get('seed', 0)}",
        "",
        "## Measured at compile time",
        "",
        f"- mean relative output error of a block against its dense self on {error_windows(r)}: "
        f"{sum(row['rel_error'] for row in r['layers']) / max(len(r['layers']), 1):.4f}",
        f"- plain-text sample: {r['sample']!r}",
    ]
    lines += [f"- {line}" for line in disp_train_lines(r) + chat_lines(r)]
    warning = chat_warning(r)
    if warning:
        lines += ["", f"**{warning}**"]
    lines += [
        "",
        "Perplexity and chat fidelity against the dense model: `slimc eval DIR --against SOURCE` and "
        "`slimc eval DIR --chat`.",
        "",
        "## Use",
        "",
        "(`DIR`: this directory.)",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)  # per-layer widths: modeling_slimc.py',
        'tokenizer = AutoTokenizer.from_pretrained("DIR")',
        "```",
        "",
        "vLLM, with slimc installed (its `vllm.general_plugins` entry point registers the architecture): "
        "`vllm serve DIR` or `python -m vllm.entrypoints.openai.api_server --model DIR`.",
        "Per-layer widths are in `config.json` and `slimc_plan.json`; the compile report in `report.json`.",
        "",
    ]
    return "\n".join(lines)


def plot_widths(r: dict, path: Path) -> None:
    """Per-layer kept fraction of heads, FFN channels and (DISP) the hidden dims each block reads and writes,
    and the layer's parameter ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, plan = r["layers"], r["plan"]
    layers = [row["layer"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, [row["heads"] / row["dense_heads"] for row in rows], "o-", label="query heads kept")
    ax.plot(layers, [row["ffn"] / row["dense_ffn"] for row in rows], "s-", label="FFN channels kept")
    for (key, title), marker in zip(DIM_COLUMNS, "^v<>"):
        if key in rows[0]:
            ax.plot(layers, [row[key] / row["hidden"] for row in rows], marker + ":", label=f"hidden dims {title}")
    ax.plot(layers, [1 - row["ratio"] for row in rows], "--", label="block params kept")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"slimc {plan['method']} {plan['schedule']} schedule, {plan['achieved_sparsity']:.1%} of block params removed")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
