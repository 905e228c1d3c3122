"""`--schedule measured`: what every layer's heads and FFN channels cost at every width, measured on the dense
model's own stream before anything is cut, then one budget split over all of them (`slimc.allocate`).

A block's curves come from OBS greedy paths like the ones its pruning follows: the head curve from o_proj's
Hessian (one plan unit per round: a KV group, or one query head from every group), the channel curve from
down_proj's. Both are errors added to the residual stream. An error's size alone says little about what it
costs: the same squared error is harmless in one layer and ruinous in another, and dividing by the stream's
energy misleads worse (a few outlier dims dominate SmolLM2's stream from layer 2 on, which made half the
layers look free). So each output dim's error is weighted by the diagonal Fisher information of the stream
at that point -- the mean squared gradient of the language-model loss with respect to o_proj's / down_proj's
output, from a backward pass of the dense model on a few calibration windows. Under the usual second-order
view of the loss, sum_d F_d * error_d is the loss increase the error causes, a unit every layer shares.
Scaling W's rows by sqrt(F) before OBS gives exactly that weighted error (OBS treats rows independently).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import obs
from .allocate import CostCurve
from .calibrate import BlockInputs, collect_hessians, run_block
from .capture import BlockStructure
from .plan import BlockShape, tp_ok

CHANNEL_ROUND = 16  # FFN columns removed per greedy round along the channel curve
MIN_FFN_KEPT = 0.05  # a layer keeps at least this share of its FFN channels
FISHER_WINDOWS = 16  # calibration windows of the backward pass that weighs each layer's errors
MEASURE_WINDOWS = 64  # calibration windows whose Hessians give the curves (64 x 512 tokens: plenty for 1536 dims)


@dataclass
class LayerCurves:
    heads: CostCurve  # units: KV groups (gqa groups) or one query head per KV group (gqa query)
    channels: CostCurve


def head_curve(W_o: torch.Tensor, H_o: torch.Tensor, shape: BlockShape, gqa: str, tp: int, sequential: bool,
               percdamp: float) -> CostCurve:
    """Error after removing 0, 1, 2, ... head units along the OBS greedy path (counts tensor parallelism cannot
    split left out)."""
    q, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
    g = q // kv
    head_cols = torch.arange(q * d).view(q, d)
    n_units, unit_q, unit_kv = shape.head_unit(gqa)
    if gqa == "groups":
        units, partition, per_unit = head_cols.view(kv, g * d), None, 1
    else:
        units, partition, per_unit = head_cols, torch.arange(q) // g, kv
    unit_params = unit_q * shape.q_head_params + unit_kv * shape.kv_head_params
    if n_units == 1:
        return CostCurve([0], [0.0], unit_params)
    res = obs.prune_units_greedy(W_o, H_o, units, (n_units - 1) * per_unit, partition=partition,
                                 percdamp=percdamp, sequential=sequential)
    # a round removes one unit (joint) or one head (sequential: a unit is every per_unit-th head)
    heads_removed = 0 if not res.step_errors else len(res.removal_order) // len(res.step_errors)
    cumulative = torch.tensor(res.step_errors, dtype=torch.float64).cumsum(0).tolist()
    errors_at = {0: 0.0}
    for step, err in enumerate(cumulative, start=1):
        removed = step * heads_removed
        if removed % per_unit == 0:
            errors_at[removed // per_unit] = err
    counts = [u for u in range(n_units) if tp_ok(*shape.heads_without(u, gqa), tp)]
    if counts[0] != 0:
        raise ValueError("the dense head count must be valid for the tensor-parallel degree")
    return CostCurve(counts, [errors_at[u] for u in counts], unit_params)


def channel_curve(W_down: torch.Tensor, H_down: torch.Tensor, shape: BlockShape, step: int, percdamp: float) -> CostCurve:
    """Error after removing FFN channels along the OBS greedy path, at every count that leaves a multiple of
    `step` channels (and at least MIN_FFN_KEPT of them)."""
    inter = shape.intermediate_size
    least = max(step, math.ceil(MIN_FFN_KEPT * inter / step) * step)
    counts = [0] + [inter - kept for kept in range((inter // step) * step, least - 1, -step) if kept < inter]
    if len(counts) == 1:
        return CostCurve([0], [0.0], shape.channel_params)
    marginal = obs.greedy_column_curve(W_down, H_down, counts[-1], step=CHANNEL_ROUND, percdamp=percdamp)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), marginal.cumsum(0)])
    return CostCurve(counts, [float(cumulative[c]) for c in counts], shape.channel_params)


def spread(n: int, k: int) -> torch.Tensor:
    """k indices spread evenly over range(n) (the calibration set ends with its chat windows: take from all)."""
    return torch.linspace(0, n - 1, min(n, k)).round().long().unique()


def stream_fisher(model, layers, structures: list[BlockStructure], samples: torch.Tensor,
                  device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block, the diagonal Fisher of the stream where o_proj's and down_proj's outputs join it: the mean
    over tokens of (d loss / d output_j)^2, loss = the summed next-token NLL of each window, dense model."""
    sums = [[None, None] for _ in layers]
    hooks = []

    def catch(i, j):
        def on_output(module, args, output):
            def on_grad(g):
                sq = g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
                sums[i][j] = sq if sums[i][j] is None else sums[i][j] + sq
            output.register_hook(on_grad)
        return on_output

    for i, (block, s) in enumerate(zip(layers, structures)):
        hooks.append(block.get_submodule(s.attention.o).register_forward_hook(catch(i, 0)))
        hooks.append(block.get_submodule(s.mlp.down).register_forward_hook(catch(i, 1)))
    rows = spread(samples.shape[0], FISHER_WINDOWS)
    embed = model.get_input_embeddings()
    home = next(model.parameters()).device  # the compile keeps the model here and moves one block at a time
    model.to(device)
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in trainable:
        p.requires_grad_(False)
    try:
        for r in tqdm(rows.tolist(), desc="loss sensitivity", unit="window"):
            ids = samples[r : r + 1].to(device)
            x = embed(ids).detach().requires_grad_(True)  # the weights need no gradients, the stream does
            logits = model(inputs_embeds=x, use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                     reduction="sum")
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in trainable.items():
            p.requires_grad_(flag)
        model.to(home)
    tokens = len(rows) * samples.shape[1]
    return [(a / tokens, d / tokens) for a, d in sums]


def measure_curves(layers, structures: list[BlockStructure], shapes: list[BlockShape], inputs: BlockInputs,
                   fisher: list[tuple[torch.Tensor, torch.Tensor]], gqa: str, ffn_step: int, tp: int,
                   sequential: bool, percdamp: float, batch_size: int, device) -> list[LayerCurves]:
    """Every block run once on the dense stream (inputs are left untouched): its o_proj and down_proj Hessians
    give its two curves, each output dim's error weighted by the stream's Fisher at that point."""
    stream = BlockInputs(inputs.hidden[spread(inputs.hidden.shape[0], MEASURE_WINDOWS)], inputs.kwargs)
    out = []
    for block, s, shape, (f_attn, f_mlp) in zip(tqdm(layers, desc="measure layer costs", unit="block"), structures,
                                                 shapes, fisher):
        block.to(device)
        lin = block.get_submodule
        with collect_hessians(block, [s.attention.o, s.mlp.down]) as acc:
            stream.hidden = run_block(block, stream, batch_size, device)
        W_o = lin(s.attention.o).weight.data.double() * f_attn.sqrt()[:, None].to(device)
        W_down = lin(s.mlp.down).weight.data.double() * f_mlp.sqrt()[:, None].to(device)
        out.append(LayerCurves(head_curve(W_o, acc[s.attention.o].H, shape, gqa, tp, sequential, percdamp),
                               channel_curve(W_down, acc[s.mlp.down].H, shape, ffn_step, percdamp)))
    return out
