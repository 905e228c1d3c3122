"""Materialization: cut a block's linears down to the kept heads/channels (really smaller tensors).

The masked variants write the same compensated weights at full width with the pruned parts zeroed; they exist
so tests can prove materialization exact (same logits), not for production use."""
from __future__ import annotations

import torch
from torch import nn

from slimc.capture import BlockStructure

from .base import BlockPass
from .prune_channels import ChannelPruneResult
from .prune_heads import HeadPruneResult, head_widths


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding the selected output rows / input columns of `weight` (default: linear's)."""
    w = linear.weight.data if weight is None else weight.to(linear.weight.dtype)
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    bias = None if linear.bias is None else linear.bias.data if rows is None else linear.bias.data[rows]
    return linear_from(w, bias)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear holding copies of `weight` ([out, in]) and `bias`, on their device and dtype."""
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _set(block: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, module)


def _attention_module(block: nn.Module, s: BlockStructure) -> nn.Module:
    return block.get_submodule(s.attention.o.rpartition(".")[0])


def _set_head_counts(attn: nn.Module, nq: int, nkv: int) -> None:
    # eager attention repeats KV heads by this factor; it is set once from the global config
    attn.num_key_value_groups = nq // nkv
    for name, value in (("num_heads", nq), ("num_attention_heads", nq), ("num_key_value_heads", nkv)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _set_ffn_width(block: nn.Module, s: BlockStructure, n: int) -> None:
    mlp = block.get_submodule(s.mlp.down.rpartition(".")[0])
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = n


def set_widths_from_weights(block: nn.Module, s: BlockStructure) -> None:
    """The attention's head counts and the MLP's width, read off the (already cut) weights: what the cut passes
    set, for a block whose pruned weights were loaded into it (a resumed compile)."""
    q, kv = head_widths(block, s)
    _set_head_counts(_attention_module(block, s), q, kv)
    _set_ffn_width(block, s, block.get_submodule(s.mlp.down).in_features)


class MaterializeHeads(BlockPass):
    """Keep only the selected heads: q rows, k/v rows of kept KV heads, o columns; update head attributes."""

    name = "materialize-heads"

    def run(self, block, s, *, result: HeadPruneResult):
        a = s.attention
        q_rows, kv_rows = _head_rows(result.kept_heads, a.head_dim), _head_rows(result.kept_kv_heads, a.head_dim)
        _set(block, a.q, _slice_linear(block.get_submodule(a.q), rows=q_rows))
        _set(block, a.k, _slice_linear(block.get_submodule(a.k), rows=kv_rows))
        _set(block, a.v, _slice_linear(block.get_submodule(a.v), rows=kv_rows))
        _set(block, a.o, _slice_linear(block.get_submodule(a.o), cols=q_rows, weight=result.o_weight))
        _set_head_counts(_attention_module(block, s), len(result.kept_heads), len(result.kept_kv_heads))

    def ensures(self, block, s, r, *, result: HeadPruneResult):
        a = s.attention
        q, kv = head_widths(block, s)
        self.check(q == len(result.kept_heads) and kv == len(result.kept_kv_heads), "head widths after cut")
        self.check(block.get_submodule(a.o).in_features == q * a.head_dim, "o_proj width disagrees with heads")
        self.check(block.get_submodule(a.v).out_features == kv * a.head_dim, "v_proj width disagrees with KV heads")
        self.check(q % kv == 0, f"{q} query heads over {kv} KV heads")


class MaterializeChannels(BlockPass):
    """Keep only the selected FFN channels: gate/up rows and (compensated) down columns."""

    name = "materialize-channels"

    def run(self, block, s, *, result: ChannelPruneResult):
        m = s.mlp
        _set(block, m.gate, _slice_linear(block.get_submodule(m.gate), rows=result.kept))
        _set(block, m.up, _slice_linear(block.get_submodule(m.up), rows=result.kept))
        _set(block, m.down, _slice_linear(block.get_submodule(m.down), cols=result.kept, weight=result.down_weight))
        _set_ffn_width(block, s, len(result.kept))

    def ensures(self, block, s, r, *, result: ChannelPruneResult):
        m, n = s.mlp, len(result.kept)
        widths = (block.get_submodule(m.gate).out_features, block.get_submodule(m.up).out_features,
                  block.get_submodule(m.down).in_features)
        self.check(widths == (n, n, n), f"FFN widths after cut {widths} != {n}")


def apply_masked_heads(block: nn.Module, s: BlockStructure, result: HeadPruneResult) -> None:
    """Full-width equivalent of MaterializeHeads: compensated o_proj with pruned heads' columns zero."""
    block.get_submodule(s.attention.o).weight.data.copy_(result.o_weight)


def apply_masked_channels(block: nn.Module, s: BlockStructure, result: ChannelPruneResult) -> None:
    """Full-width equivalent of MaterializeChannels."""
    block.get_submodule(s.mlp.down).weight.data.copy_(result.down_weight)
