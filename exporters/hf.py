"""`--target hf`: safetensors + config.json with per-layer widths + modeling_slimc.py via auto_map, so stock
transformers loads it with trust_remote_code=True and slimc not installed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from slimc import modeling_slimc

PLAN_FILE = "slimc_plan.json"
MODELING_FILE = "modeling_slimc.py"


def write_hf(model: nn.Module, tokenizer, plan_json: str, out_dir: Path) -> None:
    """Write the checkpoint into out_dir (an empty temp dir; the caller renames it into place)."""
    config_name = type(model.config).__name__
    model.config.auto_map = {
        "AutoConfig": f"{MODELING_FILE[:-3]}.{config_name}",
        "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{type(model).__name__}",
    }
    model.save_pretrained(out_dir)  # safetensors; tied lm_head is written once
    tokenizer.save_pretrained(out_dir)
    shutil.copyfile(modeling_slimc.__file__, out_dir / MODELING_FILE)
    (out_dir / PLAN_FILE).write_text(plan_json)
    # sanity: what we wrote must describe per-layer widths matching the tensors
    cfg = json.loads((out_dir / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    for key in modeling_slimc.PER_LAYER_KEYS:
        if len(cfg[key]) != n:
            raise RuntimeError(f"config.json {key} has {len(cfg[key])} entries for {n} layers")
