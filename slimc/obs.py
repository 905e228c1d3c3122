"""Optimal Brain Surgeon math for structured pruning — pure tensor functions, no modules, no hooks.

Conventions: a linear layer computes y = x @ W.T with W of shape [out, in]; H = 2/n * X.T @ X over the
layer's calibration inputs X [n, in]. Pruning a set P of *input columns* of W (a head = head_dim columns of
o_proj, a channel = one column of down_proj) costs

    E(P) = sum_rows  W[:, P] @ inv(Hinv[P, P]) @ W[:, P].T          (block OBS)

and the optimal update of the remaining columns is  dW = -W[:, P] @ inv(Hinv[P, P]) @ Hinv[P, :].
Everything runs in float64: the Schur-complement updates lose precision quickly in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import SlimcError


def prepare_hessian(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """float64 copy of H with dead inputs (diag 0) set to 1 and percdamp * mean(diag) added to the diagonal."""
    H = H.detach().to(torch.float64).clone()
    diag = H.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean()
    return H


def without_dead_columns(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """float64 copy of W with the columns of dead inputs (diag H == 0: always zero on the calibration text)
    zeroed. Their weights never act on that text, so removing them is free; left in place, prepare_hessian's
    unit diagonal would score them by their weights' size as if they mattered."""
    W = W.to(torch.float64).clone()
    W[:, H.diagonal() == 0] = 0.0
    return W


def inverse_hessian(H: torch.Tensor, percdamp: float = 0.01, max_tries: int = 6) -> torch.Tensor:
    """Inverse of the damped H via Cholesky. A non-positive-definite H (too few tokens, duplicated inputs)
    is retried with 10x more damping each time instead of failing."""
    damp = percdamp
    for _ in range(max_tries):
        Hd = prepare_hessian(H, damp)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
        damp = max(damp * 10, 1e-4)
    raise SlimcError(
        f"calibration statistics are singular even with damping {damp / 10:g}: use more calibration samples"
    )


def group_errors(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Exact block-OBS error of removing each group of columns, all groups in one batched Cholesky.

    groups: LongTensor [G, k] of column indices. With Hinv[P, P] = L L^T, the error W_P inv(Hinv_PP) W_P^T
    equals ||L^{-1} W_P^T||_F^2, so one batched Cholesky plus one batched triangular solve scores every group
    as a whole (the "grouped Cholesky" of SlimGPT)."""
    W = W.to(torch.float64)
    blocks = Hinv[groups[:, :, None], groups[:, None, :]]  # [G, k, k]
    L = torch.linalg.cholesky(blocks)
    Wp = W[:, groups].permute(1, 2, 0)  # [G, k, out]
    Z = torch.linalg.solve_triangular(L, Wp, upper=False)
    return Z.pow(2).sum(dim=(1, 2))


def column_errors(W: torch.Tensor, Hinv: torch.Tensor) -> torch.Tensor:
    """Independent single-column OBS errors sum_rows W[:, p]^2 / Hinv[p, p] for every column p."""
    return W.to(torch.float64).pow(2).sum(0) / Hinv.diagonal()


def _alive_column_errors(W: torch.Tensor, Hinv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """column_errors of the columns idx, reading only Hinv's diagonal (no copy of the remaining block)."""
    return W[:, idx].to(torch.float64).pow(2).sum(0) / Hinv.diagonal()[idx]


def summed_column_errors(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Ablation score: a group's error as the sum of its columns' independent errors (ignores correlations)."""
    return column_errors(W, Hinv)[groups].sum(1)


def obs_remove(W: torch.Tensor, Hinv: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove columns `cols` jointly: returns (W with the optimal update applied and cols zeroed, Hinv of
    the remaining columns). Hinv keeps its size: removed rows/columns become identity so they never
    influence later removals (their W columns are zero)."""
    W = W.to(torch.float64)
    Hpp_inv = torch.linalg.inv(Hinv[cols][:, cols])
    Hp = Hinv[cols]  # [k, in]
    W = W - (W[:, cols] @ Hpp_inv) @ Hp
    Hinv = Hinv - Hp.T @ Hpp_inv @ Hp  # Schur complement = inverse of H restricted to the remaining columns
    W[:, cols] = 0.0
    Hinv[cols, :] = 0.0
    Hinv[:, cols] = 0.0
    Hinv[cols, cols] = 1.0
    return W, Hinv


@dataclass
class PruneResult:
    """Outcome of pruning the input columns of one weight: which units/columns survive, and the weight."""

    kept: torch.Tensor  # sorted indices of kept units (heads/groups) or columns
    weight: torch.Tensor  # full-width weight, pruned columns zeroed, compensated unless asked otherwise
    removal_order: list[int]
    error: float  # accumulated OBS error of the removals (in units of H, i.e. 2/n * squared error)
    step_errors: list[float] = field(default_factory=list)  # the joint error each greedy round added


def prune_units_greedy(
    W: torch.Tensor,
    H: torch.Tensor,
    units: torch.Tensor,
    n_remove: int,
    partition: torch.Tensor | None = None,
    batch: int = 1,
    score: str = "grouped",
    compensate: bool = True,
    percdamp: float = 0.01,
    sequential: bool = False,
) -> PruneResult:
    """Batched greedy removal of whole column units (attention heads or GQA groups), SlimGPT style.

    units: LongTensor [U, k], the columns each unit owns. Each round scores every remaining unit by its exact
    block-OBS error (score="grouped") or by the sum of independent column errors (score="column", the
    ablation), removes the `batch` cheapest jointly with the OBS update, and re-scores.
    partition: optional LongTensor [U] (e.g. the KV group of each query head). When given, every round removes
    the cheapest unit of *each* partition, so all partitions shrink evenly (per-layer q % kv == 0), and
    n_remove must be a multiple of the number of partitions. sequential=True removes one unit per round instead:
    the cheapest among the partitions that still owe a removal, then re-scores -- correlated units in different
    partitions are then never removed together on scores each computed as if the other stayed.
    """
    n_units = units.shape[0]
    if not 0 <= n_remove < n_units:
        raise ValueError(f"cannot remove {n_remove} of {n_units} units")
    owed = None
    if partition is not None:
        parts_all = partition.unique()
        if n_remove % len(parts_all):
            raise ValueError(f"{n_remove} removals do not split evenly over {len(parts_all)} partitions")
        owed = {int(p): n_remove // len(parts_all) for p in parts_all}
    Hinv = inverse_hessian(H, percdamp)
    Wc = without_dead_columns(W, H)
    alive = torch.ones(n_units, dtype=torch.bool)
    order: list[int] = []
    steps: list[float] = []
    total_error = 0.0
    scorer = group_errors if score == "grouped" else summed_column_errors
    if score not in ("grouped", "column"):
        raise ValueError(f"unknown head score {score!r}")
    while len(order) < n_remove:
        idx = alive.nonzero().squeeze(1)
        err = scorer(Wc, Hinv, units[idx])
        if partition is None:
            take = err.argsort()[: min(batch, n_remove - len(order))]
            chosen = idx[take]
        elif sequential:
            parts = partition[idx]
            owing = torch.tensor([owed[int(p)] > 0 for p in parts])
            best = err.masked_fill(~owing, float("inf")).argmin()
            chosen = idx[best].reshape(1)
            owed[int(parts[best])] -= 1
        else:
            parts = partition[idx]
            chosen = torch.stack([idx[parts == p][err[parts == p].argmin()] for p in parts.unique()])
        cols = units[chosen].reshape(-1)
        # the joint error of the chosen set (not the sum of their separate errors) is what the update costs
        steps.append(float(group_errors(Wc, Hinv, cols[None])[0]))
        total_error += steps[-1]
        Wc, Hinv = obs_remove(Wc, Hinv, cols)
        alive[chosen] = False
        order.extend(int(c) for c in chosen)
    kept = alive.nonzero().squeeze(1)
    weight = _finish(W, Wc, units[~alive].reshape(-1), compensate)
    return PruneResult(kept=kept, weight=weight, removal_order=order, error=total_error, step_errors=steps)


def dynamic_group_sizes(n_remove: int, max_group: int = 1024, min_group: int = 8) -> list[int]:
    """Group sizes for FFN channel pruning: about half of what is left per step, capped to
    [min_group, max_group], so early steps are large (fast) and late ones small (accurate)."""
    sizes, left = [], n_remove
    while left > 0:
        s = min(left, max(min_group, min(max_group, math.ceil(left / 2))))
        sizes.append(s)
        left -= s
    return sizes


def prune_columns_dynamic(
    W: torch.Tensor,
    H: torch.Tensor,
    n_remove: int,
    max_group: int = 1024,
    min_group: int = 8,
    compensate: bool = True,
    percdamp: float = 0.01,
) -> PruneResult:
    """SlimGPT FFN pruning: remove n_remove columns in groups of shrinking size; each group is the cheapest
    columns by single-column OBS error under the current (already compensated) W and Hinv, removed jointly."""
    n_cols = W.shape[1]
    if not 0 <= n_remove < n_cols:
        raise ValueError(f"cannot remove {n_remove} of {n_cols} columns")
    Hinv = inverse_hessian(H, percdamp)
    Wc = without_dead_columns(W, H)
    alive = torch.ones(n_cols, dtype=torch.bool)
    order: list[int] = []
    total_error = 0.0
    for size in dynamic_group_sizes(n_remove, max_group, min_group):
        idx = alive.nonzero().squeeze(1)
        cols = idx[_alive_column_errors(Wc, Hinv, idx).argsort()[:size]]
        total_error += float(group_errors(Wc, Hinv, cols[None])[0])
        Wc, Hinv = obs_remove(Wc, Hinv, cols)
        alive[cols] = False
        order.extend(int(c) for c in cols)
    weight = _finish(W, Wc, (~alive).nonzero().squeeze(1), compensate)
    return PruneResult(kept=alive.nonzero().squeeze(1), weight=weight, removal_order=order, error=total_error)


def greedy_column_curve(W: torch.Tensor, H: torch.Tensor, n_remove: int, step: int = 8,
                        percdamp: float = 0.01) -> torch.Tensor:
    """Marginal error of removing W's input columns one after another along the OBS greedy path (`step` columns
    per round, each round the cheapest under the already compensated W and Hinv, removed jointly): entry k is
    the error column k adds, its round's joint error shared evenly by the round's columns.

    Unlike the sum of independent single-column errors, this counts what compensation can no longer recover
    once correlated columns are gone too -- the difference between a mild and a ruinous curve when most of a
    projection's inputs go."""
    if not 0 <= n_remove < W.shape[1]:
        raise ValueError(f"cannot remove {n_remove} of {W.shape[1]} columns")
    Hinv = inverse_hessian(H, percdamp)
    Wc = without_dead_columns(W, H)
    alive = torch.ones(W.shape[1], dtype=torch.bool)
    curve = []
    while len(curve) < n_remove:
        idx = alive.nonzero().squeeze(1)
        size = min(step, n_remove - len(curve))
        cols = idx[_alive_column_errors(Wc, Hinv, idx).argsort()[:size]]
        err = float(group_errors(Wc, Hinv, cols[None])[0])
        Wc, Hinv = obs_remove(Wc, Hinv, cols)
        alive[cols] = False
        curve += [err / size] * size
    return torch.tensor(curve, dtype=torch.float64)


def remove_columns(W: torch.Tensor, H: torch.Tensor, kept: torch.Tensor, percdamp: float = 0.01,
                   compensate: bool = True) -> PruneResult:
    """Remove every column of W not in `kept` (a selection made elsewhere -- learned masks), jointly, with the
    least-squares compensation of the kept columns under H; the error is the joint block-OBS error."""
    removed = torch.ones(W.shape[1], dtype=torch.bool)
    removed[kept] = False
    cols = removed.nonzero().squeeze(1)
    kept = kept.sort().values
    if len(cols) == 0:
        return PruneResult(kept, W.clone(), [], 0.0)
    Hinv = inverse_hessian(H, percdamp)
    Wd = without_dead_columns(W, H)
    error = float(group_errors(Wd, Hinv, cols[None])[0])
    updated, _ = obs_remove(Wd, Hinv, cols)
    return PruneResult(kept, _finish(W, updated, cols, compensate), cols.tolist(), error)


def _finish(W: torch.Tensor, W_updated: torch.Tensor, removed_cols: torch.Tensor, compensate: bool) -> torch.Tensor:
    """The output weight in W's dtype: the OBS-updated one, or (ablation) the original with columns zeroed."""
    out = W_updated.to(W.dtype) if compensate else W.clone()
    out[:, removed_cols] = 0
    return out


def magnitude_scores(producer_rows: list[torch.Tensor], consumer_cols: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Baseline importance: L2 norm of all weights a unit owns (its rows in the producer linears and its
    columns in the consumer linear). units: [U, k] indices into the consumer's columns / producers' rows."""
    sq = consumer_cols.to(torch.float64).pow(2).sum(0)
    for rows in producer_rows:
        sq = sq + rows.to(torch.float64).pow(2).sum(1)
    return sq[units].sum(1).sqrt()
