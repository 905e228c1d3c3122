"""slimc: a model compiler that makes Hugging Face causal LMs structurally smaller (SlimGPT pruning with
non-uniform per-layer widths) and exports them for stock runtimes.

Importing slimc imports neither torch nor transformers (the command line answers --help and argument errors at
once; `slimc.vllm.mapping` stays plain Python): slimc's model types are registered with transformers' Auto*
factories by its loaders and its vLLM plugin (`slimc.load.register_auto_classes`)."""
__version__ = "0.1.0"


def compile(model, output, sparsity=0.2, **options):  # noqa: A001
    """Prune MODEL and write the result to OUTPUT; see `slimc.config.CompileConfig` for the options.
    Returns a CompileResult with `.output` (Path) and `.report` (dict)."""
    from .pipeline import compile as _compile

    return _compile(model, output, sparsity, **options)
