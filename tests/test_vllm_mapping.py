"""slimc's vLLM mapping against facts frozen from vLLM's source (tests/fixtures/vllm_llama_naming.json).

These need no vLLM: they check the naming/shape contract and the plugin's import behaviour in the main
environment. Real serving is tests/test_vllm_serving.py (vLLM's CPU build, tests/run_vllm_cpu.sh) and, on a GPU,
benchmarks/gpu_vllm_check.py.
"""
import ast
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from slimc.vllm import mapping as vm
from slimc.errors import SlimcError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "fixtures" / "vllm_llama_naming.json").read_text())
LAYER_FIXTURE = FIXTURE["decoder_layer_params"]

ARCH = {"llama": "SlimcLlamaForCausalLM", "mistral": "SlimcMistralForCausalLM",
        "qwen2": "SlimcQwen2ForCausalLM", "qwen3": "SlimcQwen3ForCausalLM"}


def pruned_config(family="llama", **extra):
    """config.json of a tiny pruned model: 8 q / 4 KV heads globally, three layers of different widths."""
    cfg = {
        "model_type": f"slimc_{family}", "architectures": [ARCH[family]], "slimc_base_model_type": family,
        "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 4,
        "intermediate_size": 96, "head_dim": 8, "vocab_size": 128, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "layer_num_attention_heads": [8, 6, 4], "layer_num_key_value_heads": [4, 2, 2],
        "layer_intermediate_size": [96, 64, 40],
    }
    if family == "mistral":
        cfg["sliding_window"] = None
    cfg.update(extra)
    return cfg


# --- fixture facts the module copies -------------------------------------------------------------------------

def test_stacked_table_is_vllms():
    assert [list(e) for e in vm.STACKED_PARAMS] == FIXTURE["stacked_params_mapping"]["entries"]
    packed = FIXTURE["packed_modules_mapping"]
    for fused, parts in (("qkv_proj", packed["qkv_proj"]), ("gate_up_proj", packed["gate_up_proj"])):
        assert [p.lstrip(".") for p, v, _ in vm.STACKED_PARAMS if v == f".{fused}"] == parts


def test_pyproject_declares_the_plugin_entry_point():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert eps[FIXTURE["plugins"]["entry_point_group"]]["slimc"] == "slimc.vllm.plugin:register"


# --- per-layer widths and tensor parallel --------------------------------------------------------------------

def test_per_layer_overrides_reads_lists_and_keeps_head_dim():
    layers = vm.per_layer_overrides(pruned_config())
    assert layers == [
        {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 96, "head_dim": 8},
        {"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 64, "head_dim": 8},
        {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40, "head_dim": 8},
    ]


def test_per_layer_overrides_unpruned_falls_back_to_globals():
    cfg = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 96}
    # no KV count means MHA; no head_dim means hidden // heads (only right while heads are unpruned)
    assert vm.per_layer_overrides(cfg) == [
        {"num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 96, "head_dim": 16}] * 2


@pytest.mark.parametrize("change, match", [
    ({"layer_intermediate_size": [96, 64]}, "has 2 entries for 3 layers"),
    ({"layer_num_attention_heads": [8, 6, 3]}, "layer 2 has 3 query heads over 2 KV heads"),
    ({"layer_num_key_value_heads": [4, 0, 2]}, "positive integers"),
])
def test_per_layer_overrides_rejects_bad_configs(change, match):
    with pytest.raises(SlimcError, match=match):
        vm.per_layer_overrides(pruned_config(**change))


def _tp_config(q, kv, ffn, global_heads=8):
    return pruned_config(num_attention_heads=global_heads, num_hidden_layers=2,
                         layer_num_attention_heads=[8, q], layer_num_key_value_heads=[4, kv],
                         layer_intermediate_size=[96, ffn])


def test_check_tensor_parallel_accepts_servable_widths():
    assert vm.check_tensor_parallel(pruned_config(), 1) == []
    assert vm.check_tensor_parallel(pruned_config(), 2) == []
    assert vm.check_tensor_parallel(_tp_config(8, 1, 96), 4) == []  # 1 KV head replicated over 4 GPUs
    assert vm.check_tensor_parallel(_tp_config(8, 4, 96), 8) == []  # 4 KV heads each on 2 GPUs


@pytest.mark.parametrize("widths, tp, match", [
    ((6, 2, 96), 4, "layer 1: 6 query heads % tp 4"),
    ((6, 3, 96), 2, "layer 1: 3 KV heads neither divisible by nor dividing tp 2"),
    ((8, 4, 90), 4, "layer 1: intermediate_size 90 % tp 4"),
])
def test_check_tensor_parallel_catches_each_violation(widths, tp, match):
    bad = vm.check_tensor_parallel(_tp_config(*widths), tp)
    assert len(bad) == 1 and bad[0].startswith(match), bad


def test_check_tensor_parallel_checks_the_global_head_count():
    # vLLM's ModelConfig rejects tp by the unpruned global count kept in config.json (e.g. SmolLM2's 9)
    bad = vm.check_tensor_parallel(_tp_config(8, 4, 96, global_heads=9), 2)
    assert len(bad) == 1 and "num_attention_heads 9 % tp 2" in bad[0]
    with pytest.raises(SlimcError):
        vm.check_tensor_parallel(pruned_config(), 0)


# --- names and shapes -----------------------------------------------------------------------------------------

def _fixture_name(vllm_name):
    """The fixture's generic name for a vLLM parameter name (layer index stripped), or None."""
    model = FIXTURE["model_params"]
    if vllm_name in model["always"] + model["untied_only"]:
        return vllm_name
    prefix, _, rest = vllm_name.partition(".layers.")
    idx, _, local = rest.partition(".")
    if prefix == "model" and idx.isdigit():
        known = (LAYER_FIXTURE["always"] + list(LAYER_FIXTURE["optional"])
                 + LAYER_FIXTURE["qwen3_attention_extra"]["names"])
        return local if local in known else None
    return None


@pytest.mark.parametrize("family", list(ARCH))
@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}])
def test_expected_vllm_params_names_follow_the_fixture(family, extra):
    cfg = pruned_config(family, **extra)
    params = vm.expected_vllm_params(cfg)
    assert all(_fixture_name(n) for n in params), [n for n in params if not _fixture_name(n)]
    for i in range(cfg["num_hidden_layers"]):
        for local in LAYER_FIXTURE["always"]:
            assert f"model.layers.{i}.{local}" in params
        has_qk_norm = f"model.layers.{i}.self_attn.q_norm.weight" in params
        assert has_qk_norm == (family == "qwen3")
    assert ("lm_head.weight" in params) != bool(cfg["tie_word_embeddings"])
    assert ("model.layers.0.self_attn.qkv_proj.bias" in params) == (family == "qwen2" or (
        family in ("llama", "qwen3") and bool(extra.get("attention_bias"))))
    assert ("model.layers.0.mlp.gate_up_proj.bias" in params) == (family == "llama" and bool(extra.get("mlp_bias")))


def test_expected_vllm_params_shapes_by_hand():
    p = vm.expected_vllm_params(pruned_config("qwen2"))
    # layer 1: 6 q heads, 2 KV heads, head_dim 8, FFN 64, hidden 64
    assert p["model.layers.1.self_attn.qkv_proj.weight"] == ((6 + 2 * 2) * 8, 64)
    assert p["model.layers.1.self_attn.qkv_proj.bias"] == (80,)
    assert p["model.layers.1.self_attn.o_proj.weight"] == (64, 48)
    assert "model.layers.1.self_attn.o_proj.bias" not in p
    assert p["model.layers.1.mlp.gate_up_proj.weight"] == (128, 64)
    assert p["model.layers.1.mlp.down_proj.weight"] == (64, 64)
    assert p["model.layers.2.mlp.gate_up_proj.weight"] == (80, 64)
    assert p["model.layers.2.self_attn.qkv_proj.weight"] == (64, 64)
    assert p["model.embed_tokens.weight"] == p["lm_head.weight"] == (128, 64)


@pytest.mark.parametrize("family", list(ARCH))
@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}])
def test_stacking_hf_shapes_gives_expected_vllm_params(family, extra):
    cfg = pruned_config(family, **extra)
    assert vm.stack_hf_shapes(vm.hf_param_shapes(cfg)) == vm.expected_vllm_params(cfg)


def test_stack_hf_shapes_rejects_missing_or_mismatched_shards():
    shapes = vm.hf_param_shapes(pruned_config())
    broken = {k: v for k, v in shapes.items() if k != "model.layers.0.self_attn.v_proj.weight"}
    with pytest.raises(SlimcError, match="needs"):
        vm.stack_hf_shapes(broken)
    shapes["model.layers.0.mlp.up_proj.weight"] = (96, 63)
    with pytest.raises(SlimcError, match="disagree"):
        vm.stack_hf_shapes(shapes)


def _hf_model(family, cfg_dict):
    """slimc's transformers class for `family`, built on the meta device (no memory, no init cost)."""
    from slimc.modeling_slimc import CLASSES

    config_cls, lm_cls = CLASSES[family]
    keys = {k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        return lm_cls(config_cls(**keys))


@pytest.mark.parametrize("family", list(ARCH))
@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True}])
def test_hf_param_shapes_match_slimc_transformers_model(family, extra):
    cfg = pruned_config(family, **extra)
    model = _hf_model(family, cfg)
    actual = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert actual == vm.hf_param_shapes(cfg)


@pytest.mark.parametrize("family", list(ARCH))
def test_hf_to_vllm_name_maps_every_hf_weight_to_a_fixture_name(family):
    shard_ids = {hf.lstrip("."): sid for hf, _, sid in FIXTURE["stacked_params_mapping"]["entries"]}
    for name in dict(_hf_model(family, pruned_config(family)).named_parameters()):
        vname, shard = vm.hf_to_vllm_name(name)
        assert _fixture_name(vname), (name, vname)
        proj = name.split(".")[-2]
        assert shard == shard_ids.get(proj), (name, shard)
        if shard is None:
            assert vname == name  # everything else loads under its HF name


def test_hf_to_vllm_name_examples():
    assert vm.hf_to_vllm_name("model.layers.3.self_attn.k_proj.bias") == \
        ("model.layers.3.self_attn.qkv_proj.bias", "k")
    assert vm.hf_to_vllm_name("model.layers.0.mlp.up_proj.weight") == ("model.layers.0.mlp.gate_up_proj.weight", 1)
    assert vm.hf_to_vllm_name("model.layers.0.self_attn.q_norm.weight") == \
        ("model.layers.0.self_attn.q_norm.weight", None)  # ".q_proj" is no substring of it


# --- the config copy each vLLM layer is built from ------------------------------------------------------------

@pytest.mark.parametrize("family", list(ARCH))
def test_layer_config_describes_one_layer(family):
    from slimc.modeling_slimc import CLASSES

    cfg_dict = pruned_config(family)
    config = CLASSES[family][0](**{k: v for k, v in cfg_dict.items() if k not in ("model_type", "architectures")})
    layer = vm.layer_config(config, 1)
    widths = (layer.num_attention_heads, layer.num_key_value_heads, layer.intermediate_size, layer.head_dim)
    assert widths == (6, 2, 64, 8)
    assert (config.num_attention_heads, config.intermediate_size) == (8, 96)  # the model's config is untouched
    # what vLLM's LlamaDecoderLayer derives from it: q/k/v bias via qkv_bias if present, o_proj bias = attention_bias
    attention_bias = bool(getattr(layer, "attention_bias", False))
    qkv_bias = layer.qkv_bias if hasattr(layer, "qkv_bias") else attention_bias
    assert (qkv_bias, attention_bias) == ((True, False) if family == "qwen2" else (False, False))


# --- plugin and model module ----------------------------------------------------------------------------------

def test_plugin_imports_without_vllm_and_register_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vllm were not installed, even where it is
    import slimc.vllm.plugin as plugin

    with pytest.raises(SlimcError, match=r"vLLM is not installed: pip install 'slimc\[vllm\]'"):
        plugin.register()


def test_importing_slimc_modules_does_not_import_vllm():
    import slimc.vllm.mapping  # noqa: F401
    import slimc.vllm.plugin  # noqa: F401

    assert "vllm" not in sys.modules or sys.modules["vllm"] is None


class FakeRegistry:
    def __init__(self, archs=()):
        self.archs = set(archs)
        self.calls = []

    def get_supported_archs(self):
        return set(self.archs)

    def register_model(self, arch, cls):
        self.calls.append((arch, cls))
        self.archs.add(arch)


def test_register_is_lazy_and_idempotent(monkeypatch):
    registry = FakeRegistry({"LlamaForCausalLM", "SlimcMistralForCausalLM"})
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(ModelRegistry=registry))
    from transformers import AutoConfig

    from slimc.vllm.plugin import register

    register()
    register()
    assert registry.calls == [(a, f"slimc.vllm.model:{a}") for a in vm.ARCHITECTURES
                              if a != "SlimcMistralForCausalLM"]
    assert type(AutoConfig.for_model("slimc_qwen3")).__name__ == "SlimcQwen3Config"


def test_vllm_model_defines_every_registered_class():
    tree = ast.parse((ROOT / "slimc" / "vllm" / "model.py").read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert vm.VLLM_MODEL_MODULE == "slimc.vllm.model"
    ctor = FIXTURE["layer_construction"]
    for arch in vm.ARCHITECTURES:
        assert arch in classes, arch
    for name, node in classes.items():
        init = next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
        if init is None:
            continue
        params = [a.arg for a in init.args.args[1:] + init.args.kwonlyargs]
        base = node.bases[0].id if isinstance(node.bases[0], ast.Name) else ""
        if name.endswith("ForCausalLM"):
            # vLLM builds the model as cls(vllm_config=..., prefix=...)
            assert params == ctor["LlamaForCausalLM.__init__"], (name, params)
        elif name.endswith("DecoderLayer"):
            # LlamaModel builds layers as layer_type(vllm_config=..., prefix=...)
            assert params[:2] == ["vllm_config", "prefix"] and "config" in params, (name, params)
            vllm_base = {"LlamaDecoderLayer", "MistralDecoderLayer"} & {base}
            for b in vllm_base:
                assert set(params) <= set(ctor[f"{b}.__init__"]), (name, params)


def test_loaded_param_shapes_reports_repacked_cpu_weights_and_tied_weights_once():
    class RepackedLinear(torch.nn.Module):  # what vLLM's CPU build leaves after packing a weight for its GEMM
        def __init__(self, out_features, in_features):
            super().__init__()
            self.output_size_per_partition, self.input_size_per_partition = out_features, in_features
            self.weight = torch.nn.Parameter(torch.empty(0))

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(10, 4)
    model.proj = RepackedLinear(6, 4)
    model.head = torch.nn.Linear(4, 10, bias=False)
    model.head.weight = model.embed.weight  # tied
    info = vm.loaded_param_shapes(model)
    assert info["class"] == "Module"
    assert info["params"] == {"embed.weight": [10, 4], "proj.weight": [6, 4]}
