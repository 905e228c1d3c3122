"""Real model, real text: SmolLM2-135M (GGUF) on the Brown split. Marked slow; CI runs it with a small
calibration set and a short evaluation slice so the whole suite stays well under its budget."""
import pytest
import torch

import slimc
from slimc import data
from slimc.evaluate import perplexity
from slimc.load import load_model

pytestmark = pytest.mark.slow

CALIB = dict(calib="brown", calib_samples=16, seq_len=512)
EVAL_TOKENS, EVAL_LEN = 16_384, 1024


@pytest.fixture(scope="module")
def dense():
    loaded = load_model("smollm2-135m")
    windows = data.eval_windows(loaded.tokenizer, "brown", EVAL_LEN, EVAL_TOKENS)
    return loaded, windows, perplexity(loaded.model, windows, progress=False)["ppl"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "slimgpt-20"
    return slimc.compile("smollm2-135m", str(out), 0.2, keep_model=True, **CALIB)


def test_dense_reference_perplexity(dense):
    _, windows, ppl = dense
    assert windows.shape == (16, 1024)
    assert 20 < ppl < 60  # dense SmolLM2 on Brown is ~35-40 depending on window length


def test_slimgpt_20_within_2x_dense_and_smaller(dense, pruned):
    _, windows, dense_ppl = dense
    ppl = perplexity(pruned.model, windows, progress=False)["ppl"]
    assert ppl < 2 * dense_ppl, (ppl, dense_ppl)
    p = pruned.report["params"]
    assert abs(p["blocks_reduction"] - 0.2) <= 0.01
    assert p["model_after"] < p["model_before"]


def test_slimgpt_beats_no_compensation_at_same_widths(dense, pruned, tmp_path):
    _, windows, _ = dense
    plan = pruned.output / "slimc_plan.json"
    plain = slimc.compile("smollm2-135m", str(tmp_path / "nocomp"), 0.2, plan=str(plan), compensate=False,
                          keep_model=True, **CALIB)
    assert [r["ffn"] for r in plain.report["layers"]] == [r["ffn"] for r in pruned.report["layers"]]
    ppl_comp = perplexity(pruned.model, windows, progress=False)["ppl"]
    ppl_plain = perplexity(plain.model, windows, progress=False)["ppl"]
    assert ppl_comp < ppl_plain, (ppl_comp, ppl_plain)


def test_reloaded_checkpoint_matches_in_memory_model(pruned):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned.output, trust_remote_code=True)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pruned.model(ids).logits)
