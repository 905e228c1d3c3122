"""Wanda-sp and FLAP inside slimc: the same block loop, plan, materialization and exports as SlimGPT, with the
units chosen by calibration statistics instead of OBS (scores in `slimc.scores`).

wanda-sp: per block, on the (already pruned) stream, the |W| * ||X|| score of o_proj / down_proj columns picks
the heads and channels to keep at the plan's widths; no weight update.
flap: one pass over the dense model collects every block's input mean and variance of o_proj / down_proj
(FLAP computes its statistics on the dense stream); the global adaptive search over standardized
fluctuation scores decides each layer's widths; each block then keeps its best units and folds the removed
inputs' mean into an o_proj / down_proj bias (`layer_output_bias` in config.json)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import scores
from .calibrate import BlockInputs, run_block
from .capture import BlockStructure
from .errors import SlimcError
from .passes import ChannelPruneResult, HeadPruneResult, MaterializeChannels, MaterializeHeads
from .passes.materialize import _head_rows, _set
from .passes.prune_heads import head_widths
from .plan import BlockShape, LayerPlan, PruningPlan, TOLERANCE


@dataclass
class BlockStats:
    o_mean: torch.Tensor
    o_var: torch.Tensor
    o_norm: torch.Tensor
    down_mean: torch.Tensor
    down_var: torch.Tensor
    down_norm: torch.Tensor


def collect_stats(block: nn.Module, s: BlockStructure, inputs: BlockInputs, batch_size: int, device,
                  keep_outputs: bool = True) -> tuple[BlockStats, torch.Tensor | None]:
    """Input moments of o_proj and down_proj over every calibration token, in one forward of the block."""
    o = scores.InputMoments(block.get_submodule(s.attention.o))
    down = scores.InputMoments(block.get_submodule(s.mlp.down))
    try:
        out = run_block(block, inputs, batch_size, device, keep_outputs=keep_outputs)
    finally:
        o.handle.remove()
        down.handle.remove()
    return BlockStats(o.mean, o.variance, o.norm, down.mean, down.variance, down.norm), out


def dense_stats(layers, structures, inputs: BlockInputs, batch_size: int, device) -> list[BlockStats]:
    """FLAP's statistics: every block run on the dense model's own stream (inputs are left untouched)."""
    stream = BlockInputs(inputs.hidden, inputs.kwargs)
    stats = []
    for block, s in zip(tqdm(layers, desc="flap statistics", unit="block"), structures):
        block.to(device)
        st, stream.hidden = collect_stats(block, s, stream, batch_size, device)
        stats.append(st)
    return stats


def _head_units(s: BlockStructure, q: int) -> torch.Tensor:
    return torch.arange(q * s.attention.head_dim).view(q, s.attention.head_dim)


def head_and_channel_scores(method: str, block: nn.Module, s: BlockStructure, st: BlockStats):
    """(per query head, per FFN channel) scores of `method` on the block's current weights."""
    W_o = block.get_submodule(s.attention.o).weight.data
    W_down = block.get_submodule(s.mlp.down).weight.data
    q, _ = head_widths(block, s)
    if method == "wanda-sp":
        return (scores.unit_scores(scores.wanda_column_scores(W_o, st.o_norm), _head_units(s, q)),
                scores.wanda_column_scores(W_down, st.down_norm))
    # FLAP: standardized per module (over o_proj's input columns, over the channels), a head = its columns' mean
    o_cols = scores.standardize(scores.fluctuation_scores(W_o, st.o_var))
    return (scores.unit_scores(o_cols, _head_units(s, q), reduce="mean"),
            scores.standardize(scores.fluctuation_scores(W_down, st.down_var)))


def _kept_heads(head_score: torch.Tensor, q: int, kv: int, target: LayerPlan, gqa: str):
    g = q // kv
    if gqa == "groups":  # a unit is a KV head with its query heads
        kept_kv = scores.lowest_units(head_score.view(kv, g).mean(1), kv - target.num_key_value_heads)
        return (kept_kv[:, None] * g + torch.arange(g)).reshape(-1), kept_kv
    kept_q = scores.lowest_units(head_score, q - target.num_attention_heads, partition=torch.arange(q) // g)
    return kept_q, torch.arange(kv)


def _with_bias(linear: nn.Linear, extra: torch.Tensor) -> nn.Linear:
    """`linear` with `extra` added to its bias (a bias is created where it had none)."""
    new = nn.Linear(linear.in_features, linear.out_features, bias=True, device=linear.weight.device,
                    dtype=linear.weight.dtype)
    new.weight.data.copy_(linear.weight.data)
    base = linear.bias.data if linear.bias is not None else torch.zeros_like(new.bias.data)
    new.bias.data.copy_(base + extra.to(base.dtype))
    return new


def _cut_columns(W: torch.Tensor, kept: torch.Tensor, input_mean: torch.Tensor | None):
    """W with the columns not in `kept` zeroed, and (FLAP, given the inputs' mean) the bias that replaces the
    removed inputs by their mean."""
    removed = torch.ones(W.shape[1], dtype=torch.bool)
    removed[kept] = False
    bias = None if input_mean is None else scores.baseline_bias(W, input_mean, removed.nonzero().squeeze(1))
    weight = W.clone()
    weight[:, removed] = 0
    return weight, bias


def prune_block_scored(block, s: BlockStructure, shape: BlockShape, target: LayerPlan, inputs, cfg, timer, device,
                       state: dict) -> tuple[dict, torch.Tensor]:
    """The block pruner of wanda-sp and flap (pipeline.prune_blocks calls it block by block)."""
    a, m = s.attention, s.mlp
    flap = cfg.method == "flap"
    with timer.stage("calibrate"):
        if flap:  # statistics of the dense stream, collected before the plan; outputs for the error only
            st = state["flap_stats"][state["layer"]]
            dense_out = run_block(block, inputs, cfg.batch_size, device)
        else:
            st, dense_out = collect_stats(block, s, inputs, cfg.batch_size, device)
    with timer.stage("prune"):
        head_score, channel_score = head_and_channel_scores(cfg.method, block, s, st)
        q, kv = head_widths(block, s)
        kept_q, kept_kv = _kept_heads(head_score, q, kv, target, cfg.gqa)
        o_weight, o_bias = _cut_columns(block.get_submodule(a.o).weight.data, _head_rows(kept_q, a.head_dim),
                                        st.o_mean if flap else None)
        MaterializeHeads()(block, s, result=HeadPruneResult(kept_q, kept_kv, o_weight, 0.0))
        kept_ch = scores.lowest_units(channel_score, len(channel_score) - target.intermediate_size)
        down_weight, down_bias = _cut_columns(block.get_submodule(m.down).weight.data, kept_ch,
                                              st.down_mean if flap else None)
        MaterializeChannels()(block, s, result=ChannelPruneResult(kept_ch, down_weight, 0.0))
        if flap:  # every FLAP layer carries the two biases (zero where nothing was removed)
            _set(block, a.o, _with_bias(block.get_submodule(a.o), o_bias))
            _set(block, m.down, _with_bias(block.get_submodule(m.down), down_bias))
    with timer.stage("calibrate"):
        out = run_block(block, inputs, cfg.batch_size, device)
    rel = float((out - dense_out).pow(2).sum() / dense_out.pow(2).sum().clamp_min(1e-12))
    q, kv = head_widths(block, s)
    return ({"heads": q, "kv_heads": kv, "ffn": block.get_submodule(m.down).in_features,
             "target_ratio": target.target_ratio, "ratio": target.ratio, "rel_error": rel,
             "attn_obs_error": 0.0, "ffn_obs_error": 0.0, "dense_heads": a.num_heads,
             "dense_ffn": m.intermediate_size}, out)


def flap_plan(shapes: list[BlockShape], stats: list[BlockStats], layers, structures, sparsity: float, gqa: str,
              align_ffn: int, tp: int) -> PruningPlan:
    """FLAP's adaptive structure search: widths of every layer from one global ranking of standardized
    fluctuation scores (heads and channels weighted by the parameters they own), FFN widths rounded to
    multiples of lcm(align_ffn, tp). Each layer's plan counts its two compensation biases."""
    step = math.lcm(align_ffn, tp)
    candidates = []
    for shape, st, block, s in zip(shapes, stats, layers, structures):
        head_score, channel_score = head_and_channel_scores("flap", block, s, st)
        g = shape.num_heads // shape.num_kv_heads
        if gqa == "groups":
            steps = scores.flap_head_steps(head_score.view(shape.num_kv_heads, g).mean(1), None)
            step_params = g * shape.q_head_params + shape.kv_head_params
        else:
            steps = scores.flap_head_steps(head_score, torch.arange(shape.num_heads) // g)
            step_params = shape.num_kv_heads * shape.q_head_params
        candidates.append(scores.LayerCandidates(steps, step_params, channel_score, shape.channel_params))
    dense = sum(sh.params(sh.num_heads, sh.num_kv_heads, sh.intermediate_size) for sh in shapes)
    removed = scores.flap_allocate(candidates, sparsity * dense, min_channels_kept=step)
    layer_plans = []
    for shape, (head_steps, channels) in zip(shapes, removed):
        g = shape.num_heads // shape.num_kv_heads
        if gqa == "groups":
            q, kv = shape.num_heads - head_steps * g, shape.num_kv_heads - head_steps
        else:
            q, kv = shape.num_heads - head_steps * shape.num_kv_heads, shape.num_kv_heads
        if q % tp or not (kv % tp == 0 or tp % kv == 0):
            raise SlimcError(f"--method flap chose {q} query / {kv} KV heads in a layer, not valid for --tp {tp}; "
                             f"use --gqa groups or --tp 1")
        kept = max(step, int(round((shape.intermediate_size - channels) / step)) * step)
        d = shape.params(shape.num_heads, shape.num_kv_heads, shape.intermediate_size)
        params = shape.params(q, kv, kept) + shape.added_output_bias_params
        layer_plans.append(LayerPlan(q, kv, kept, target_ratio=1 - params / d, params=params, dense_params=d,
                                     output_bias=True))
    pruned = sum(lp.params for lp in layer_plans)
    achieved = 1 - pruned / dense
    if abs(achieved - sparsity) > TOLERANCE:
        raise SlimcError(f"--method flap reached {achieved:.1%} instead of {sparsity:.0%} (unit sizes); try a "
                         f"smaller --align-ffn")
    return PruningPlan(sparsity=sparsity, schedule="flap-adaptive", gqa=gqa, align_ffn=align_ffn, tp=tp,
                       layers=layer_plans, block_params_dense=dense, block_params_pruned=pruned)
