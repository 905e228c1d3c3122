"""slimc: a model compiler that makes Hugging Face causal LMs structurally smaller (SlimGPT pruning with
non-uniform per-layer widths) and exports them for stock runtimes."""
__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """Make AutoConfig / AutoModelForCausalLM know slimc's model types when slimc is imported."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_slimc import CLASSES

    for config_cls, lm_cls in CLASSES.values():
        try:
            AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
            AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
        except TypeError:  # older transformers without exist_ok
            try:
                AutoConfig.register(config_cls.model_type, config_cls)
                AutoModelForCausalLM.register(config_cls, lm_cls)
            except ValueError:
                pass


_register_auto_classes()


def compile(model, output, sparsity=0.2, **options):  # noqa: A001
    """Prune MODEL and write the result to OUTPUT; see `slimc.config.CompileConfig` for the options.
    Returns a CompileResult with `.output` (Path) and `.report` (dict)."""
    from .pipeline import compile as _compile

    return _compile(model, output, sparsity, **options)
