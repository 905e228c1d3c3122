"""vLLM plugin: makes `vllm serve DIR` / `vllm.LLM(DIR)` load slimc checkpoints with no flags.

Installed slimc declares `[project.entry-points."vllm.general_plugins"] slimc = "slimc.vllm.plugin:register"`;
vLLM calls register() once in every process it starts (engine, workers, CLI). vLLM is imported only inside
register(), so `import slimc` never pulls it in.
"""
from __future__ import annotations

from slimc.errors import SlimcError
from slimc.vllm.mapping import ARCHITECTURES, VLLM_MODEL_MODULE

VLLM_MISSING = "vLLM is not installed: pip install 'slimc[vllm]'"


def register() -> None:
    """Register slimc's architectures with vLLM's ModelRegistry and slimc's config classes with transformers'
    AutoConfig. Safe to call any number of times."""
    try:
        from vllm import ModelRegistry
    except ModuleNotFoundError as e:
        if e.name != "vllm":
            raise  # vllm is there but something it imports is missing: show the real error
        raise SlimcError(VLLM_MISSING) from e

    known = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in known:
            # the "module:Class" string is vLLM's lazy form: nothing is imported (and CUDA is not touched)
            # until an engine actually builds the model, which keeps forked workers safe
            ModelRegistry.register_model(arch, f"{VLLM_MODEL_MODULE}:{arch}")
    _register_configs()


def _register_configs() -> None:
    """Let vLLM's config loading (transformers AutoConfig) resolve model_type "slimc_*" without
    trust_remote_code: a registered model_type is local code, so the checkpoint's auto_map is not needed."""
    try:
        from slimc.load import register_auto_classes
    except ImportError:  # slimc's transformers classes unavailable: vLLM falls back to trust_remote_code
        return
    register_auto_classes()
