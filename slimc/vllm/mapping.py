"""How a slimc checkpoint maps onto vLLM's Llama model: per-layer widths, tensor-parallel limits, names.

Plain Python on purpose (no vllm, no torch): the exporter, the tests and `slimc.vllm.model` all use it, and
only the last runs inside vLLM. The vLLM facts used here (the stacked-parameter table, the parameter names of
a Llama decoder layer) are frozen, with their source files and release tags, in
tests/fixtures/vllm_llama_naming.json; they are identical in vLLM 0.26.0 and 0.33.0.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from slimc.errors import SlimcError
from slimc.layout import BIAS_KEY, DIM_KEYS, INDEX_SETS, index_buffer, layer_layouts

# config.json `architectures[0]` -> base family. All four are served by slimc.vllm.model on vLLM's own Llama
# (or Mistral) building blocks; see that module for why Qwen2/Qwen3 do not reuse vLLM's Qwen classes.
ARCHITECTURES: dict[str, str] = {
    "SlimcLlamaForCausalLM": "llama",
    "SlimcMistralForCausalLM": "mistral",
    "SlimcQwen2ForCausalLM": "qwen2",
    "SlimcQwen3ForCausalLM": "qwen3",
}
VLLM_MODEL_MODULE = "slimc.vllm.model"

# vLLM's LlamaModel.hf_to_vllm_mapper (WeightsMapper.orig_to_new_stacked): HF substring -> (vLLM substring,
# shard id). QKVParallelLinear takes shard ids "q"/"k"/"v", MergedColumnParallelLinear takes 0/1.
STACKED_PARAMS: tuple[tuple[str, str, str | int], ...] = (
    (".q_proj", ".qkv_proj", "q"),
    (".k_proj", ".qkv_proj", "k"),
    (".v_proj", ".qkv_proj", "v"),
    (".gate_proj", ".gate_up_proj", 0),
    (".up_proj", ".gate_up_proj", 1),
)
# stacking order inside each fused vLLM parameter (rows, dim 0)
_SHARD_ORDER = {".qkv_proj": ("q", "k", "v"), ".gate_up_proj": (0, 1)}

_PER_LAYER = (
    ("num_attention_heads", "layer_num_attention_heads"),
    ("num_key_value_heads", "layer_num_key_value_heads"),
    ("intermediate_size", "layer_intermediate_size"),
)
_CONFIG_KEYS = ("model_type", "architectures", "slimc_base_model_type", "num_hidden_layers", "hidden_size",
                "num_attention_heads", "num_key_value_heads", "intermediate_size", "head_dim", "vocab_size",
                "tie_word_embeddings", "attention_bias", "mlp_bias") + tuple(k for _, k in _PER_LAYER) + DIM_KEYS + (BIAS_KEY,)


def _as_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """config.json dict, or the fields slimc needs from a transformers config object (vLLM's hf_config)."""
    if isinstance(config, Mapping):
        return dict(config)
    return {k: getattr(config, k) for k in _CONFIG_KEYS if getattr(config, k, None) is not None}


def base_model_type(config: Mapping[str, Any] | Any) -> str:
    """The source family ("llama", "mistral", "qwen2", "qwen3") of a slimc (or plain HF) config."""
    c = _as_dict(config)
    family = c.get("slimc_base_model_type")
    if not family:
        arch = (c.get("architectures") or [None])[0]
        family = ARCHITECTURES.get(arch) or str(c.get("model_type", "")).removeprefix("slimc_")
    if family not in ARCHITECTURES.values():
        raise SlimcError(f"unsupported model family {family!r} for vLLM (supported: "
                         f"{', '.join(sorted(set(ARCHITECTURES.values())))})")
    return family


def per_layer_overrides(config: Mapping[str, Any] | Any) -> list[dict[str, int]]:
    """Each decoder layer's num_attention_heads, num_key_value_heads, intermediate_size and explicit head_dim.

    Layers fall back to the global value where config.json has no per-layer list (an unpruned model).
    head_dim is taken from config.json, never re-derived: hidden_size // heads is wrong once heads are pruned.
    """
    c = _as_dict(config)
    n = int(c["num_hidden_layers"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    columns = {}
    for key, layer_key in _PER_LAYER:
        default = c.get(key) or (c["num_attention_heads"] if key == "num_key_value_heads" else None)
        values = c.get(layer_key)
        values = list(values) if values is not None else [default] * n
        if len(values) != n:
            raise SlimcError(f"config.json: {layer_key} has {len(values)} entries for {n} layers")
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise SlimcError(f"config.json: {layer_key} must hold positive integers, got {values}")
        columns[key] = values
    out = []
    for i in range(n):
        layer = {key: columns[key][i] for key, _ in _PER_LAYER}
        if layer["num_attention_heads"] % layer["num_key_value_heads"]:
            # every attention kernel (and HF's sdpa/eager) needs whole query groups per KV head
            raise SlimcError(f"config.json: layer {i} has {layer['num_attention_heads']} query heads over "
                             f"{layer['num_key_value_heads']} KV heads (not a multiple)")
        layer["head_dim"] = int(head_dim)
        out.append(layer)
    return out


def check_tensor_parallel(config: Mapping[str, Any] | Any, tp: int) -> list[str]:
    """Reasons the checkpoint cannot be served with tensor parallel `tp` in vLLM (empty list: it can).

    Per layer, vLLM's LlamaAttention asserts q_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0), and
    MergedColumnParallelLinear needs intermediate_size % tp == 0. vLLM's ModelConfig also checks the *global*
    num_attention_heads (the unpruned source value kept in config.json) at start-up.
    """
    if not isinstance(tp, int) or tp < 1:
        raise SlimcError(f"tensor parallel size must be a positive integer, got {tp!r}")
    c = _as_dict(config)
    bad = []
    if c["num_attention_heads"] % tp:
        bad.append(f"config: num_attention_heads {c['num_attention_heads']} % tp {tp} != 0 "
                   "(vLLM checks the global head count at start-up)")
    for i, layer in enumerate(per_layer_overrides(c)):
        q, kv, ffn = layer["num_attention_heads"], layer["num_key_value_heads"], layer["intermediate_size"]
        if q % tp:
            bad.append(f"layer {i}: {q} query heads % tp {tp} != 0")
        if kv % tp and tp % kv:
            bad.append(f"layer {i}: {kv} KV heads neither divisible by nor dividing tp {tp}")
        if ffn % tp:
            bad.append(f"layer {i}: intermediate_size {ffn} % tp {tp} != 0")
    return bad


def _biases(c: dict[str, Any], family: str) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias), as the HF modeling file of `family` builds them."""
    if family == "qwen2":
        return True, False, False
    if family == "mistral":
        return False, False, False
    attn = bool(c.get("attention_bias", False))
    return attn, attn, family == "llama" and bool(c.get("mlp_bias", False))


def hf_param_shapes(config: Mapping[str, Any] | Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the slimc checkpoint's model.safetensors (HF names, unpadded vocab)."""
    c = _as_dict(config)
    family = base_model_type(c)
    qkv_bias, o_bias, mlp_bias = _biases(c, family)
    hidden, vocab = c["hidden_size"], c["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i, (layer, lay) in enumerate(zip(per_layer_overrides(c), layer_layouts(c))):
        p = f"model.layers.{i}."
        hd, q, kv, ffn = layer["head_dim"], layer["num_attention_heads"], layer["num_key_value_heads"], \
            layer["intermediate_size"]
        for proj, rows in (("q_proj", q * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            shapes[f"{p}self_attn.{proj}.weight"] = (rows, lay.attn_in_dims)
            if qkv_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (lay.attn_out_dims, q * hd)
        if o_bias or lay.output_bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (lay.attn_out_dims,)
        for name in INDEX_SETS:
            if lay.has_index(name):
                shapes[f"{p}{index_buffer(name)}"] = (lay.dims(name),)
        if family == "qwen3":
            shapes[f"{p}self_attn.q_norm.weight"] = (hd,)
            shapes[f"{p}self_attn.k_norm.weight"] = (hd,)
        for proj, shape in (("gate_proj", (ffn, lay.mlp_in_dims)), ("up_proj", (ffn, lay.mlp_in_dims)),
                            ("down_proj", (lay.mlp_out_dims, ffn))):
            shapes[f"{p}mlp.{proj}.weight"] = shape
            if mlp_bias or (proj == "down_proj" and lay.output_bias):
                shapes[f"{p}mlp.{proj}.bias"] = shape[:1]
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not c.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def expected_vllm_params(config: Mapping[str, Any] | Any) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every checkpoint-loaded parameter of vLLM's model for this config, at tp=1.

    Names are vLLM's (q/k/v stacked into qkv_proj: (q + 2 kv) * head_dim rows; gate/up into gate_up_proj:
    2 * intermediate rows). Shapes are the checkpoint's logical ones: vLLM pads the vocabulary rows of
    embed_tokens / lm_head to a multiple of 64 in the allocated tensor and loads the real rows into it.
    Buffers that never come from the checkpoint (rotary caches, KV-cache scales) are not listed.
    """
    c = _as_dict(config)
    family = base_model_type(c)
    qkv_bias, o_bias, mlp_bias = _biases(c, family)
    hidden, vocab = c["hidden_size"], c["vocab_size"]
    params: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i, (layer, lay) in enumerate(zip(per_layer_overrides(c), layer_layouts(c))):
        p = f"model.layers.{i}."
        hd, q, kv, ffn = layer["head_dim"], layer["num_attention_heads"], layer["num_key_value_heads"], \
            layer["intermediate_size"]
        params[f"{p}self_attn.qkv_proj.weight"] = ((q + 2 * kv) * hd, lay.attn_in_dims)
        if qkv_bias:
            params[f"{p}self_attn.qkv_proj.bias"] = ((q + 2 * kv) * hd,)
        params[f"{p}self_attn.o_proj.weight"] = (lay.attn_out_dims, q * hd)
        if o_bias or lay.output_bias:
            params[f"{p}self_attn.o_proj.bias"] = (lay.attn_out_dims,)
        if family == "qwen3":
            params[f"{p}self_attn.q_norm.weight"] = (hd,)
            params[f"{p}self_attn.k_norm.weight"] = (hd,)
        params[f"{p}mlp.gate_up_proj.weight"] = (2 * ffn, lay.mlp_in_dims)
        params[f"{p}mlp.down_proj.weight"] = (lay.mlp_out_dims, ffn)
        if mlp_bias:
            params[f"{p}mlp.gate_up_proj.bias"] = (2 * ffn,)
        if mlp_bias or lay.output_bias:
            params[f"{p}mlp.down_proj.bias"] = (lay.mlp_out_dims,)
        params[f"{p}input_layernorm.weight"] = (hidden,)
        params[f"{p}post_attention_layernorm.weight"] = (hidden,)
    params["model.norm.weight"] = (hidden,)
    if not c.get("tie_word_embeddings", False):  # tied: lm_head shares embed_tokens' parameter
        params["lm_head.weight"] = (vocab, hidden)
    return params


def hf_to_vllm_name(name: str) -> tuple[str, str | int | None]:
    """vLLM parameter name and shard id for an HF checkpoint tensor name (shard id None: loaded whole).

    Mirrors vLLM's WeightsMapper: each table entry whose HF substring occurs is replaced once, in table order.
    """
    shard: str | int | None = None
    for hf_part, vllm_part, shard_id in STACKED_PARAMS:
        if hf_part in name:
            name, shard = name.replace(hf_part, vllm_part, 1), shard_id
    return name, shard


def stack_hf_shapes(hf_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Fold HF tensor shapes into vLLM parameter shapes by the stacked-parameter table (rows concatenate).

    Raises SlimcError if shards of one fused parameter disagree on their other dimensions or one is missing.
    """
    shards: dict[str, dict[str | int, tuple[int, ...]]] = {}
    out: dict[str, tuple[int, ...]] = {}
    index_suffixes = tuple(f".{index_buffer(n)}" for n in INDEX_SETS)
    for name, shape in hf_shapes.items():
        if name.endswith(index_suffixes):  # DISP index sets: buffers in vLLM's layer, not parameters
            continue
        vname, shard = hf_to_vllm_name(name)
        if shard is None:
            out[vname] = tuple(shape)
        else:
            shards.setdefault(vname, {})[shard] = tuple(shape)
    for vname, parts in shards.items():
        order = next(o for key, o in _SHARD_ORDER.items() if key + "." in vname)
        if set(parts) != set(order):
            raise SlimcError(f"{vname}: checkpoint has shards {sorted(map(str, parts))}, needs {list(order)}")
        tails = {parts[s][1:] for s in order}
        if len(tails) != 1:
            raise SlimcError(f"{vname}: shards disagree on trailing dims {sorted(tails)}")
        out[vname] = (sum(parts[s][0] for s in order), *tails.pop())
    return out


def layer_config(hf_config: Any, i: int) -> Any:
    """Deep copy of a transformers config object (vLLM's hf_config) that describes decoder layer i alone,
    in the terms vLLM's LlamaDecoderLayer reads: layer widths, explicit head_dim, and bias flags.

    Qwen2 maps onto the Llama layer through its `qkv_bias` hook (biased q/k/v, unbiased o_proj).
    A deep copy, because vLLM layers may mutate their config (e.g. rope parameters).
    """
    layers = per_layer_overrides(hf_config)
    family = base_model_type(hf_config)
    cfg = copy.deepcopy(hf_config)
    for key, value in layers[i].items():
        setattr(cfg, key, value)
    if family == "qwen2":
        cfg.attention_bias, cfg.qkv_bias = False, True
    elif family == "qwen3":
        cfg.mlp_bias = False
    return cfg


def loaded_param_shapes(model: Any) -> dict[str, Any]:
    """The class and parameter shapes of a model vLLM has loaded. Meant for `LLM.apply_model`, which pickles the
    function by reference into vLLM's worker: it must live in an importable module, not a script's __main__.

    vLLM's CPU build repacks linear weights for its GEMM kernels after loading and leaves an empty `weight`
    behind; such a weight is reported with its layer's logical (out, in) size per partition."""
    params, seen = {}, set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied weight is listed once, as named_parameters() does
                continue
            seen.add(id(p))
            shape = list(p.shape)
            if p.numel() == 0 and name == "weight" and hasattr(module, "output_size_per_partition"):
                shape = [module.output_size_per_partition, module.input_size_per_partition]
            params[f"{module_name}.{name}" if module_name else name] = shape
    return {"class": type(model).__name__, "params": params}
