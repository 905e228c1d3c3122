"""Closed-form refit of a pruned block to the dense model (`--refit`): GPTAQ's asymmetric target, for pruning.

OBS fits each projection to its *own* outputs on the stream it is given -- the pruned stream, already off from
the dense model's by whatever earlier blocks lost -- and leaves the rows of q/k/v and gate/up as they were. The
refit asks more of every kept projection: on the pruned stream, reproduce what the dense block's projection
produced on the dense stream. For one linear with pruned-stream inputs X_p and dense targets Y_d that is least
squares, W = (Y_d - b)^T X_p (X_p^T X_p + damp)^-1, from two accumulated matrices. The two writers (o_proj,
down_proj) add into the residual stream, so their targets also carry the stream's drift: o_proj is asked for
the dense o_proj output plus (x_dense - x_pruned), down_proj for the dense output plus the drift left after
attention -- the block's output then matches the dense block's as far as a linear map can, upstream errors
included. Projections are refitted in data-flow order (q/k/v, o, gate/up, down), each on inputs that already
include the refits before it. Every eighth window judges: if the block's output error against the dense
block's does not fall there, the block keeps its OBS weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .calibrate import BlockInputs, block_output
from .capture import BlockStructure
from .reconstruct import judge_split
from .sensitivity import spread

REFIT_WINDOWS = 72  # calibration windows a refit reads (every 8th of them judges instead, as in reconstruction)


@dataclass
class RefitResult:
    before: float  # relative squared error against the dense block's outputs on the judging windows
    after: float
    kept: bool


@torch.no_grad()
def _relative_error(block, dense_block, pruned, dense, idx, kwargs, batch_size, device, w) -> float:
    err = ref = 0.0
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        y = block_output(dense_block, dense[b].to(device), kwargs).double()
        err += float(((block_output(block, pruned[b].to(device), kwargs).double() - y).pow(2) * w).sum())
        ref += float((y.pow(2) * w).sum())
    return err / max(ref, 1e-30)


@torch.no_grad()
def _refit_group(block, dense_block, paths: list[str], kept_rows: dict, pruned, dense, idx, kwargs,
                 batch_size, device, percdamp: float, drift_from: tuple[str, ...] | None = None) -> None:
    """Refit the linears at `paths` (all reading the same input) in one lockstep pass of both blocks.

    drift_from: for a writer, add the residual stream's drift to its target -- the block inputs' difference
    plus, for each path listed, the difference of that (earlier) writer's outputs in the two blocks."""
    first = block.get_submodule(paths[0])
    n_in = first.in_features
    H = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
    C = {p: torch.zeros(n_in, block.get_submodule(p).out_features, dtype=torch.float64, device=device) for p in paths}
    caught: dict = {}
    hooks = [first.register_forward_pre_hook(lambda m, a: caught.__setitem__("x", a[0].detach()))]
    for p in paths + list(drift_from or ()):
        hooks.append(dense_block.get_submodule(p).register_forward_hook(
            lambda m, a, o, p=p: caught.__setitem__(p, o.detach())))
    for p in drift_from or ():
        hooks.append(block.get_submodule(p).register_forward_hook(
            lambda m, a, o, p=p: caught.__setitem__((p, "pruned"), o.detach())))
    try:
        for s in range(0, len(idx), batch_size):
            b = idx[s : s + batch_size]
            x_p, x_d = pruned[b].to(device), dense[b].to(device)
            block_output(block, x_p, kwargs)
            block_output(dense_block, x_d, kwargs)
            x = caught["x"].reshape(-1, n_in).double()
            H += x.T @ x
            drift = None
            if drift_from is not None:
                drift = (x_d - x_p).double()
                for p in drift_from:
                    drift = drift + caught[p].double() - caught[p, "pruned"].double()
                drift = drift.reshape(-1, drift.shape[-1])
            for p in paths:
                y = caught[p].reshape(-1, caught[p].shape[-1]).double()
                rows = kept_rows.get(p)
                y = y if rows is None else y[:, rows]
                if drift is not None:
                    y = y + drift
                bias = block.get_submodule(p).bias
                if bias is not None:
                    y = y - bias.double()
                C[p] += x.T @ y
    finally:
        for h in hooks:
            h.remove()
    diag = H.diagonal()
    H += torch.eye(n_in, dtype=H.dtype, device=device) * (percdamp * float(diag.mean()) + 1e-12)
    L = torch.linalg.cholesky(H)
    for p in paths:
        lin = block.get_submodule(p)
        lin.weight.data.copy_(torch.cholesky_solve(C[p], L).T.to(lin.weight.dtype))


def refit_block(block: nn.Module, dense_block: nn.Module, s: BlockStructure, pruned: BlockInputs,
                dense_hidden: torch.Tensor, kept_rows: dict, batch_size: int, device,
                percdamp: float = 0.01, dim_weights: torch.Tensor | None = None) -> RefitResult:
    """kept_rows: for each projection whose outputs were cut (q/k/v: kept heads' rows, gate/up: kept channels),
    the dense output rows it still produces; projections absent from it keep every output. dim_weights: how
    the judge weighs each output dim's error (see slimc.reconstruct; None: equally)."""
    a, m = s.attention, s.mlp
    fit, judge = judge_split(spread(pruned.hidden.shape[0], REFIT_WINDOWS))
    w = (torch.ones(dense_hidden.shape[-1]) if dim_weights is None else dim_weights).double().to(device)
    args = (pruned.hidden, dense_hidden, judge, pruned.kwargs, batch_size, device, w)
    before = _relative_error(block, dense_block, *args)
    saved = {n: p.detach().clone() for n, p in block.named_parameters()}
    for paths, drift_from in (([a.q, a.k, a.v], None), ([a.o], ()), ([m.gate, m.up], None), ([m.down], (a.o,))):
        _refit_group(block, dense_block, paths, kept_rows, pruned.hidden, dense_hidden, fit, pruned.kwargs,
                     batch_size, device, percdamp, drift_from)
    after = _relative_error(block, dense_block, *args)
    if not after < before:
        with torch.no_grad():
            for n, p in block.named_parameters():
                p.copy_(saved[n])
    return RefitResult(before, min(before, after), after < before)
