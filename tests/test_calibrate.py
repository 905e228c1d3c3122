"""Calibration by halves (slimc.calibrate.block_halves): the attention and MLP halves of a pre-norm block are the
block, a block of another form is refused, and a compile run by halves writes the same bytes as one that runs
whole blocks for every pass."""
import hashlib

import pytest
import torch
from torch import nn

import slimc
from slimc import pipeline
from slimc.calibrate import (BlockInputs, block_halves, catch_block_inputs, collect_hessians, decoder_layers,
                             run_block)

from conftest import FAMILIES, save_tiny_dir, tiny_model
from test_compile_e2e import TEXT


def _inputs(model, n=4, seq=16):
    ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(0))
    return catch_block_inputs(model, ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_halves_are_the_block(family):
    model = tiny_model(family)
    inputs = _inputs(model)
    block = decoder_layers(model)[1]
    halves = block_halves(block, inputs, "cpu")
    assert halves is not None
    with torch.no_grad():
        whole = run_block(block, inputs, 2, "cpu")
        split = halves.mlp(halves.attention(inputs.hidden))
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)


def test_mlp_input_stats_sees_what_the_whole_block_feeds_down_proj():
    model = tiny_model("llama")
    inputs = _inputs(model)
    block = decoder_layers(model)[0]
    halves = block_halves(block, inputs, "cpu")
    with torch.no_grad(), collect_hessians(block, ["mlp.down_proj"]) as whole:
        run_block(block, inputs, 2, "cpu", keep_outputs=False)
    with torch.no_grad(), collect_hessians(block, ["mlp.down_proj"]) as split:
        halves.mlp_input_stats(halves.attention(inputs.hidden), stop_at=block.mlp.down_proj)
    torch.testing.assert_close(split["mlp.down_proj"].H, whole["mlp.down_proj"].H)


class _PostNormBlock(nn.Module):
    """The same parts wired as a post-norm block (norm after the residual add): not the halves' form."""

    def __init__(self, block):
        super().__init__()
        self.input_layernorm, self.self_attn = block.input_layernorm, block.self_attn
        self.post_attention_layernorm, self.mlp = block.post_attention_layernorm, block.mlp

    def forward(self, x, **kwargs):
        h = self.input_layernorm(x + self.self_attn(hidden_states=x, **kwargs)[0])
        return self.post_attention_layernorm(h + self.mlp(h))


def test_a_block_of_another_form_is_run_whole():
    model = tiny_model("llama")
    inputs = _inputs(model)
    assert block_halves(_PostNormBlock(decoder_layers(model)[0]), inputs, "cpu") is None
    assert block_halves(nn.Linear(64, 64), BlockInputs(inputs.hidden, {}), "cpu") is None


def _digest(out):
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("options", [{"method": "slimgpt"}, {"method": "magnitude"},
                                     # a fit kept in blocks 1 and 2 (OBS leaves it nothing to gain on this model)
                                     {"method": "magnitude", "reconstruct": True, "reconstruct_epochs": 4}])
def test_compile_by_halves_writes_the_same_bytes(tmp_path, monkeypatch, options):
    d = save_tiny_dir(tmp_path / "tiny", "qwen2", vocab_size=300)
    (tmp_path / "calib.txt").write_text(TEXT)
    kw = dict(sparsity=0.5, calib=str(tmp_path / "calib.txt"), calib_samples=8, seq_len=32,
              align_ffn=1, chat_calib="off", batch_size=3, **options)
    split = []
    real = pipeline.block_halves

    def recording(*args):
        split.append(real(*args))
        return split[-1]

    monkeypatch.setattr(pipeline, "block_halves", recording)
    res = slimc.compile(str(d), str(tmp_path / "halves"), **kw)
    if "reconstruct" in options:
        assert any(row["reconstruct"]["kept"] for row in res.report["layers"])
    assert len(split) == 3 and all(h is not None for h in split)  # every block ran by halves
    monkeypatch.setattr(pipeline, "block_halves", lambda *a: None)
    slimc.compile(str(d), str(tmp_path / "whole"), **kw)
    assert _digest(tmp_path / "halves") == _digest(tmp_path / "whole")


def test_the_block_error_is_measured_on_the_first_windows_and_the_card_says_so(tmp_path):
    d = save_tiny_dir(tmp_path / "tiny", "llama", vocab_size=300)
    (tmp_path / "calib.txt").write_text(TEXT * 2)
    res = slimc.compile(str(d), str(tmp_path / "out"), sparsity=0.5, calib=str(tmp_path / "calib.txt"),
                        calib_samples=pipeline.ERROR_WINDOWS + 4, seq_len=32, chat_calib="off", keep_model=True)
    rows = res.report["layers"]
    assert all(r["rel_error_windows"] == pipeline.ERROR_WINDOWS and r["rel_error"] > 0 for r in rows)
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"on the first {pipeline.ERROR_WINDOWS} calibration windows" in card
