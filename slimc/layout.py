"""The per-layer layout of a slimc checkpoint, described once: what each decoder layer's widths are and which
hidden dims its four projections read and write.

Plain Python (no torch, no transformers): it is copied into every checkpoint beside modeling_slimc.py, and the
exporters, the vLLM model and the benchmarks all read layer widths through `layer_layouts`.

config.json carries one list per property, one entry per layer:
  layer_num_attention_heads, layer_num_key_value_heads, layer_intermediate_size    (SlimGPT widths)
  layer_attn_in_dims, layer_attn_out_dims, layer_mlp_in_dims, layer_mlp_out_dims  (DISP hidden dims)
  layer_output_bias   1 where o_proj and down_proj carry a bias the family has none of (FLAP's compensation)
A missing list means "as the global config" (an unpruned layer, or a checkpoint written before DISP). A layer
whose dim count equals hidden_size reads / writes the whole residual and stores no index set; otherwise the
index set is a sorted int64 tensor `model.layers.{i}.{name}_index` in the safetensors.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# the four DISP index sets, in block order: attention reads / writes the residual, then the MLP
INDEX_SETS = ("attn_in", "attn_out", "mlp_in", "mlp_out")
WIDTH_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
DIM_KEYS = tuple(f"layer_{name}_dims" for name in INDEX_SETS)
BIAS_KEY = "layer_output_bias"
PER_LAYER_KEYS = WIDTH_KEYS + DIM_KEYS + (BIAS_KEY,)


def index_buffer(name: str) -> str:
    """Name of the index-set buffer inside a decoder layer (`model.layers.{i}.` + this in the safetensors)."""
    return f"{name}_index"


@dataclass(frozen=True)
class LayerLayout:
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int
    hidden_size: int
    attn_in_dims: int
    attn_out_dims: int
    mlp_in_dims: int
    mlp_out_dims: int
    output_bias: bool = False

    def dims(self, name: str) -> int:
        return getattr(self, f"{name}_dims")

    def has_index(self, name: str) -> bool:
        """True when the layer reads / writes a subset of the residual through this index set."""
        return self.dims(name) != self.hidden_size

    @property
    def is_disp(self) -> bool:
        return any(self.has_index(name) for name in INDEX_SETS)


def _get(config: Mapping[str, Any] | Any, key: str, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def global_head_dim(config) -> int:
    return _get(config, "head_dim") or _get(config, "hidden_size") // _get(config, "num_attention_heads")


def layer_layouts(config: Mapping[str, Any] | Any) -> list[LayerLayout]:
    """Every decoder layer's layout, from a config object or a config.json dict."""
    n = int(_get(config, "num_hidden_layers"))
    hidden = int(_get(config, "hidden_size"))
    globals_ = {"layer_num_attention_heads": "num_attention_heads", "layer_num_key_value_heads": "num_key_value_heads",
                "layer_intermediate_size": "intermediate_size"}
    columns = {}
    for key in PER_LAYER_KEYS:
        values = _get(config, key)
        if not values:  # no per-layer list: every layer as the global config (an unpruned property)
            default = hidden if key in DIM_KEYS else 0 if key == BIAS_KEY else _get(config, globals_[key])
            if key == "layer_num_key_value_heads" and default is None:
                default = _get(config, "num_attention_heads")  # configs may leave KV heads = query heads implicit
            values = [default] * n
        if len(values) != n:
            raise ValueError(f"{key} has {len(values)} entries for {n} layers")
        columns[key] = [int(v) for v in values]
    head_dim = int(global_head_dim(config))
    layouts = []
    for i in range(n):
        q, kv, f, *dims, bias = (columns[key][i] for key in PER_LAYER_KEYS)
        if q % kv:
            raise ValueError(f"layer {i}: {q} query heads over {kv} KV heads")
        if any(not 0 < d <= hidden for d in dims):
            raise ValueError(f"layer {i}: hidden dim counts {dims} outside 1..{hidden}")
        layouts.append(LayerLayout(q, kv, f, head_dim, hidden, *dims, output_bias=bool(bias)))
    return layouts


def layout_config_entries(layouts: list[LayerLayout]) -> dict[str, list[int]]:
    """The config.json lists describing `layouts` (the inverse of layer_layouts)."""
    fields = ("num_attention_heads", "num_key_value_heads", "intermediate_size") + tuple(f"{n}_dims" for n in INDEX_SETS)
    entries = {key: [getattr(layout, f) for layout in layouts] for key, f in zip(PER_LAYER_KEYS, fields)}
    entries[BIAS_KEY] = [int(layout.output_bias) for layout in layouts]
    return entries
