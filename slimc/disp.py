"""DISP-LLM without training: how much of each block goes where, scored from calibration statistics.

Pure tensor math (no modules, no hooks), conventions as in `slimc.obs` (W is [out, in], H = 2/n X^T X of the
linear's input). A block has up to six prunable sites:

  attn_in   hidden dims read by q/k/v      a column of the stacked [q; k; v], OBS-compensated
  attn_out  hidden dims written by o_proj  a row of o_proj: nothing in the layer can compensate it
  mlp_in    hidden dims read by gate/up    a column of the stacked [gate; up], OBS-compensated
  mlp_out   hidden dims written by down    a row of down_proj
  heads     query heads (slimgpt+disp)     o_proj columns, grouped OBS (as SlimGPT)
  channels  FFN channels (slimgpt+disp)    down_proj columns, OBS

Each site gets an error curve: the error each further unit adds along the site's greedy OBS path (joint
errors with compensation, so a curve turns steep once compensation runs out of correlated inputs; output rows
are independent and exact). All curves are in one currency, squared error written into the residual stream over the calibration tokens: heads,
channels and output rows already are; a read site's error is in its projections' outputs, so it is scaled by
(sublayer output energy / projection output energy), i.e. a relative error in what the sublayer reads is taken
to cost the same relative error in what it writes. `allocate` then removes, one unit at a time, whichever
site's next unit costs the least error per parameter, until the block's parameter target is met.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import obs
from .errors import SlimcError
from .plan import BlockShape

MIN_DIMS = 8  # a block keeps at least this many hidden dims in each index set
SITES = ("attn_in", "attn_out", "mlp_in", "mlp_out", "heads", "channels")


def row_energies(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Squared output of each row of W over the calibration inputs (w_j H w_j^T): what dropping the row costs."""
    W = W.to(torch.float64)
    return ((W @ H.to(torch.float64)) * W).sum(1)


def output_energy(W: torch.Tensor, H: torch.Tensor) -> float:
    return float(row_energies(W, H).sum())


def head_unit_errors(W_o: torch.Tensor, H_o: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int,
                     gqa: str, percdamp: float = 0.01) -> torch.Tensor:
    """Errors of removing head units from o_proj one after another, SlimGPT's grouped greedy path: gqa="query" ->
    a unit is one query head from every KV group; "groups" -> a unit is one KV group (the last one stays)."""
    cols = torch.arange(num_heads * head_dim).view(num_heads, head_dim)
    g = num_heads // num_kv_heads
    if gqa == "groups":
        units, partition, n = cols.view(num_kv_heads, g * head_dim), None, num_kv_heads - 1
    else:
        units, partition, n = cols, torch.arange(num_heads) // g, num_heads - num_kv_heads
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    r = obs.prune_units_greedy(W_o, H_o, units, n, partition=partition, percdamp=percdamp)
    return torch.tensor(r.step_errors, dtype=torch.float64)


@dataclass
class BlockCounts:
    """What a block keeps: query heads, KV heads, FFN width and the four hidden-dim counts."""

    q: int
    kv: int
    inter: int
    attn_in: int
    attn_out: int
    mlp_in: int
    mlp_out: int

    def params(self, shape: BlockShape) -> int:
        return shape.disp_params(self.q, self.kv, self.inter, self.attn_in, self.attn_out, self.mlp_in, self.mlp_out)


def dense_counts(shape: BlockShape) -> BlockCounts:
    h = shape.hidden_size
    return BlockCounts(shape.num_heads, shape.num_kv_heads, shape.intermediate_size, h, h, h, h)


def _shrink(c: BlockCounts, site: str, shape: BlockShape, gqa: str, step: int) -> BlockCounts | None:
    """Counts with one more unit of `site` removed, or None when the site is at its minimum."""
    d = dict(c.__dict__)
    if site == "heads":
        g = shape.num_heads // shape.num_kv_heads
        if gqa == "groups":
            if c.kv <= 1:
                return None
            d["kv"], d["q"] = c.kv - 1, c.q - g
        else:
            if c.q // c.kv <= 1:
                return None
            d["q"] = c.q - c.kv
    elif site == "channels":
        if c.inter - step < step:
            return None
        d["inter"] = c.inter - step
    else:
        if c.__dict__[site] <= max(1, min(MIN_DIMS, shape.hidden_size // 2)):
            return None
        d[site] -= 1
    return BlockCounts(**d)


def max_removable(shape: BlockShape, sites: tuple[str, ...], gqa: str = "query", step: int = 1) -> int:
    """Parameters removed when every site in `sites` is at its minimum."""
    c = dense_counts(shape)
    for site in sites:
        while (nxt := _shrink(c, site, shape, gqa, step)) is not None:
            c = nxt
    return dense_counts(shape).params(shape) - c.params(shape)


def allocate(shape: BlockShape, curves: dict[str, torch.Tensor], target_removed: float, gqa: str = "query",
             step: int = 1) -> BlockCounts:
    """Greedy: remove the unit with the least error per parameter until `target_removed` parameters are gone.

    curves: site -> ascending per-unit errors (sites absent are not pruned). The last unit is taken only when
    that lands closer to the target than stopping short."""
    c = dense_counts(shape)
    dense = c.params(shape)
    taken = {site: 0 for site in curves}
    while True:
        removed = dense - c.params(shape)
        best, exhausted = None, True
        for site, errs in curves.items():
            if taken[site] >= len(errs) or (nxt := _shrink(c, site, shape, gqa, step)) is None:
                continue
            exhausted = False
            saved = c.params(shape) - nxt.params(shape)
            if removed + saved / 2 > target_removed:  # this unit would overshoot more than it fills
                continue
            cost = float(errs[taken[site]]) / max(saved, 1)
            if best is None or cost < best[0]:
                best = (cost, site, nxt)
        if best is None:
            if exhausted and removed < target_removed - 0.01 * dense:
                raise SlimcError(f"a block cannot lose {target_removed / dense:.0%} of its parameters through "
                                 f"{', '.join(curves)}: that needs more hidden dims than the block has")
            return c
        _, site, c = best
        taken[site] += 1


def site_curves(W_qkv, H_attn_in, attn_out_energy, W_gu, H_mlp_in, mlp_out_energy, heads: tuple | None = None,
                channels: tuple | None = None, percdamp: float = 0.01, dim_step: int = 16,
                channel_step: int = 32) -> dict[str, torch.Tensor]:
    """Per-unit error curves of a dense block's sites, in removal order, all in residual-stream error (module doc).

    *_out_energy: per-row output energy of o_proj / down_proj (H's units). Read dims follow the OBS greedy path
    (`obs.greedy_column_curve`, `dim_step` columns a round; FFN channels `channel_step`), write rows are exact.
    The read curves' scale is a proxy (sublayer output energy / projection output energy); the pipeline replaces
    it by a measured one (`pipeline._measure_read_curves`).
    heads: (W_o, H_o, num_heads, num_kv_heads, head_dim, gqa) adds the heads site (SlimGPT's grouped greedy);
    channels: (W_down, H_down, step) the FFN-channel site, in units of `step` channels (slimgpt+disp)."""
    hidden = W_qkv.shape[1]
    attn_scale = float(attn_out_energy.sum()) / max(output_energy(W_qkv, H_attn_in), 1e-30)
    mlp_scale = float(mlp_out_energy.sum()) / max(output_energy(W_gu, H_mlp_in), 1e-30)
    n_dims = hidden - MIN_DIMS
    curves = {
        "attn_in": obs.greedy_column_curve(W_qkv, H_attn_in, n_dims, dim_step, percdamp) * attn_scale,
        "attn_out": attn_out_energy.to(torch.float64).sort().values,
        "mlp_in": obs.greedy_column_curve(W_gu, H_mlp_in, n_dims, dim_step, percdamp) * mlp_scale,
        "mlp_out": mlp_out_energy.to(torch.float64).sort().values,
    }
    if heads is not None:
        curves["heads"] = head_unit_errors(*heads, percdamp=percdamp)
    if channels is not None:
        W_down, H_down, step = channels
        curve = obs.greedy_column_curve(W_down, H_down, W_down.shape[1] - step, max(step, channel_step), percdamp)
        curves["channels"] = curve[: len(curve) // step * step].view(-1, step).sum(1)
    return curves


def method_sites(method: str) -> tuple[str, ...]:
    return SITES if method == "slimgpt+disp" else SITES[:4]


def solve_disp_plan(shapes: list[BlockShape], sparsity: float, schedule: str, method: str, gqa: str = "query",
                    step: int = 1):
    """Per-layer parameter targets for a DISP method: the schedule's shape, each layer capped at what its sites
    can remove, scaled so the blocks lose `sparsity` of their parameters. Widths are decided per block during
    calibration (`allocate`), so the layers start dense and are filled in as blocks are pruned."""
    from .plan import MAX_LAYER_RATIO, LayerPlan, PruningPlan, schedule_ratios

    sites = method_sites(method)
    dense = [s.params(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes]
    caps = [min(MAX_LAYER_RATIO, max_removable(s, sites, gqa, step) / d) for s, d in zip(shapes, dense)]
    total = sum(dense)

    def ratios(scale):
        return [min(r, cap) for r, cap in zip(schedule_ratios(schedule, len(shapes), scale), caps)]

    def removed(scale):
        return sum(r * d for r, d in zip(ratios(scale), dense)) / total

    if removed(1.0) < sparsity - 1e-9:
        raise SlimcError(f"sparsity {sparsity:.0%} needs more hidden dims than the blocks have: --method {method} "
                         f"can remove at most {removed(1.0):.1%} of the block parameters (each block keeps "
                         f"{MIN_DIMS} dims per index set)")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if removed(mid) < sparsity else (lo, mid)
    layers = [LayerPlan(s.num_heads, s.num_kv_heads, s.intermediate_size, target_ratio=r, params=round(d * (1 - r)),
                        dense_params=d) for s, r, d in zip(shapes, ratios(hi), dense)]
    return PruningPlan(sparsity=sparsity, schedule=schedule, gqa=gqa, align_ffn=step, tp=1, layers=layers,
                       block_params_dense=total, block_params_pruned=sum(layer.params for layer in layers), scale=hi)
