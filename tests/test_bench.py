import torch

from slimc.load import model_fingerprint
from conftest import tiny_model


def test_dense_export_cache_key_follows_the_weights_not_the_path():
    a, b = tiny_model(seed=0), tiny_model(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(tiny_model(seed=0, intermediate_size=64))


def test_timing_rows_turn_medians_into_speedups_and_ideal_ratios():
    from slimc.bench import forward_macs, timing_rows

    dense, pruned = tiny_model(seed=0), tiny_model(seed=0, intermediate_size=48)
    rows = timing_rows(dense.config, pruned.config, {64: {"dense": 2.0, "pruned": 1.0}},
                       {4: {"dense": 0.03, "pruned": 0.02}}, decode_steps=8)
    prefill, decode = rows
    assert prefill["dense_tok_s"] == 32 and prefill["pruned_tok_s"] == 64 and prefill["speedup"] == 2
    ideal = forward_macs(dense.config, 1, 64, 0) / forward_macs(pruned.config, 1, 64, 0)
    assert prefill["ideal"] == ideal > 1 and prefill["measured_over_ideal"] == 2 / ideal
    assert decode["batch"] == 4 and abs(decode["speedup"] - 1.5) < 1e-12 and decode["dense_ms_tok"] == 30


def test_vllm_runtime_without_vllm_or_gpu_is_one_clear_error(tmp_path, capsys):
    import importlib.util

    import pytest

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is here: the real path (GPU or vLLM's CPU build) runs instead")
    from slimc.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "slimc_plan.json").write_text('{"source_model": "smollm2-135m"}')
    assert main(["bench", str(out), "--runtime", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--runtime vllm needs" in err[0]
