"""Attention head pruning of one block: SlimGPT batched greedy OBS on the output projection, or magnitude."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from slimc import obs, scores
from slimc.capture import BlockStructure

from .base import BlockPass


@dataclass
class HeadPruneResult:
    kept_heads: torch.Tensor  # query heads kept (sorted)
    kept_kv_heads: torch.Tensor  # KV heads kept (sorted)
    o_weight: torch.Tensor  # full-width o_proj weight, pruned heads' columns zero (compensated if asked)
    error: float  # OBS error of the removal (0 for magnitude)


def head_widths(block: nn.Module, s: BlockStructure) -> tuple[int, int]:
    a = s.attention
    return block.get_submodule(a.q).out_features // a.head_dim, block.get_submodule(a.k).out_features // a.head_dim


class PruneHeads(BlockPass):
    """Remove query heads down to `num_heads` and KV heads down to `num_kv_heads`.

    gqa="groups": whole KV groups go (a KV head with its query heads); gqa="query": the same number of query
    heads goes from every group, KV heads stay. method="slimgpt" selects by block-OBS error with the
    grouped-Cholesky score (score="column" for the ablation) and compensates the surviving o_proj columns;
    method="magnitude" ranks by the L2 norm of each unit's own weights and does not compensate."""

    name = "prune-heads"

    def __init__(self, method: str = "slimgpt", gqa: str = "groups", score: str = "grouped",
                 compensate: bool = True, percdamp: float = 0.01, batch: int = 1, sequential: bool = False):
        self.method, self.gqa, self.score, self.sequential = method, gqa, score, sequential
        self.compensate, self.percdamp, self.batch = compensate and method == "slimgpt", percdamp, batch

    def requires(self, block, s, *, num_heads: int, num_kv_heads: int, hessian: torch.Tensor | None = None):
        q, kv = head_widths(block, s)
        self.check(0 < num_kv_heads <= kv and 0 < num_heads <= q, f"targets {num_heads}/{num_kv_heads} outside 1..{q}/{kv}")
        self.check(num_heads % num_kv_heads == 0, f"{num_heads} query heads over {num_kv_heads} KV heads")
        if self.gqa == "groups":
            self.check(num_heads // num_kv_heads == q // kv, "groups mode keeps the group size")
        else:
            self.check(num_kv_heads == kv, "query mode keeps every KV head")
        if self.method == "slimgpt":
            o_in = block.get_submodule(s.attention.o).in_features
            self.check(hessian is not None and hessian.shape == (o_in, o_in), "o_proj statistics missing or mis-shaped")

    def run(self, block, s, *, num_heads: int, num_kv_heads: int, hessian: torch.Tensor | None = None):
        a = s.attention
        q, kv = head_widths(block, s)
        g, d = q // kv, a.head_dim
        W = block.get_submodule(a.o).weight.data
        head_cols = torch.arange(q * d).view(q, d)
        if self.gqa == "groups":
            units, partition = head_cols.view(kv, g * d), None  # unit j = KV head j with query heads j*g..j*g+g-1
            n_remove = kv - num_kv_heads
        else:
            units, partition = head_cols, torch.arange(q) // g
            n_remove = q - num_heads
        if n_remove == 0:
            return HeadPruneResult(torch.arange(q), torch.arange(kv), W.clone(), 0.0)
        if self.method == "slimgpt":
            res = obs.prune_units_greedy(W, hessian, units, n_remove, partition=partition, batch=self.batch,
                                         score=self.score, compensate=self.compensate, percdamp=self.percdamp,
                                         sequential=self.sequential)
            kept_units, weight, error = res.kept, res.weight, res.error
        else:
            kept_units, weight, error = self._magnitude(block, s, units, partition, n_remove, q, kv, g, d), None, 0.0
        if self.gqa == "groups":
            kept_kv = kept_units
            kept_q = (kept_kv[:, None] * g + torch.arange(g)).reshape(-1)
        else:
            kept_kv, kept_q = torch.arange(kv), kept_units
        if weight is None:
            weight = W.clone()
            removed = torch.ones(q, dtype=torch.bool)
            removed[kept_q] = False
            weight[:, head_cols[removed].reshape(-1)] = 0
        return HeadPruneResult(kept_q.sort().values, kept_kv.sort().values, weight, error)

    def _magnitude(self, block, s, units, partition, n_remove, q, kv, g, d) -> torch.Tensor:
        a = s.attention
        rows = [block.get_submodule(a.q).weight.data]
        score = obs.magnitude_scores(rows, block.get_submodule(a.o).weight.data, units).pow(2)
        if self.gqa == "groups":  # a group also owns its KV head's k and v rows
            for name in (a.k, a.v):
                score += block.get_submodule(name).weight.data.to(torch.float64).view(kv, d, -1).pow(2).sum((1, 2))
        return scores.lowest_units(score, n_remove, partition)

    def ensures(self, block, s, r: HeadPruneResult, *, num_heads: int, num_kv_heads: int, hessian=None):
        self.check(len(r.kept_heads) == num_heads and len(r.kept_kv_heads) == num_kv_heads, "kept head counts off target")
        q, kv = head_widths(block, s)
        g_new = num_heads // num_kv_heads
        per_group = torch.bincount(r.kept_heads // (q // kv), minlength=kv)[r.kept_kv_heads]
        self.check(bool((per_group == g_new).all()), "every kept KV head must serve the same number of query heads")
        self.check(bool(torch.isfinite(r.o_weight).all()), "non-finite weights after compensation")
