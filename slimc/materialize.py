"""Whole-model materialization: turn a block-wise pruned source model into the slimc model class of its family
(stock transformers layers built from per-layer configs), holding exactly the pruned tensors."""
from __future__ import annotations

import torch
from torch import nn

from .layout import PER_LAYER_KEYS
from .modeling_slimc import CLASSES
from .plan import PruningPlan


def slim_config(source_config, family: str, plan: PruningPlan):
    """The source config with the slimc model_type and per-layer widths; global fields stay as in the source."""
    config_cls, lm_cls = CLASSES[family]
    d = source_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "quantization_config", "transformers_version"):
        d.pop(key, None)
    d["head_dim"] = getattr(source_config, "head_dim", None) or source_config.hidden_size // source_config.num_attention_heads
    per_layer = [(layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size,
                  *layer.dims(source_config.hidden_size), int(layer.output_bias)) for layer in plan.layers]
    d.update({key: [values[k] for values in per_layer] for k, key in enumerate(PER_LAYER_KEYS)})
    config = config_cls(**d)
    config.architectures = [lm_cls.__name__]
    return config


def slim_skeleton(source_config, family: str, plan: PruningPlan, dtype: torch.dtype) -> nn.Module:
    """The slimc model of `plan` on the meta device: its names and shapes, no memory."""
    config = slim_config(source_config, family, plan)
    config.dtype = dtype
    _, lm_cls = CLASSES[family]
    with torch.device("meta"):
        return lm_cls(config)


def copy_missing_buffers(model: nn.Module, source: nn.Module, skip_prefix: str | None = None) -> None:
    """Non-persistent buffers (rotary inv_freq) are in no state dict or checkpoint: take them from the source."""
    src_buffers = dict(source.named_buffers())
    for name, buf in list(model.named_buffers()):
        if buf.is_meta and not (skip_prefix and name.startswith(skip_prefix)):
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(leaf, src_buffers[name].clone(), persistent=False)


@torch.no_grad()
def cast_state(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`build_slim_model`'s dtype cast, applied later (a model built in fp32 to be distilled): every floating
    tensor of the state dict; non-persistent buffers (rotary inv_freq) stay in the source's precision, as there."""
    persistent = set(model.state_dict())
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    for name, buf in list(model.named_buffers()):
        if name in persistent and buf.is_floating_point():
            parent, _, leaf = name.rpartition(".")
            model.get_submodule(parent).register_buffer(leaf, buf.to(dtype))
    model.config.dtype = dtype
    return model


@torch.no_grad()
def build_slim_model(pruned: nn.Module, family: str, plan: PruningPlan, dtype: torch.dtype) -> nn.Module:
    """Instantiate the slimc class on the meta device and move the pruned tensors in (no full-size copy)."""
    model = slim_skeleton(pruned.config, family, plan, dtype)
    config = model.config
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in pruned.state_dict().items()}  # index sets stay int64
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"pruned weights do not fit the slim model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    copy_missing_buffers(model, pruned)
    for name, p in model.named_parameters():
        if p.is_meta:
            raise RuntimeError(f"parameter {name} was not materialized")
    model.generation_config = pruned.generation_config
    return model.eval()
