"""--target onnx on a tiny model: onnxruntime logits match torch, greedy decoding through the ONNX cache loop
reproduces the torch tokens, and `slimc bench` runs end to end (no timing assertions)."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import slimc  # noqa: E402
from slimc.bench import forward_macs, run_bench  # noqa: E402
from slimc.runtime_onnx import OnnxDecoder  # noqa: E402

from test_compile_e2e import tiny_dir  # noqa: E402,F401  (module fixture: a tiny Llama on disk)


@pytest.fixture(scope="module")
def onnx_out(tiny_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("onnx") / "out"
    res = slimc.compile(str(tiny_dir), str(out), 0.3, target="onnx", calib=str(tiny_dir.parent / "calib.txt"),
                        calib_samples=8, seq_len=32, keep_model=True)
    return out, res


def test_onnx_logits_match_torch(onnx_out):
    out, res = onnx_out
    io = json.loads((out / "onnx" / "io.json").read_text())
    assert io["kv_heads"] == res.model.config.layer_num_key_value_heads
    assert io["parity_max_abs_diff"] < 1e-3 and io["parity_max_rel_diff"] < 1e-4
    dec = OnnxDecoder(out / "onnx")
    ids = np.array([[5, 17, 44, 60, 71, 3, 99]])
    logits, cache = dec.step(ids, np.ones_like(ids), np.arange(7)[None], dec.empty_cache(1))
    with torch.no_grad():
        ref = res.model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(logits.numpy(), ref, atol=1e-4, rtol=1e-4)
    assert [c.shape()[1] for c in cache[::2]] == io["kv_heads"]


def test_onnx_greedy_decode_reproduces_torch_tokens(onnx_out):
    out, res = onnx_out
    prompt = [50, 51, 52, 60, 61]
    with torch.no_grad():
        ref = res.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    got = OnnxDecoder(out / "onnx").greedy(prompt, 12)
    assert got == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_bench_runs_end_to_end(onnx_out, tiny_dir, runtime, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path))  # the dense ONNX export is cached here
    out, _ = onnx_out
    r = run_bench(str(out), runtime, against=str(tiny_dir), prompts=(16, 32), batches=(1, 2), decode_steps=3, reps=1)
    assert [row["phase"] for row in r["rows"]] == ["prefill", "prefill", "decode", "decode"]
    assert all(row["ideal"] > 1 and row["speedup"] > 0 for row in r["rows"])
    assert r["params_pruned"] < r["params_dense"]


def test_flop_count_by_hand():
    class C:
        hidden_size, num_attention_heads, head_dim, vocab_size, num_hidden_layers = 8, 2, 4, 10, 1
        layer_num_attention_heads, layer_num_key_value_heads, layer_intermediate_size = [2], [1], [6]
    # q 8*8 + k,v 2*8*4 + o 8*8 = 192; mlp 3*8*6 = 144; attention 2*2*1*3*4 = 48 (seq 1, past 2); head 80
    assert forward_macs(C, batch=1, seq=1, past=2) == 192 + 144 + 48 + 80
    assert forward_macs(C, batch=3, seq=1, past=2) == 3 * (192 + 144 + 48 + 80)
