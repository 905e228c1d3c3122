"""Unit scores of the published calibration-statistics baselines, as pure tensor math.

- Wanda-sp (the structured Wanda of the FLAP paper, arXiv 2312.11983, Table 1's baseline): a weight's score is
  |W_ij| * ||X_j||, X_j the j-th input feature over all calibration tokens; an FFN channel scores the mean over
  the output rows of its down_proj column, a head the sum of its o_proj columns' scores. Pruned per layer at
  the plan's widths, no weight update.
- FLAP (An et al., AAAI 2024): the fluctuation metric S_j = Var_n(X_nj) * ||W_:,j||^2 of each input column of
  o_proj / down_proj -- how much the output moves when feature j is replaced by its mean. Scores are
  standardized per layer and module, so heads and channels of every layer compete in one global ranking
  (the adaptive structure search), weighted by the parameters each unit owns; the removed features' mean is
  folded into a bias of o_proj / down_proj (baseline bias compensation), so a feature that never fluctuates
  is removed at zero cost.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class InputMoments:
    """Running per-column mean and second moment of a linear's input, via a forward pre-hook (float64)."""

    def __init__(self, linear: torch.nn.Linear):
        n = linear.in_features
        self.sum = torch.zeros(n, dtype=torch.float64, device=linear.weight.device)
        self.sum_sq = torch.zeros_like(self.sum)
        self.n = 0
        self.handle = linear.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.sum += x.sum(0)
        self.sum_sq += x.pow(2).sum(0)
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased sample variance over all tokens seen."""
        return ((self.sum_sq - self.n * self.mean.pow(2)) / max(self.n - 1, 1)).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """||X_j||_2 over all tokens seen."""
        return self.sum_sq.sqrt()


def wanda_column_scores(W: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Per input column j of W [out, in]: mean over rows of |W_ij| * ||X_j||."""
    return (W.abs().double() * input_norm.double()[None, :]).mean(0)


def fluctuation_scores(W: torch.Tensor, input_variance: torch.Tensor) -> torch.Tensor:
    """FLAP's WIFV metric per input column j: Var(X_j) * ||W_:,j||^2."""
    return input_variance.double() * W.double().pow(2).sum(0)


def unit_scores(column_scores: torch.Tensor, units: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Aggregate column scores into units (rows of `units` hold each unit's columns)."""
    per = column_scores[units]
    return per.sum(-1) if reduce == "sum" else per.mean(-1)


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit standard deviation (a constant vector maps to zeros)."""
    std = x.std()
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def baseline_bias(W: torch.Tensor, input_mean: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """FLAP's compensation: the removed input columns replaced by their mean, W[:, removed] @ mean[removed]."""
    if removed.numel() == 0:
        return torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    return (W[:, removed].double() @ input_mean[removed].double()).to(W.dtype)


def lowest_units(scores: torch.Tensor, n_remove: int, partition: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the units kept after removing the `n_remove` lowest scores (sorted). With a partition
    (e.g. query head -> KV group), the same number goes from every part."""
    alive = torch.ones(scores.shape[0], dtype=torch.bool)
    if partition is None:
        alive[scores.argsort()[:n_remove]] = False
    else:
        parts = partition.unique()
        if n_remove % len(parts):
            raise ValueError(f"{n_remove} removals do not split evenly over {len(parts)} parts")
        for p in parts:
            members = (partition == p).nonzero().squeeze(1)
            alive[members[scores[members].argsort()[: n_remove // len(parts)]]] = False
    return alive.nonzero().squeeze(1)


@dataclass
class LayerCandidates:
    """One layer's removal steps for the global FLAP search, each cheapest-first within its module.

    head_steps[k]: standardized score of the k-th head step (a step removes one query head per KV group, or a
    whole KV group); channel_scores: standardized score per FFN channel."""

    head_steps: torch.Tensor
    head_step_params: int
    channel_scores: torch.Tensor
    channel_params: int


def flap_head_steps(head_scores: torch.Tensor, partition: torch.Tensor | None) -> torch.Tensor:
    """Scores of successive head removal steps: with a partition, step k removes the k-th weakest head of
    every part and scores their mean; without one, step k is the k-th weakest unit. Non-decreasing in k."""
    if partition is None:
        return head_scores.sort().values
    per_part = torch.stack([head_scores[partition == p].sort().values for p in partition.unique()])
    return per_part.mean(0)


def flap_allocate(layers: list[LayerCandidates], params_to_remove: float, min_head_steps_kept: int = 1,
                  min_channels_kept: int = 1) -> list[tuple[int, int]]:
    """FLAP's adaptive structure: all head steps and channels of all layers in one ranking by standardized
    score; the weakest go first until the removed parameters reach `params_to_remove` (the last unit is taken
    when that brings the total closer). Every layer keeps at least one head step and one channel.
    Returns (head steps removed, channels removed) per layer."""
    entries = []  # (score, layer, kind)
    for i, layer in enumerate(layers):
        n_steps = max(0, len(layer.head_steps) - min_head_steps_kept)
        entries += [(float(s), i, 0) for s in layer.head_steps.sort().values[:n_steps]]
        n_ch = max(0, len(layer.channel_scores) - min_channels_kept)
        entries += [(float(s), i, 1) for s in layer.channel_scores.sort().values[:n_ch]]
    entries.sort(key=lambda e: e[0])
    removed = [[0, 0] for _ in layers]
    total = 0.0
    for _, i, kind in entries:
        size = layers[i].head_step_params if kind == 0 else layers[i].channel_params
        if abs(total + size - params_to_remove) >= abs(total - params_to_remove):
            if total + size > params_to_remove:
                continue  # a smaller unit later may still fit
        removed[i][kind] += 1
        total += size
        if total >= params_to_remove:
            break
    return [tuple(r) for r in removed]
