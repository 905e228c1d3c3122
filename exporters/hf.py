"""`--target hf`: safetensors + config.json with per-layer widths + modeling_slimc.py via auto_map, so stock
transformers loads it with trust_remote_code=True and slimc not installed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from slimc import layout, modeling_slimc

PLAN_FILE = "slimc_plan.json"
MODELING_FILE = "modeling_slimc.py"
LAYOUT_FILE = "layout.py"  # imported by the modeling file (relative import: transformers copies it along)


def write_hf(model: nn.Module, tokenizer, plan_json: str, out_dir: Path, max_shard_size: int | None = None) -> None:
    """Write the checkpoint into out_dir (an empty temp dir; the caller renames it into place): one
    model.safetensors, or shards of at most `max_shard_size` bytes with model.safetensors.index.json."""
    config_name = type(model.config).__name__
    model.config.auto_map = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.{config_name}",
        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{type(model).__name__}",
    }
    # safetensors; tied lm_head is written once; shards only when asked (transformers' own default is 50 GB)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    # config.json names the source family's model_type (a type every transformers knows) and points only the
    # model class at modeling_slimc.py. AutoTokenizer always reads config.json through AutoConfig: with an
    # unknown "slimc_*" type and an AutoConfig entry in auto_map it asked "run the custom code? [y/N]" and fell
    # back to a generic tokenizer; now the config resolves locally. The model still needs trust_remote_code=True.
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["model_type"] = cfg["slimc_base_model_type"]
    cfg["auto_map"] = {"AutoModelForCausalLM": model.config.auto_map["AutoModelForCausalLM"]}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(modeling_slimc.__file__, out_dir / MODELING_FILE)
    shutil.copyfile(layout.__file__, out_dir / LAYOUT_FILE)
    (out_dir / PLAN_FILE).write_text(plan_json)
    # sanity: what we wrote must describe per-layer widths matching the tensors
    n = cfg["num_hidden_layers"]
    for key in layout.PER_LAYER_KEYS:
        if len(cfg[key]) != n:
            raise RuntimeError(f"config.json {key} has {len(cfg[key])} entries for {n} layers")
    layout.layer_layouts(cfg)
