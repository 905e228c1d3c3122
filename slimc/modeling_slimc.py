"""Model classes for slimc-pruned checkpoints: a stock transformers family with per-layer widths.

This file is copied into every checkpoint slimc writes and referenced from `auto_map`, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works where slimc is not installed.
It must therefore import nothing but torch and transformers.

Each class subclasses the source family's own config and causal-LM classes; the only change is that decoder
layer i is built from a copy of the config holding layer i's query heads, KV heads and FFN width
(`layer_num_attention_heads`, `layer_num_key_value_heads`, `layer_intermediate_size`). `head_dim` is always
explicit, because hidden_size // num_heads is wrong once heads are pruned.
"""
import copy
import importlib

# family -> (transformers module, config class, causal LM class, decoder layer class)
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", "LlamaDecoderLayer"),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", "MistralDecoderLayer"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2DecoderLayer"),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3DecoderLayer"),
}
PER_LAYER_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


def layer_config(config, i: int):
    """Copy of `config` describing decoder layer i alone."""
    cfg = copy.deepcopy(config)
    for key in PER_LAYER_KEYS:
        delattr(cfg, key) if hasattr(cfg, key) else None
    cfg.num_attention_heads = config.layer_num_attention_heads[i]
    cfg.num_key_value_heads = config.layer_num_key_value_heads[i]
    cfg.intermediate_size = config.layer_intermediate_size[i]
    cfg.head_dim = config.head_dim
    return cfg


def _class_prefix(family: str) -> str:
    return "Slimc" + FAMILIES[family][2][: -len("ForCausalLM")]


def _make_family(family: str):
    module, config_name, lm_name, layer_name = FAMILIES[family]
    base_config = getattr(importlib.import_module(f"transformers.models.{module}.configuration_{module}"), config_name)
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    base_lm, layer_cls = getattr(modeling, lm_name), getattr(modeling, layer_name)
    prefix = _class_prefix(family)

    def config_init(self, *args, **kwargs):
        base_config.__init__(self, *args, **kwargs)
        n = self.num_hidden_layers
        # a config without per-layer lists (e.g. built for tests) means "not pruned"
        defaults = (self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)
        for key, default in zip(PER_LAYER_KEYS, defaults):
            value = list(getattr(self, key, None) or [default] * n)
            if len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries for {n} layers")
            setattr(self, key, value)
        self.slimc_base_model_type = family
        if getattr(self, "head_dim", None) is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    config_cls = type(f"{prefix}Config", (base_config,), {
        "model_type": f"slimc_{family}", "__init__": config_init, "__module__": __name__,
    })

    def lm_init(self, config):
        base_lm.__init__(self, config)
        for i in range(config.num_hidden_layers):
            self.model.layers[i] = layer_cls(layer_config(config, i), i)
        self.post_init()

    lm_cls = type(f"{prefix}ForCausalLM", (base_lm,), {
        "config_class": config_cls, "__init__": lm_init, "__module__": __name__,
    })
    return config_cls, lm_cls


SlimcLlamaConfig, SlimcLlamaForCausalLM = _make_family("llama")
SlimcMistralConfig, SlimcMistralForCausalLM = _make_family("mistral")
SlimcQwen2Config, SlimcQwen2ForCausalLM = _make_family("qwen2")
SlimcQwen3Config, SlimcQwen3ForCausalLM = _make_family("qwen3")

CLASSES = {
    "llama": (SlimcLlamaConfig, SlimcLlamaForCausalLM),
    "mistral": (SlimcMistralConfig, SlimcMistralForCausalLM),
    "qwen2": (SlimcQwen2Config, SlimcQwen2ForCausalLM),
    "qwen3": (SlimcQwen3Config, SlimcQwen3ForCausalLM),
}
