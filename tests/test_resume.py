"""A compile killed or interrupted between blocks continues with --resume and ends with the same bytes as a run
straight through; changed options are refused; Ctrl-C stops at a safe point with one line and exit 130."""
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import slimc
from slimc import resume
from slimc.errors import SlimcError

from conftest import reload_without_slimc, save_tiny_dir

TEXT = " ".join(f"word{i % 97} and thing{i % 13}." for i in range(3000))
LAYERS = 4
OPTS = dict(sparsity=0.4, calib_samples=8, seq_len=32)
BYTES_FILES = ("model.safetensors", "config.json")


class Killed(BaseException):
    """Stands for SIGKILL in-process: not an Exception, so no slimc handler treats it as an error."""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = save_tiny_dir(tmp_path_factory.mktemp("tiny"), "llama", num_hidden_layers=LAYERS, vocab_size=300)
    (d.parent / "calib.txt").write_text(TEXT)
    return d


def _compile(tiny_dir, out, **kw):
    return slimc.compile(str(tiny_dir), str(out), calib=str(tiny_dir.parent / "calib.txt"), **{**OPTS, **kw})


def _digests(out: Path) -> dict:
    return {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in BYTES_FILES}


@pytest.fixture(scope="module")
def straight(tiny_dir, tmp_path_factory):
    """Digests of an uninterrupted compile (reconstruction on, so the dense stream is carried too)."""
    out = tmp_path_factory.mktemp("straight") / "out"
    _compile(tiny_dir, out, reconstruct=True)
    return _digests(out)


def _kill_after(monkeypatch, block: int):
    save = resume.PartialCompile.save_block

    def save_then_die(self, i, *args):
        save(self, i, *args)
        if i == block:
            raise Killed

    monkeypatch.setattr(resume.PartialCompile, "save_block", save_then_die)


def test_the_same_command_gives_the_same_bytes(tiny_dir, straight, tmp_path):
    out = tmp_path / "again"
    _compile(tiny_dir, out, reconstruct=True)
    assert _digests(out) == straight
    assert not resume.partial_dir(out).exists()  # a finished compile leaves no partial state


# the straight run streams (--stream auto); the killed ones alternate between the streamed and in-memory paths
@pytest.mark.parametrize("block,stream", [(b, "on" if b % 2 else "off") for b in range(LAYERS)])
def test_resume_after_a_kill_at_each_block_boundary_gives_the_same_bytes(tiny_dir, straight, tmp_path, monkeypatch,
                                                                          block, stream):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, block)
        with pytest.raises(Killed):
            _compile(tiny_dir, out, reconstruct=True, stream=stream)
    partial = resume.PartialCompile(out)
    assert not out.exists() and partial.progress()["blocks_done"] == block + 1
    if stream == "off":
        with pytest.raises(SlimcError, match=r"started by a whole-model compile: re-run with --stream off"):
            _compile(tiny_dir, out, reconstruct=True, resume=True)
    res = _compile(tiny_dir, out, reconstruct=True, resume=True, stream=stream)
    assert _digests(out) == straight
    assert res.report["resumed"] == {"blocks_already_done": block + 1}
    assert not partial.path.exists()


def test_resumed_disp_compile_keeps_its_index_sets(tiny_dir, tmp_path, monkeypatch):
    """DISP rows carry tensors (each block's index sets) through the partial state."""
    straight = tmp_path / "straight"
    _compile(tiny_dir, straight, method="slimgpt+disp")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 1)
        with pytest.raises(Killed):
            _compile(tiny_dir, out, method="slimgpt+disp")
    _compile(tiny_dir, out, method="slimgpt+disp", resume=True)
    assert _digests(out) == _digests(straight)


def test_partial_state_is_refused_without_resume_and_changed_options_with_it(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(Killed):
            _compile(tiny_dir, out, stream="off")
    with pytest.raises(SlimcError, match=r"unfinished compile \(1 block finished\): pass --resume.*--overwrite"):
        _compile(tiny_dir, out, stream="off")
    with pytest.raises(SlimcError, match=r"--sparsity 0.4 \(now 0.5\)"):
        _compile(tiny_dir, out, resume=True, sparsity=0.5, stream="off")
    with pytest.raises(SlimcError, match=r"--seed 0 \(now 1\)"):
        _compile(tiny_dir, out, resume=True, seed=1, stream="off")
    assert resume.PartialCompile(out).progress()["blocks_done"] == 1  # a refusal keeps the finished work
    # in memory, the output's file layout is free to change (a streamed compile's is not: test_stream.py)
    _compile(tiny_dir, out, resume=True, max_shard_size="20KB", stream="off")
    assert (out / "model.safetensors.index.json").is_file()


def test_changed_source_weights_are_refused_on_resume(tmp_path, monkeypatch):
    src = save_tiny_dir(tmp_path / "src", "llama", num_hidden_layers=LAYERS, vocab_size=300)
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _kill_after(m, 0)
        with pytest.raises(Killed):
            slimc.compile(str(src), str(out), calib=str(tmp_path / "calib.txt"), **OPTS)
    save_tiny_dir(src, "llama", num_hidden_layers=LAYERS, vocab_size=300, initializer_range=0.05)  # other weights, same path
    with pytest.raises(SlimcError, match="weights or config .* changed"):
        slimc.compile(str(src), str(out), calib=str(tmp_path / "calib.txt"), resume=True, **OPTS)


def test_resume_with_nothing_to_resume_starts_fresh_and_says_so(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _compile(tiny_dir, out, resume=True)
    assert "nothing to resume" in capsys.readouterr().err and (out / "model.safetensors").is_file()


def test_an_error_before_any_block_leaves_nothing_behind(tiny_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(SlimcError, match="use fewer --calib-samples"):
        _compile(tiny_dir, out, calib_samples=10_000)
    assert not out.exists() and not resume.partial_dir(out).exists()


def test_sharded_output_loads_without_slimc(tiny_dir, tmp_path):
    out = tmp_path / "out"
    res = _compile(tiny_dir, out, max_shard_size="20KB", keep_model=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = res.model(ids).logits
    logits, _, _ = reload_without_slimc(out, ids, tmp_path)
    torch.testing.assert_close(logits, expected)


def test_malformed_shard_size_is_refused_up_front(tiny_dir, tmp_path):
    with pytest.raises(SlimcError, match="--max-shard-size must be a size"):
        _compile(tiny_dir, tmp_path / "out", max_shard_size="big")


def test_bf16_sharded_source_keeps_bf16_and_its_untouched_tensors(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    src = save_tiny_dir(tmp_path / "src", "llama", num_hidden_layers=2, vocab_size=300)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(src, max_shard_size="30KB")  # a sharded bf16 source
    assert (src / "model.safetensors.index.json").is_file()
    (tmp_path / "calib.txt").write_text(TEXT)
    out = tmp_path / "out"
    slimc.compile(str(src), str(out), calib=str(tmp_path / "calib.txt"), **OPTS)
    written = load_file(out / "model.safetensors")
    assert {t.dtype for t in written.values() if t.is_floating_point()} == {torch.bfloat16}
    source = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(written[name], source[name]), name  # bit for bit: read, kept, written in bf16


SIGNAL_CHILD = """
import os, signal, sys
from slimc import resume
from slimc.cli import main

block, how = int(sys.argv[1]), sys.argv[2]
if how == "int":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `slimc compile ... &` from a script inherits it
save = resume.PartialCompile.save_block

def save_then_signal(self, i, *args):
    save(self, i, *args)
    if i == block:
        os.kill(os.getpid(), signal.SIGINT if how == "int" else signal.SIGKILL)

resume.PartialCompile.save_block = save_then_signal
sys.exit(main(sys.argv[3:]))
"""


def _signalled_compile(tiny_dir, out, block, how):
    args = ["compile", str(tiny_dir), "-o", str(out), "--calib", str(tiny_dir.parent / "calib.txt"),
            "--sparsity", "0.4", "--calib-samples", "8", "--seq-len", "32"]
    return subprocess.run([sys.executable, "-c", SIGNAL_CHILD, str(block), how, *args], capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_sigint_stops_at_a_safe_point_with_one_line_and_exit_130_then_resumes(tiny_dir, tmp_path):
    out = tmp_path / "out"
    r = _signalled_compile(tiny_dir, out, 1, "int")
    assert r.returncode == 130, r.stderr
    lines = [l for l in r.stderr.replace("\r", "\n").splitlines() if l.strip()]  # progress bars, then the line
    assert [l for l in lines if l.startswith("slimc:")] == [lines[-1]], r.stderr
    assert lines[-1].startswith("slimc: interrupted: stopped in block 3 of 4;"), r.stderr
    assert "--resume" in lines[-1] and "Traceback" not in r.stderr
    assert not out.exists() and resume.PartialCompile(out).progress()["blocks_done"] == 2
    straight = tmp_path / "straight"
    _compile(tiny_dir, straight)
    _compile(tiny_dir, out, resume=True)
    assert _digests(out) == _digests(straight)


def test_sigkill_then_resume_gives_the_same_bytes(tiny_dir, tmp_path):
    out = tmp_path / "out"
    r = _signalled_compile(tiny_dir, out, 2, "kill")
    assert r.returncode == -signal.SIGKILL and not out.exists()
    assert resume.PartialCompile(out).progress()["blocks_done"] == 3
    straight = tmp_path / "straight"
    _compile(tiny_dir, straight)
    _compile(tiny_dir, out, resume=True)
    assert _digests(out) == _digests(straight)
