"""`--target vllm`: the hf checkpoint (vLLM reads the same safetensors + config.json), checked so that every
layer is servable with tensor parallel `tp`. vLLM finds slimc's model class through the
`vllm.general_plugins` entry point of the installed slimc package (slimc.vllm.plugin:register)."""
from __future__ import annotations

import json
from pathlib import Path

from slimc.errors import SlimcError
from slimc.vllm.mapping import check_tensor_parallel


def check_servable(out_dir: Path, tp: int) -> None:
    """Every layer of the checkpoint in out_dir must be servable with tensor parallel `tp`."""
    bad = check_tensor_parallel(json.loads((out_dir / "config.json").read_text()), tp)
    if bad:
        raise SlimcError(f"the pruned widths are not servable with --tp {tp}: {bad[0]} (and {len(bad) - 1} more)")
