"""The compile report: per-layer table, parameter counts, stage times, a greedy sample; JSON + PNG."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .plan import PruningPlan

SAMPLE_PROMPT = "The history of the city begins"


@torch.no_grad()
def greedy_sample(model, tokenizer, prompt: str = SAMPLE_PROMPT, new_tokens: int = 24) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def build_report(cfg, plan: PruningPlan, rows: list[dict], params_before: int, params_after: int,
                 seconds: dict, sample: str) -> dict:
    return {
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
        "sample": sample,
    }


def format_plan(plan: PruningPlan) -> str:
    lines = [f"plan: {plan.schedule} schedule, gqa={plan.gqa}, target {plan.sparsity:.1%}, "
             f"achieved {plan.achieved_sparsity:.2%} of decoder-block parameters",
             f"{'layer':>5} {'heads':>6} {'kv':>4} {'ffn':>6} {'target':>7} {'ratio':>7}"]
    for i, l in enumerate(plan.layers):
        lines.append(f"{i:>5} {l.num_attention_heads:>6} {l.num_key_value_heads:>4} {l.intermediate_size:>6} "
                     f"{l.target_ratio:>7.3f} {l.ratio:>7.3f}")
    return "\n".join(lines)


def format_report(r: dict) -> str:
    p = r["params"]
    lines = [f"{'layer':>5} {'heads':>6} {'kv':>4} {'ffn':>6} {'ratio':>7} {'rel.err':>9}"]
    for row in r["layers"]:
        lines.append(f"{row['layer']:>5} {row['heads']:>6} {row['kv_heads']:>4} {row['ffn']:>6} "
                     f"{row['ratio']:>7.3f} {row['rel_error']:>9.4f}")
    lines += [
        f"decoder-block params: {p['blocks_before']:,} -> {p['blocks_after']:,} "
        f"({p['blocks_reduction']:.2%} removed; target {r['plan']['sparsity']:.1%})",
        f"whole-model params:   {p['model_before']:,} -> {p['model_after']:,} ({p['model_reduction']:.2%} removed)",
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["seconds"].items()),
        f"sample: {r['sample']!r}",
    ]
    return "\n".join(lines)


def write_report(r: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(r, indent=2))
    plot_widths(r, out_dir / "widths.png")


def plot_widths(r: dict, path: Path) -> None:
    """Per-layer kept fraction of heads and FFN channels, and the layer's parameter ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, plan = r["layers"], r["plan"]
    layers = [row["layer"] for row in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, [row["heads"] / row["dense_heads"] for row in rows], "o-", label="query heads kept")
    ax.plot(layers, [row["ffn"] / row["dense_ffn"] for row in rows], "s-", label="FFN channels kept")
    ax.plot(layers, [1 - row["ratio"] for row in rows], "--", label="block params kept")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"slimc {plan['method']} {plan['schedule']} schedule, {plan['achieved_sparsity']:.1%} of block params removed")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
