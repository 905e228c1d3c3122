"""`--target vllm`: the hf checkpoint (vLLM reads the same safetensors + config.json), checked so that every
layer is servable with tensor parallel `tp`. vLLM finds slimc's model class through the
`vllm.general_plugins` entry point of the installed slimc package (slimc.vllm_plugin:register)."""
from __future__ import annotations

import json
from pathlib import Path

from slimc.errors import SlimcError
from slimc.vllm_mapping import check_tensor_parallel

from .hf import write_hf


def write_vllm(model, tokenizer, plan_json: str, out_dir: Path, tp: int, max_shard_size: int | None = None) -> None:
    write_hf(model, tokenizer, plan_json, out_dir, max_shard_size)
    bad = check_tensor_parallel(json.loads((out_dir / "config.json").read_text()), tp)
    if bad:
        raise SlimcError(f"the pruned widths are not servable with --tp {tp}: {bad[0]} (and {len(bad) - 1} more)")
