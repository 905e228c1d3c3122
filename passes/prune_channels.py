"""FFN channel pruning of one block: SlimGPT dynamic-group-size OBS on the down projection, or magnitude."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from slimc import obs, scores

from .base import BlockPass


@dataclass
class ChannelPruneResult:
    kept: torch.Tensor  # kept intermediate channels (sorted)
    down_weight: torch.Tensor  # full-width down_proj weight, pruned columns zero (compensated if asked)
    error: float


class PruneChannels(BlockPass):
    """Remove FFN channels down to `width`: columns of down_proj (compensated) and rows of gate/up (exact).
    Given `kept` (a learned selection), exactly those channels stay, the rest go jointly (compensated)."""

    name = "prune-channels"

    def __init__(self, method: str = "slimgpt", compensate: bool = True, percdamp: float = 0.01,
                 max_group: int = 1024, min_group: int = 8):
        self.method, self.compensate, self.percdamp = method, compensate and method == "slimgpt", percdamp
        self.max_group, self.min_group = max_group, min_group

    def requires(self, block, s, *, width: int, hessian: torch.Tensor | None = None, kept=None):
        inter = block.get_submodule(s.mlp.down).in_features
        self.check(0 < width <= inter, f"FFN width target {width} outside 1..{inter}")
        self.check(kept is None or (len(kept) == width and self.method == "slimgpt"), "kept channels off target")
        if self.method == "slimgpt":
            self.check(hessian is not None and hessian.shape == (inter, inter), "down_proj statistics missing or mis-shaped")

    def run(self, block, s, *, width: int, hessian: torch.Tensor | None = None, kept=None):
        m = s.mlp
        W = block.get_submodule(m.down).weight.data
        n_remove = W.shape[1] - width
        if n_remove == 0:
            return ChannelPruneResult(torch.arange(W.shape[1]), W.clone(), 0.0)
        if kept is not None:
            r = obs.remove_columns(W, hessian, kept, self.percdamp, self.compensate)
            return ChannelPruneResult(r.kept, r.weight, r.error)
        if self.method == "slimgpt":
            r = obs.prune_columns_dynamic(W, hessian, n_remove, self.max_group, self.min_group,
                                          compensate=self.compensate, percdamp=self.percdamp)
            return ChannelPruneResult(r.kept, r.weight, r.error)
        units = torch.arange(W.shape[1])[:, None]
        rows = [block.get_submodule(m.gate).weight.data, block.get_submodule(m.up).weight.data]
        score = obs.magnitude_scores(rows, W, units)
        kept = scores.lowest_units(score, n_remove)
        weight = torch.zeros_like(W)
        weight[:, kept] = W[:, kept]
        return ChannelPruneResult(kept, weight, 0.0)

    def ensures(self, block, s, r: ChannelPruneResult, *, width: int, hessian=None, kept=None):
        self.check(len(r.kept) == width, "kept channel count off target")
        self.check(bool(torch.isfinite(r.down_weight).all()), "non-finite weights after compensation")
