"""Model classes for slimc-pruned checkpoints: a stock transformers family with per-layer widths, and decoder
layers that may read and write only a subset of the residual's hidden dims (DISP-LLM).

This file is copied into every checkpoint slimc writes (with layout.py beside it) and referenced from
`auto_map`, so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works where slimc is not
installed. It must therefore import nothing but torch, transformers and the layout file.

Each class subclasses the source family's own config and causal-LM classes. Decoder layer i is built from a
copy of the config holding layer i's query heads, KV heads and FFN width (`head_dim` always explicit, because
hidden_size // num_heads is wrong once heads are pruned), and runs `SlimcDecoderLayer.forward` below: the
family's own norms, attention and MLP, with the residual written out. A layer without index sets computes
exactly what the family's layer does; tensor names are the family's (`self_attn.q_proj.weight`, ...).
"""
import copy
import importlib

import torch
from torch import nn

try:  # inside the slimc package
    from .layout import INDEX_SETS, PER_LAYER_KEYS, index_buffer, layer_layouts, layout_config_entries
except ImportError:  # pragma: no cover  (a checkpoint directory loaded by path, without a package)
    from layout import INDEX_SETS, PER_LAYER_KEYS, index_buffer, layer_layouts, layout_config_entries

# family -> (transformers module, config class, causal LM class, decoder layer class)
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", "LlamaDecoderLayer"),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", "MistralDecoderLayer"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2DecoderLayer"),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3DecoderLayer"),
}


def layer_config(config, i: int):
    """Copy of `config` describing decoder layer i alone."""
    layout = layer_layouts(config)[i]
    cfg = copy.deepcopy(config)
    for key in PER_LAYER_KEYS:
        delattr(cfg, key) if hasattr(cfg, key) else None
    cfg.num_attention_heads = layout.num_attention_heads
    cfg.num_key_value_heads = layout.num_key_value_heads
    cfg.intermediate_size = layout.intermediate_size
    cfg.head_dim = layout.head_dim
    return cfg


def _narrowed(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None,
              bias: bool = False) -> nn.Linear:
    """A fresh linear like `linear` reading `in_features` / writing `out_features`, with a bias if it had one or
    `bias` asks for one (weights come from the checkpoint)."""
    return nn.Linear(in_features or linear.in_features, out_features or linear.out_features,
                     bias=bias or linear.bias is not None, device=linear.weight.device, dtype=linear.weight.dtype)


class SlimcDecoderLayer(nn.Module):
    """Mixed in before a family's decoder layer: the family builds norms, attention and MLP at this layer's
    widths; here the projections are narrowed to the hidden dims the layer reads and writes, and the forward is
    written out so the residual is explicit:

        h = h + attn(norm1(h))              no index sets (every SlimGPT layer)
        h[attn_out] += attn(norm1(h)[attn_in])   DISP: the norm runs on the full residual
    """

    def __init__(self, config, layer_idx: int):
        layout = layer_layouts(config)[layer_idx]
        super().__init__(layer_config(config, layer_idx), layer_idx)
        attn, mlp = self.self_attn, self.mlp
        if layout.has_index("attn_in"):
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, _narrowed(getattr(attn, name), in_features=layout.attn_in_dims))
        if layout.has_index("attn_out"):
            attn.o_proj = _narrowed(attn.o_proj, out_features=layout.attn_out_dims)
        if layout.has_index("mlp_in"):
            for name in ("gate_proj", "up_proj"):
                setattr(mlp, name, _narrowed(getattr(mlp, name), in_features=layout.mlp_in_dims))
        if layout.has_index("mlp_out"):
            mlp.down_proj = _narrowed(mlp.down_proj, out_features=layout.mlp_out_dims)
        if layout.output_bias:  # FLAP's compensation biases (values from the checkpoint)
            attn.o_proj = _narrowed(attn.o_proj, bias=True)
            mlp.down_proj = _narrowed(mlp.down_proj, bias=True)
        for name in INDEX_SETS:
            if layout.has_index(name):  # filled from the checkpoint's safetensors
                self.register_buffer(index_buffer(name), torch.zeros(layout.dims(name), dtype=torch.long))
            else:
                setattr(self, index_buffer(name), None)

    @staticmethod
    def read(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        return x if index is None else x.index_select(-1, index)

    @staticmethod
    def write(residual: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        if index is None:
            return residual + y
        # scatter_add, not index_add: it exports to ONNX ScatterElements(reduction="add"). It needs one dtype where
        # `residual + y` promotes: under autocast (slimc's bfloat16 compute) y is bfloat16, the residual float32
        return residual.scatter_add(-1, index.expand(*y.shape[:-1], -1), y.to(residual.dtype))

    def forward(self, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        # the KV cache stays in kwargs under the name the model gave it: transformers calls it `past_key_values`
        # up to 5.19 at least and `cache` by 5.25 (the old name goes in 5.40), and hands it on to the family's
        # attention of the same release
        residual = hidden_states
        x = self.read(self.input_layernorm(hidden_states), self.attn_in_index)
        x, _ = self.self_attn(hidden_states=x, attention_mask=attention_mask, position_ids=position_ids,
                              position_embeddings=position_embeddings, **kwargs)
        hidden_states = self.write(residual, x, self.attn_out_index)

        residual = hidden_states
        x = self.read(self.post_attention_layernorm(hidden_states), self.mlp_in_index)
        hidden_states = self.write(residual, self.mlp(x), self.mlp_out_index)
        return hidden_states


def _class_prefix(family: str) -> str:
    return "Slimc" + FAMILIES[family][2][: -len("ForCausalLM")]


def _make_family(family: str):
    module, config_name, lm_name, layer_name = FAMILIES[family]
    base_config = getattr(importlib.import_module(f"transformers.models.{module}.configuration_{module}"), config_name)
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    base_lm, layer_cls = getattr(modeling, lm_name), getattr(modeling, layer_name)
    prefix = _class_prefix(family)

    def config_init(self, *args, **kwargs):
        base_config.__init__(self, *args, **kwargs)
        self.slimc_base_model_type = family
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # a config without per-layer lists (e.g. built for tests, or written before DISP) means "not pruned"
        layouts = layer_layouts(self)
        for key, values in layout_config_entries(layouts).items():
            setattr(self, key, values)

    config_cls = type(f"{prefix}Config", (base_config,), {
        "model_type": f"slimc_{family}", "__init__": config_init, "__module__": __name__,
    })

    decoder_cls = type(f"{prefix}DecoderLayer", (SlimcDecoderLayer, layer_cls), {"__module__": __name__})

    def lm_init(self, config):
        base_lm.__init__(self, config)
        for i in range(config.num_hidden_layers):
            self.model.layers[i] = decoder_cls(config, i)
        self.post_init()

    lm_cls = type(f"{prefix}ForCausalLM", (base_lm,), {
        "config_class": config_cls, "__init__": lm_init, "__module__": __name__,
    })
    return config_cls, lm_cls


SlimcLlamaConfig, SlimcLlamaForCausalLM = _make_family("llama")
SlimcMistralConfig, SlimcMistralForCausalLM = _make_family("mistral")
SlimcQwen2Config, SlimcQwen2ForCausalLM = _make_family("qwen2")
SlimcQwen3Config, SlimcQwen3ForCausalLM = _make_family("qwen3")

CLASSES = {
    "llama": (SlimcLlamaConfig, SlimcLlamaForCausalLM),
    "mistral": (SlimcMistralConfig, SlimcMistralForCausalLM),
    "qwen2": (SlimcQwen2Config, SlimcQwen2ForCausalLM),
    "qwen3": (SlimcQwen3Config, SlimcQwen3ForCausalLM),
}
