"""--stream holds one decoder block at a time and writes the same bytes as the in-memory compile; the checkpoint
writer lays shards out up front; GGUF q/k rows come back in transformers' order."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import slimc
from slimc import resume, source
from slimc.report import format_report
from slimc.checkpoint import CheckpointWriter, Entry, plan_shards, write_state
from slimc.errors import SlimcError
from slimc.load import load_model, model_fingerprint

from conftest import TINY_CHAT_TEMPLATE, reload_without_slimc, save_tiny_dir

TEXT = " ".join(f"word{i % 97} and thing{i % 13}." for i in range(3000))
OPTS = dict(sparsity=0.4, calib_samples=8, seq_len=32)


class Killed(BaseException):
    pass


def _source(tmp_path, family="llama", dtype=None, shard=None, chat_template=None, **overrides):
    d = save_tiny_dir(tmp_path / f"src-{family}", family, chat_template, num_hidden_layers=4, vocab_size=300, **overrides)
    if dtype or shard:  # re-save: bf16 weights, sharded
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype or torch.float32)
        for f in d.glob("model*.safetensors"):
            f.unlink()
        m.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    (tmp_path / "calib.txt").write_text(TEXT)
    return d


def _compile(src, out, **kw):
    return slimc.compile(str(src), str(out), calib=str(src.parent / "calib.txt"), **{**OPTS, **kw})


def _files(out: Path) -> dict:
    # report.json and the model card (README.md) record times and how the compile ran; the rest must match
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in ("report.json", "README.md")}


@pytest.mark.parametrize("family,kw", [("qwen2", {"reconstruct": True, "chat_calib": "off"}), ("qwen3", {"target": "vllm"})])
def test_streamed_compile_writes_the_same_bytes_as_the_in_memory_one(tmp_path, monkeypatch, family, kw):
    # qwen3 with tied embeddings: the skeleton must read the shared embedding / lm_head once, up front
    src = _source(tmp_path, family, chat_template=TINY_CHAT_TEMPLATE, tie_word_embeddings=family == "qwen3")
    # each compile answers the self-generated chat instructions itself (its own empty cache): the streamed one
    # with every block read in for that moment
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path / "cache-streamed"))
    _compile(src, tmp_path / "streamed", stream="on", **kw)
    monkeypatch.setenv("SLIMC_CACHE", str(tmp_path / "cache-memory"))
    _compile(src, tmp_path / "memory", stream="off", **kw)
    if kw.get("chat_calib") != "off":
        assert len(list((tmp_path / "cache-streamed" / "chat-calib").iterdir())) == 1
    a, b = _files(tmp_path / "memory"), _files(tmp_path / "streamed")
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("memory", "streamed")]
    assert reports[1]["streamed"] is True and reports[0]["streamed"] is False
    # the report's sample, read back block by block, is the in-memory model's greedy continuation
    assert reports[1]["sample"] == reports[0]["sample"] and reports[1]["chat_probe"] == reports[0]["chat_probe"]


def test_sharded_bf16_source_streams_into_sharded_output_that_stock_transformers_loads(tmp_path):
    src = _source(tmp_path, "llama", dtype=torch.bfloat16, shard="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    _compile(src, tmp_path / "memory", max_shard_size="60KB", stream="off")
    res = _compile(src, tmp_path / "streamed", max_shard_size="60KB", stream="on")
    a, b = _files(tmp_path / "memory"), _files(tmp_path / "streamed")
    assert [name for name in a if a.get(name) != b.get(name)] == [] and sorted(a) == sorted(b)
    out = tmp_path / "streamed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    # bf16 kept outside the pruned projections too, and those tensors are the source's bits
    src_state = {}
    for f in src.glob("model*.safetensors"):
        src_state.update(load_file(f))
    out_state = {}
    for f in set(index["weight_map"].values()):
        out_state.update(load_file(out / f))
    assert {t.dtype for t in out_state.values()} == {torch.bfloat16}
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.2.input_layernorm.weight"):
        assert torch.equal(out_state[name], src_state[name]), name
    ids = torch.randint(0, 300, (1, 12))
    logits, words, _ = reload_without_slimc(out, ids, tmp_path)
    assert int(words[-1]) == res.report["params"]["model_after"]


def test_a_streamed_compile_holds_at_most_one_block(tmp_path, monkeypatch):
    src = _source(tmp_path)
    live = []
    fetch = source.fetch_block

    def counting_fetch(loaded, i):
        block = fetch(loaded, i)
        live.append(sum(not next(b.parameters()).is_meta for b in loaded.model.model.layers))
        return block

    monkeypatch.setattr(source, "fetch_block", counting_fetch)
    monkeypatch.setattr("slimc.stream.fetch_block", counting_fetch)
    res = _compile(src, tmp_path / "out", stream="on")
    assert len(live) >= 4 and max(live) == 1
    # each block's row carries the process's high-water mark so far, in the printed report too
    peaks = [row["peak_rss_mb"] for row in res.report["layers"]]
    assert len(peaks) >= 4 and peaks == sorted(peaks) and peaks[0] > 100
    assert f"{peaks[-1]:,}" in format_report(res.report)


def test_streamed_source_fingerprint_is_the_loaded_models(tmp_path):
    src = _source(tmp_path, "qwen2", dtype=torch.bfloat16)
    skeleton = source.load_skeleton(str(src))
    assert all(p.is_meta for p in skeleton.model.model.layers.parameters())
    assert model_fingerprint(skeleton.model, skeleton.source) == model_fingerprint(load_model(str(src), "float32").model)


def test_streamed_compile_killed_after_a_block_resumes_to_the_same_bytes(tmp_path, monkeypatch, block=1):
    src = _source(tmp_path)
    _compile(src, tmp_path / "straight", stream="on", max_shard_size="80KB")
    save = resume.PartialCompile.save_block

    def save_then_die(self, i, *args):
        save(self, i, *args)
        if i == block:
            raise Killed

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(resume.PartialCompile, "save_block", save_then_die)
        with pytest.raises(Killed):
            _compile(src, out, stream="on", max_shard_size="80KB")
    assert not out.exists() and (tmp_path / "out.partial" / "weights").is_dir()
    with pytest.raises(SlimcError, match="max-shard-size"):  # the finished blocks sit in shards of that layout
        _compile(src, out, stream="on", resume=True, max_shard_size="70KB")
    res = _compile(src, out, stream="on", resume=True, max_shard_size="80KB")
    assert res.report["resumed"] == {"blocks_already_done": block + 1}
    assert _files(out) == _files(tmp_path / "straight")
    assert not (tmp_path / "out.partial").exists()


def test_resume_refuses_a_partial_state_whose_shards_are_gone(tmp_path, monkeypatch):
    src = _source(tmp_path)
    save = resume.PartialCompile.save_block

    def save_then_die(self, i, *args):
        save(self, i, *args)
        raise Killed

    monkeypatch.setattr(resume.PartialCompile, "save_block", save_then_die)
    with pytest.raises(Killed):
        _compile(src, tmp_path / "out", stream="on")
    (tmp_path / "out.partial" / "weights" / "model.safetensors").unlink()
    monkeypatch.undo()
    with pytest.raises(SlimcError, match="missing or does not hold"):
        _compile(src, tmp_path / "out", stream="on", resume=True)


@pytest.mark.parametrize("kw,word", [({"target": "onnx"}, "--target onnx"), ({"refit": True}, "--refit"),
                                      ({"method": "slimgpt+disp"}, "--method slimgpt+disp"),
                                      ({"schedule": "measured"}, "--schedule measured"),
                                      ({"distill_epochs": 1}, "--distill-epochs")])
def test_stream_refuses_what_needs_the_whole_model_in_one_line(tmp_path, kw, word):
    with pytest.raises(SlimcError, match=re.escape(word)) as e:
        _compile(tmp_path / "nowhere", tmp_path / "out", stream="on", **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_writer_plans_shards_in_order_and_safetensors_reads_them(tmp_path):
    tensors = {"a": torch.randn(10, 3), "b": torch.arange(7), "c": torch.randn(5).to(torch.bfloat16),
               "d": torch.randn(40, 2).half()}
    entries = [Entry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    shards = plan_shards(entries, 130)
    assert [[e.name for e in s.entries] for s in shards] == [["a"], ["b", "c"], ["d"]]  # 120 | 56+10 | 160 bytes
    writer = CheckpointWriter(tmp_path, entries, 130)
    for name in ("d", "a", "c", "b"):  # any order: each tensor has its place
        writer.write(name, tensors[name])
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 120 + 56 + 10 + 160
    read = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(tmp_path / f, "pt") as h:
            assert h.metadata() == {"format": "pt"}
            read.update({k: h.get_tensor(k) for k in h.keys()})
    assert read.keys() == tensors.keys() and all(torch.equal(read[k], tensors[k]) for k in tensors)
    (tmp_path / "again").mkdir()
    with pytest.raises(RuntimeError, match="layout has"):
        CheckpointWriter(tmp_path / "again", entries).write("a", torch.randn(3, 10))


def test_writer_refuses_to_close_with_a_tensor_missing(tmp_path):
    writer = CheckpointWriter(tmp_path, [Entry("a", (2,), torch.float32), Entry("b", (2,), torch.float32)])
    writer.write("a", torch.ones(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.close()


def test_write_state_matches_a_plain_safetensors_round_trip(tmp_path):
    from conftest import tiny_model

    model = tiny_model("qwen2")
    write_state(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    want = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert script does to q/k rows (written from its description: per head, the two
    rotary halves interleaved row by row)."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        rows = w[h * d : (h + 1) * d]
        out[h * d : (h + 1) * d : 2], out[h * d + 1 : (h + 1) * d : 2] = rows[: d // 2], rows[d // 2 :]
    return out


@pytest.mark.parametrize("n_heads,shape", [(3, (12, 5)), (2, (16,)), (4, (8, 3))])
def test_gguf_rows_come_back_in_transformers_rotary_order(n_heads, shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert np.array_equal(source.unpermute_rotary_rows(_llama_cpp_permute(w, n_heads), n_heads), w)


@pytest.mark.slow
def test_builtin_gguf_streams_exactly_what_transformers_loads():
    """SmolLM2's GGUF (Q4_1 blocks, llama q/k order, tied output) tensor by tensor against the whole load."""
    full = load_model("smollm2-135m", dtype="float32").model
    skeleton = source.load_skeleton("smollm2-135m")
    want = dict(full.named_parameters())
    for name, p in skeleton.model.named_parameters():
        if not p.is_meta:
            assert torch.equal(p, want[name]), name
    for i in (0, 17, 29):
        for name, p in source.fetch_block(skeleton, i).named_parameters():
            assert torch.equal(p, want[f"model.layers.{i}.{name}"]), name
        source.release_block(skeleton, i)
    assert all(p.is_meta for p in skeleton.model.model.layers.parameters())
    buffers = dict(full.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in skeleton.model.named_buffers())
    assert model_fingerprint(skeleton.model, skeleton.source) == model_fingerprint(full)


def test_stream_auto_streams_a_local_source_unless_an_option_needs_the_whole_model(tmp_path):
    src = _source(tmp_path)
    assert _compile(src, tmp_path / "auto").report["streamed"] is True
    assert _compile(src, tmp_path / "refit", refit=True).report["streamed"] is False
    res = _compile(src, tmp_path / "kept", keep_model=True)  # the Python API asked for the model in memory
    assert res.report["streamed"] is False and not any(p.is_meta for p in res.model.parameters())
    assert source.streamable_source("smollm2-135m") and not source.streamable_source("someone/some-model")


def test_a_reused_disp_plan_compiles_in_memory_and_stream_on_refuses_it(tmp_path):
    """A DISP plan brings its method along even when --method is left at its default: auto must not stream it
    (the streamed writer knows only full-width hidden dims), and --stream on must say why in one line."""
    src = _source(tmp_path)
    first = _compile(src, tmp_path / "disp", method="slimgpt+disp")
    plan = tmp_path / "disp" / "slimc_plan.json"
    assert json.loads(plan.read_text())["method"] == "slimgpt+disp"
    again = _compile(src, tmp_path / "again", plan=str(plan))
    assert again.report["streamed"] is False
    assert _files(tmp_path / "again")["model.safetensors"] == _files(first.output)["model.safetensors"]
    with pytest.raises(SlimcError, match="selects hidden dimensions") as e:
        _compile(src, tmp_path / "on", plan=str(plan), stream="on")
    assert "\n" not in str(e.value) and not (tmp_path / "on").exists()


@pytest.mark.parametrize("kw,word", [({"target": "onnx"}, "--target onnx"), ({"stream": "off"}, "--stream off")])
def test_a_whole_model_compile_that_cannot_fit_is_refused_before_loading(tmp_path, monkeypatch, kw, word):
    src = _source(tmp_path)
    monkeypatch.setattr("slimc.stream.memory_total", lambda: 1 << 10)  # a 1 KiB machine
    with pytest.raises(SlimcError, match=re.escape(word) + ".* GiB in fp32, more than") as e:
        _compile(src, tmp_path / "out", **kw)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    monkeypatch.setattr("slimc.stream.memory_total", lambda: 1 << 40)
    _compile(src, tmp_path / "out", **kw)  # the same compile where it fits


def test_the_fingerprint_sums_a_tensor_in_fp64_chunks():
    from slimc.load import _sum_in_fp64

    p = torch.randn(1000, 37, generator=torch.Generator().manual_seed(0)) * 1e3
    assert _sum_in_fp64(p, chunk=256) == pytest.approx(p.double().sum().item(), rel=1e-12, abs=1e-6)
    assert _sum_in_fp64(torch.empty(0, 4)) == 0.0
