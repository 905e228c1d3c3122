import json

import pytest

from slimc.config import DEFAULT_ALIGN_FFN, TARGETS, CompileConfig
from slimc.errors import SlimcError


def test_config_round_trips_through_json():
    cfg = CompileConfig("smollm2-135m", "out", sparsity=0.35, target="onnx", gqa="groups", align_ffn=16, seed=3,
                        compensate=False)
    again = CompileConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg
    assert json.loads(cfg.to_json())["format"] == "slimc.compile-config/1"


@pytest.mark.parametrize("target", TARGETS)
def test_align_ffn_defaults_per_target_and_is_recorded(target):
    cfg = CompileConfig("m", "o", target=target)
    assert cfg.align_ffn == DEFAULT_ALIGN_FFN[target]
    # the resolved value, not None, is what lands in the JSON stored with the checkpoint
    assert json.loads(cfg.to_json())["align_ffn"] == DEFAULT_ALIGN_FFN[target]


def test_explicit_align_ffn_wins_over_the_target_default():
    assert CompileConfig("m", "o", target="onnx", align_ffn=7).align_ffn == 7


@pytest.mark.parametrize("kwargs, message", [
    ({"align_ffn": 0}, "--align-ffn"),
    ({"sparsity": 0.95}, "--sparsity"),
    ({"target": "tensorrt"}, "--target"),
    ({"gqa": "heads"}, "--gqa"),
    ({"chat_calib": "yes"}, "--chat-calib"),
    ({"chat_data": "web"}, "--chat-data"),
    ({"chat_mix": 0}, "--chat-mix"),
    ({"chat_mix": 5}, "--chat-mix"),
    ({"reconstruct_epochs": 0}, "--reconstruct-epochs"),
    ({"reconstruct_batch": 0}, "--reconstruct-batch"),
    ({"reconstruct_lr": 0}, "--reconstruct-lr"),
    ({"distill_epochs": -1}, "--distill-epochs"),
    ({"distill_lr": -1e-5}, "--distill-lr"),
    ({"distill_windows": -1}, "--distill-windows"),
    ({"distill_windows": 64}, "give --distill-epochs too"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(SlimcError, match=message):
        CompileConfig("m", "o", **kwargs)


def test_the_command_line_and_the_vllm_mapping_import_neither_torch_nor_transformers():
    """`slimc --help` and an argument error answer at once, and slimc.vllm.mapping is the plain Python its docstring
    says: slimc's model types are registered by its loaders, not by `import slimc` (which pulled in torch and
    transformers, seconds before any answer)."""
    import subprocess
    import sys

    code = ("import sys, slimc, slimc.cli, slimc.config, slimc.vllm.mapping; "
            "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_slimc_model_types_are_registered_by_the_loader():
    """In a fresh process (in this one an earlier test's load_model may have registered them already): the types
    are unknown after `import slimc.load` and known after register_auto_classes, which may run any number of times."""
    import subprocess
    import sys

    code = ("from transformers.models.auto.configuration_auto import CONFIG_MAPPING; "
            "from transformers import AutoConfig; from slimc.load import register_auto_classes; "
            "before = 'slimc_llama' in CONFIG_MAPPING; register_auto_classes(); register_auto_classes(); "
            "print(before, type(AutoConfig.for_model('slimc_llama')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "SlimcLlamaConfig"]
