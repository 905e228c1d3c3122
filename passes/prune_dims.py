"""DISP hidden-dim pruning of one block: which residual dims its projections read and write.

During calibration a block stays full width in the hidden dims: a removed read dim is a zero column of every
reader (q/k/v or gate/up), a removed write dim a zero row (and bias) of the writer (o_proj or down_proj) --
exactly what index_select / index_add compute, so the next blocks calibrate on the true pruned stream.
`MaterializeDims` cuts them physically and stores the index sets as buffers, at the end."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimc import disp, obs
from slimc.layout import index_buffer

from .base import BlockPass
from .materialize import _set, _slice_linear


@dataclass
class DimPruneResult:
    kept: torch.Tensor  # sorted hidden dims kept
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> full-width masked weight
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> masked bias (writers)
    error: float = 0.0


class PruneReadDims(BlockPass):
    """Keep `keep` input dims of the linears in `paths` (they read the same normalized residual): OBS column
    pruning of their stacked weight, dynamic group size, with compensation of the kept columns. Given `kept`
    (a learned selection), those dims stay and the rest go jointly with the least-squares compensation.
    compensate=False drops the removed columns and leaves the kept ones as they are (what a mask did)."""

    name = "prune-read-dims"

    def __init__(self, percdamp: float = 0.01, max_group: int = 1024, min_group: int = 8, compensate: bool = True):
        self.percdamp, self.max_group, self.min_group, self.compensate = percdamp, max_group, min_group, compensate

    def requires(self, block, s, *, paths: list[str], keep: int, hessian: torch.Tensor, kept=None):
        width = block.get_submodule(paths[0]).in_features
        self.check(all(block.get_submodule(p).in_features == width for p in paths), "readers disagree on width")
        self.check(0 < keep <= width, f"read-dim target {keep} outside 1..{width}")
        self.check(hessian.shape == (width, width), "reader statistics missing or mis-shaped")

    def run(self, block, s, *, paths: list[str], keep: int, hessian: torch.Tensor, kept=None):
        weights = [block.get_submodule(p).weight.data for p in paths]
        W = torch.cat(weights)
        n_remove = W.shape[1] - keep
        if n_remove == 0:
            return DimPruneResult(torch.arange(W.shape[1]), dict(zip(paths, (w.clone() for w in weights))))
        if kept is not None:
            r = obs.remove_columns(W, hessian, kept, self.percdamp, self.compensate)
        else:
            r = obs.prune_columns_dynamic(W, hessian, n_remove, self.max_group, self.min_group, self.compensate,
                                          percdamp=self.percdamp)
        parts = r.weight.split([w.shape[0] for w in weights])
        return DimPruneResult(r.kept, dict(zip(paths, parts)), error=r.error)

    def ensures(self, block, s, r: DimPruneResult, *, paths, keep, hessian, kept=None):
        self.check(len(r.kept) == keep, "kept read dims off target")
        self.check(all(bool(torch.isfinite(w).all()) for w in r.weights.values()), "non-finite weights after compensation")


class PruneWriteDims(BlockPass):
    """Keep the `keep` output rows of the writer `path` that put the most energy into the residual (or, given
    `kept`, those rows). The energy comes from the Hessian of the writer's input, or is given measured."""

    name = "prune-write-dims"

    def requires(self, block, s, *, path: str, keep: int, hessian=None, kept=None, energy=None):
        lin = block.get_submodule(path)
        self.check(0 < keep <= lin.out_features, f"write-dim target {keep} outside 1..{lin.out_features}")
        if energy is None:
            self.check(hessian is not None and hessian.shape == (lin.in_features, lin.in_features),
                       "writer statistics missing or mis-shaped")
        else:
            self.check(energy.shape == (lin.out_features,), "writer output energies mis-shaped")

    def run(self, block, s, *, path: str, keep: int, hessian=None, kept=None, energy=None):
        lin = block.get_submodule(path)
        if energy is None:
            energy = disp.row_energies(lin.weight.data, hessian)
        kept = (energy.argsort(descending=True)[:keep] if kept is None else kept).sort().values
        removed = torch.ones(lin.out_features, dtype=torch.bool)
        removed[kept] = False
        weight = lin.weight.data.clone()
        weight[removed] = 0
        biases = {}
        if lin.bias is not None:
            biases[path] = lin.bias.data.clone()
            biases[path][removed] = 0
        return DimPruneResult(kept, {path: weight}, biases, error=float(energy[removed].sum()))

    def ensures(self, block, s, r: DimPruneResult, *, path, keep, hessian=None, kept=None, energy=None):
        self.check(len(r.kept) == keep, "kept write dims off target")


def apply_dims(block: nn.Module, result: DimPruneResult) -> None:
    """Put the masked (and compensated) weights of a dim prune into the full-width block."""
    for path, w in result.weights.items():
        block.get_submodule(path).weight.data.copy_(w)
    for path, b in result.biases.items():
        block.get_submodule(path).bias.data.copy_(b)


class MaterializeDims(BlockPass):
    """Cut the masked hidden dims out of a block physically and store its index sets as buffers
    (`attn_in_index`, ...), the tensors slimc's decoder layer reads them from."""

    name = "materialize-dims"

    def run(self, block, s, *, index_sets: dict[str, torch.Tensor]):
        a, m = s.attention, s.mlp
        readers = {"attn_in": (a.q, a.k, a.v), "mlp_in": (m.gate, m.up)}
        writers = {"attn_out": a.o, "mlp_out": m.down}
        for name, idx in index_sets.items():
            if name in readers:
                for p in readers[name]:
                    _set(block, p, _slice_linear(block.get_submodule(p), cols=idx))
            else:
                _set(block, writers[name], _slice_linear(block.get_submodule(writers[name]), rows=idx))
            block.register_buffer(index_buffer(name), idx.to(torch.long).clone())

    def ensures(self, block, s, r, *, index_sets):
        for name, idx in index_sets.items():
            self.check(bool((idx[1:] > idx[:-1]).all()), f"{name} index set must be sorted and unique")
        a = s.attention
        if "attn_in" in index_sets:
            n = len(index_sets["attn_in"])
            self.check(all(block.get_submodule(p).in_features == n for p in (a.q, a.k, a.v)), "q/k/v read widths")
