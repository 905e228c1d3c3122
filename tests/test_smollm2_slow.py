"""Real model, real text: SmolLM2-135M (GGUF) on the Brown split. Marked slow; CI runs it with a small
calibration set and a short evaluation slice so the whole suite stays well under its budget."""
import pytest
import torch

import slimc
from slimc import data
from slimc.evaluate import perplexity
from slimc.load import load_model

pytestmark = pytest.mark.slow

CALIB = dict(calib="brown", calib_samples=8, seq_len=512)
EVAL_TOKENS, EVAL_LEN = 8192, 1024


@pytest.fixture(scope="module")
def dense():
    loaded = load_model("smollm2-135m")
    windows = data.eval_windows(loaded.tokenizer, "brown", EVAL_LEN, EVAL_TOKENS)
    return loaded, windows, perplexity(loaded.model, windows, progress=False)["ppl"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "slimgpt-20"
    return slimc.compile("smollm2-135m", str(out), 0.2, keep_model=True, **CALIB)


@pytest.fixture(scope="module")
def pruned_ppl(dense, pruned):
    """Measured once: two tests compare against it, and each perplexity here is a minute of CI."""
    return perplexity(pruned.model, dense[1], progress=False)["ppl"]


def test_dense_reference_perplexity(dense):
    _, windows, ppl = dense
    assert windows.shape == (8, 1024)
    assert 20 < ppl < 60  # dense SmolLM2 on Brown is ~35-40 depending on window length


def test_gguf_source_behaves_like_a_plain_fp32_model(dense):
    """The GGUF loader's quantizer markers are dropped: the dense model can be cast and exported (the
    dense side of `slimc bench`), its weights are fp32."""
    loaded, _, _ = dense
    assert loaded.model.float() is loaded.model
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_slimgpt_20_within_2x_dense_and_smaller(dense, pruned, pruned_ppl):
    assert pruned_ppl < 2 * dense[2], (pruned_ppl, dense[2])
    p = pruned.report["params"]
    assert abs(p["blocks_reduction"] - 0.2) <= 0.01
    assert p["model_after"] < p["model_before"]


def test_pruned_instruct_model_still_answers_chat_probes(pruned):
    """Chat windows are mixed into calibration by default (the GGUF carries a chat template); the compile's
    own probe (24 built-in prompts, greedy, through the template) finds a model that still answers."""
    cal = pruned.report["plan"]["calibration"]
    assert cal["chat"]["windows"] == round(0.5 * CALIB["calib_samples"])
    assert cal["chat"]["self_generated"]["windows"] > 0 and cal["chat"]["framed"]["windows"] > 0
    probe = pruned.report["chat_probe"]
    assert probe["answered"] >= 0.75, probe
    assert (pruned.output / "README.md").read_text().count("chat probe: answered") == 1


def test_slimgpt_beats_no_compensation_at_same_widths(dense, pruned, pruned_ppl, tmp_path):
    _, windows, _ = dense
    plan = pruned.output / "slimc_plan.json"
    plain = slimc.compile("smollm2-135m", str(tmp_path / "nocomp"), 0.2, plan=str(plan), compensate=False,
                          keep_model=True, **CALIB)
    assert [r["ffn"] for r in plain.report["layers"]] == [r["ffn"] for r in pruned.report["layers"]]
    ppl_plain = perplexity(plain.model, windows, progress=False)["ppl"]
    assert pruned_ppl < ppl_plain, (pruned_ppl, ppl_plain)


def test_reloaded_checkpoint_matches_in_memory_model(pruned):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned.output, trust_remote_code=True)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, pruned.model(ids).logits)


def test_onnx_export_of_pruned_smollm2_matches_torch(pruned, tmp_path):
    """--target onnx on the real pruned model: onnxruntime logits on real text match torch (PARITY_RTOL of the
    logit scale), and greedy decoding through the ONNX KV-cache loop reproduces the torch tokens."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import numpy as np

    from slimc.exporters.onnx import ONNX_DIR, PARITY_RTOL, export_onnx, relative_diff
    from slimc.runtime_onnx import OnnxDecoder

    io = export_onnx(pruned.model, tmp_path)
    assert io["parity_max_rel_diff"] < PARITY_RTOL
    dec = OnnxDecoder(tmp_path / ONNX_DIR)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(pruned.output)
    prompt = tokenizer("The jury said the city election was", add_special_tokens=False)["input_ids"]
    ids = np.array([prompt])
    logits, _ = dec.step(ids, np.ones_like(ids), np.arange(len(prompt))[None], dec.empty_cache(1))
    with torch.no_grad():
        ref = pruned.model(torch.tensor([prompt])).logits
        want = pruned.model.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert relative_diff(torch.from_numpy(logits.numpy()), ref) < PARITY_RTOL
    assert dec.greedy(prompt, 16) == want[0, len(prompt):].tolist()


def test_slimgpt_disp_20_on_the_real_model(dense, tmp_path_factory):
    """--method slimgpt+disp on SmolLM2: hits the ratio, stays within 2x dense perplexity, and the written
    checkpoint (hidden-dim index sets included) reloads to the same logits."""
    loaded, windows, dense_ppl = dense
    out = tmp_path_factory.mktemp("smol") / "slimgpt-disp-20"
    res = slimc.compile("smollm2-135m", str(out), 0.2, method="slimgpt+disp", keep_model=True, **CALIB)
    assert abs(res.report["params"]["blocks_reduction"] - 0.2) <= 0.01
    ppl = perplexity(res.model, windows, progress=False)["ppl"]
    assert ppl < 2 * dense_ppl, (ppl, dense_ppl)
    reloaded = load_model(str(out), allow_slimc=True).model
    with torch.no_grad():
        assert torch.allclose(reloaded(windows[:1, :64]).logits, res.model(windows[:1, :64]).logits, atol=1e-4)
