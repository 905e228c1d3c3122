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
from slimc.errors import SlimcError  # noqa: E402
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


def test_bench_exports_a_model_compiled_for_another_target_once(tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """A --target hf output (or any checkpoint, with --against) is benched on onnxruntime through an export
    cached by fingerprint, next to the dense one; nothing is written into the output directory."""
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "hf"
    slimc.compile(str(tiny_dir), str(out), 0.3, calib=str(tiny_dir.parent / "calib.txt"), calib_samples=8, seq_len=32)
    assert not (out / "onnx").exists()
    kw = dict(prompts=(16,), batches=(1,), decode_steps=2, reps=1)
    r = run_bench(str(out), "onnxruntime", against=str(tiny_dir), **kw)
    assert r["params_pruned"] < r["params_dense"] and [row["phase"] for row in r["rows"]] == ["prefill", "decode"]
    exports = sorted((tmp_path / "cache" / "onnx-exports").iterdir())
    assert len(exports) == 2 and all((d / "onnx" / "io.json").is_file() for d in exports)
    assert capsys.readouterr().out.count("exporting") == 2
    run_bench(str(out), "onnxruntime", against=str(tiny_dir), **kw)
    assert "exporting" not in capsys.readouterr().out  # both exports come from the cache
    assert not (out / "onnx").exists()


def test_bench_of_a_plain_checkpoint_needs_against(tiny_dir):  # noqa: F811
    with pytest.raises(SlimcError, match="pass --against"):
        run_bench(str(tiny_dir), "torch")
    r = run_bench(str(tiny_dir), "torch", against=str(tiny_dir), prompts=(8,), batches=(1,), decode_steps=1, reps=1)
    assert r["params_pruned"] == r["params_dense"]


def test_flop_count_by_hand():
    class C:
        hidden_size, num_attention_heads, head_dim, vocab_size, num_hidden_layers = 8, 2, 4, 10, 1
        layer_num_attention_heads, layer_num_key_value_heads, layer_intermediate_size = [2], [1], [6]
    # q 8*8 + k,v 2*8*4 + o 8*8 = 192; mlp 3*8*6 = 144; attention 2*2*1*3*4 = 48 (seq 1, past 2); head 80
    assert forward_macs(C, batch=1, seq=1, past=2) == 192 + 144 + 48 + 80
    assert forward_macs(C, batch=3, seq=1, past=2) == 3 * (192 + 144 + 48 + 80)


@pytest.fixture(scope="module")
def onnx_disp_out(tiny_dir, tmp_path_factory):  # noqa: F811
    """A slimgpt+disp compile whose plan is then edited so that every index set occurs (what the allocator picks
    on a random tiny model is arbitrary), recompiled from that plan to ONNX."""
    d = tmp_path_factory.mktemp("onnx-disp")
    calib = dict(calib=str(tiny_dir.parent / "calib.txt"), calib_samples=8, seq_len=32)
    slimc.compile(str(tiny_dir), str(d / "plan"), 0.4, method="slimgpt+disp", **calib)
    plan = json.loads((d / "plan" / "slimc_plan.json").read_text())
    for i, layer in enumerate(plan["layers"]):
        layer.update(attn_in_dims=40 + i, attn_out_dims=50 - i, mlp_in_dims=44, mlp_out_dims=60 - 2 * i)
    (d / "plan.json").write_text(json.dumps(plan))
    res = slimc.compile(str(tiny_dir), str(d / "out"), 0.4, target="onnx", plan=str(d / "plan.json"),
                        keep_model=True, **calib)
    return d / "out", res


def test_onnx_disp_model_gathers_and_scatters_and_decodes_like_torch(onnx_disp_out):
    """DISP index sets are Gather / ScatterElements(add) over initializers (never a 0/1 matmul), the graph's
    inputs stay the decoder's own, logits match torch and the greedy decode loop reproduces torch's tokens."""
    import onnx

    out, res = onnx_disp_out
    cfg = res.model.config
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    n_reads = sum(d < cfg.hidden_size for key in ("layer_attn_in_dims", "layer_mlp_in_dims") for d in getattr(cfg, key))
    n_writes = sum(d < cfg.hidden_size for key in ("layer_attn_out_dims", "layer_mlp_out_dims") for d in getattr(cfg, key))
    assert n_reads and n_writes
    scatters = [n for n in graph.node if n.op_type == "ScatterElements"]
    assert len(scatters) == n_writes
    assert all(a.s == b"add" for n in scatters for a in n.attribute if a.name == "reduction")
    assert not [n for n in graph.node if n.op_type == "ScatterND"]
    # reads: Gather on the last axis of the normalized residual, indices stored in the graph (the optimizer may
    # rename the initializer), never computed from the inputs
    stored = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    reads = [n for n in graph.node if n.op_type == "Gather" and n.input[1] not in ("input_ids",)]
    assert len(reads) == n_reads and all(n.input[1] in stored for n in reads)
    assert all(a.i in (-1, 2) for n in reads for a in n.attribute if a.name == "axis")
    assert all(n.input[1] in stored or n.input[1].startswith("expand") for n in scatters)
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert all(i.name.startswith("past.") for i in graph.input[3:])
    io = json.loads((out / "onnx" / "io.json").read_text())
    assert io["parity_max_rel_diff"] < 1e-4
    prompt = [50, 51, 52, 60, 61]
    with torch.no_grad():
        ref = res.model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
    assert OnnxDecoder(out / "onnx").greedy(prompt, 10) == ref[0, len(prompt):].tolist()
    # the FLOP-ideal of a DISP model counts only the narrowed projections
    from slimc.bench import forward_macs

    dense = type("C", (), {k: getattr(cfg, k) for k in ("hidden_size", "num_attention_heads", "head_dim", "vocab_size",
                                                     "num_hidden_layers", "num_key_value_heads", "intermediate_size")})
    assert forward_macs(cfg, 1, 8, 0) < forward_macs(dense, 1, 8, 0)


def test_onnx_flap_model_carries_its_biases_and_decodes_like_torch(tiny_dir, tmp_path):  # noqa: F811
    """FLAP's compensation biases (o_proj / down_proj, which Llama has none of) reach the ONNX graph."""
    res = slimc.compile(str(tiny_dir), str(tmp_path / "out"), 0.3, target="onnx", method="flap",
                        calib=str(tiny_dir.parent / "calib.txt"), calib_samples=8, seq_len=32, keep_model=True)
    io = json.loads((tmp_path / "out" / "onnx" / "io.json").read_text())
    assert io["parity_max_abs_diff"] < 1e-3 and io["parity_max_rel_diff"] < 1e-4
    assert res.model.config.layer_output_bias == [1, 1, 1]
    prompt = [50, 51, 52, 60, 61]
    with torch.no_grad():
        ref = res.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert OnnxDecoder(tmp_path / "out" / "onnx").greedy(prompt, 8) == ref[0, len(prompt):].tolist()
