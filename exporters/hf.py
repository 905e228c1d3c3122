"""`--target hf`: safetensors + config.json with per-layer widths + modeling_slimc.py via auto_map, so stock
transformers loads it with trust_remote_code=True and slimc not installed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

from slimc import layout, modeling_slimc
from slimc.checkpoint import write_state

PLAN_FILE = "slimc_plan.json"
MODELING_FILE = "modeling_slimc.py"
LAYOUT_FILE = "layout.py"  # imported by the modeling file (relative import: transformers copies it along)


def write_hf(model: nn.Module, tokenizer, plan_json: str, out_dir: Path, max_shard_size: int | None = None) -> None:
    """Write the checkpoint into out_dir (an empty temp dir; the caller renames it into place): one
    model.safetensors, or shards of at most `max_shard_size` bytes with model.safetensors.index.json."""
    write_state(model, out_dir, max_shard_size)  # a tied lm_head is written once
    write_hf_files(model.config, type(model).__name__, getattr(model, "generation_config", None), tokenizer, plan_json,
                   out_dir)


def write_hf_files(config, model_class: str, generation_config, tokenizer, plan_json: str, out_dir: Path) -> None:
    """Everything of the checkpoint but its tensors (a streamed compile writes those block by block)."""
    # config.json names the source family's model_type (a type every transformers knows) and points only the
    # model class at modeling_slimc.py. AutoTokenizer always reads config.json through AutoConfig: with an
    # unknown "slimc_*" type and an AutoConfig entry in auto_map it asked "run the custom code? [y/N]" and fell
    # back to a generic tokenizer; now the config resolves locally. The model still needs trust_remote_code=True.
    cfg = config.to_dict()
    cfg.pop("transformers_version", None)  # the same bytes whichever transformers wrote them
    cfg["model_type"] = cfg["slimc_base_model_type"]
    cfg["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{model_class}"}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
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
