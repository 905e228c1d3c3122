"""`--target vllm`: the hf checkpoint (vLLM reads the same safetensors + config.json), checked so that every
layer is servable with tensor parallel `tp`. vLLM finds slimc's model class through the
`vllm.general_plugins` entry point of the installed slimc package (slimc.vllm_plugin:register)."""
from __future__ import annotations

import json
from pathlib import Path

from slimc.errors import SlimcError

from .hf import write_hf


def tensor_parallel_violations(config: dict, tp: int) -> list[str]:
    """Per-layer reasons the widths in config.json cannot be split over `tp` GPUs (empty: servable)."""
    n = config["num_hidden_layers"]
    heads = config.get("layer_num_attention_heads") or [config["num_attention_heads"]] * n
    kvs = config.get("layer_num_key_value_heads") or [config["num_key_value_heads"]] * n
    ffn = config.get("layer_intermediate_size") or [config["intermediate_size"]] * n
    bad = []
    for i, (q, kv, f) in enumerate(zip(heads, kvs, ffn)):
        if q % tp:
            bad.append(f"layer {i}: {q} query heads % tp {tp} != 0")
        if kv % tp and tp % kv:
            bad.append(f"layer {i}: {kv} KV heads neither divisible by nor dividing tp {tp}")
        if f % tp:
            bad.append(f"layer {i}: FFN width {f} % tp {tp} != 0")
    return bad


def write_vllm(model, tokenizer, plan_json: str, out_dir: Path, tp: int) -> None:
    write_hf(model, tokenizer, plan_json, out_dir)
    bad = tensor_parallel_violations(json.loads((out_dir / "config.json").read_text()), tp)
    if bad:
        raise SlimcError(f"the pruned widths are not servable with --tp {tp}: {bad[0]} (and {len(bad) - 1} more)")
