"""--compute-dtype: the blocks' matmuls run in bfloat16 inside a compile's forwards only, the Hessians stay float32,
and a bfloat16 compile prunes the same widths with block errors close to the float32 compile's."""
import pytest
import torch
from torch import nn

import slimc
from slimc import calibrate
from slimc.calibrate import (HessianAccumulator, compute_dtype, forward_precision, resolve_compute_dtype,
                             run_batches)
from slimc.config import CompileConfig
from slimc.errors import SlimcError

from conftest import save_tiny_dir
from test_compile_e2e import TEXT


def test_forwards_are_autocast_only_inside_a_bfloat16_compile():
    lin, x = nn.Linear(8, 8), torch.randn(2, 8)
    with forward_precision("cpu"):
        assert lin(x).dtype == torch.float32
    with compute_dtype(torch.bfloat16):
        with forward_precision("cpu"):
            assert lin(x).dtype == torch.bfloat16
        assert lin(x).dtype == torch.float32  # OBS and everything else outside the forwards: untouched
        out = run_batches(lin, x[None].expand(3, 2, 8), batch_size=2, device="cpu")
        assert out.dtype == torch.bfloat16
    with compute_dtype(torch.float32), forward_precision("cpu"):
        assert lin(x).dtype == torch.float32


def test_the_hessian_stays_float32_inside_a_bfloat16_forward():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    x = torch.randn(512, 64) * torch.linspace(0.1, 10, 64)  # uneven scales, as real activations have
    acc = HessianAccumulator(lin)
    with compute_dtype(torch.bfloat16), forward_precision("cpu"):
        lin(x)
    H = acc.remove()
    exact = 2 / len(x) * x.double().T @ x.double()
    # a bfloat16 X^T X would be ~2e-3 off (every entry rounded to 8 bits)
    assert float((H - exact).norm() / exact.norm()) < 1e-5


def test_auto_is_bfloat16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_compute_dtype("auto", "cpu") == torch.float32
    assert resolve_compute_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_compute_dtype("float32", "cpu") == torch.float32
    assert not calibrate.bfloat16_is_fast("meta")


def test_an_unknown_compute_dtype_is_one_line():
    with pytest.raises(SlimcError, match="--compute-dtype must be one of auto, float32, bfloat16"):
        CompileConfig(model="m", output="o", compute_dtype="float16")


def test_a_bfloat16_compile_prunes_the_same_widths_with_close_errors(tmp_path):
    d = save_tiny_dir(tmp_path / "tiny", "llama", vocab_size=300)
    (tmp_path / "calib.txt").write_text(TEXT)
    kw = dict(sparsity=0.5, calib=str(tmp_path / "calib.txt"), calib_samples=8, seq_len=32, align_ffn=1,
              chat_calib="off", reconstruct=True)
    f32 = slimc.compile(str(d), str(tmp_path / "f32"), compute_dtype="float32", **kw).report
    bf16 = slimc.compile(str(d), str(tmp_path / "bf16"), compute_dtype="bfloat16", **kw).report
    assert f32["compute_dtype"] == "float32" and bf16["compute_dtype"] == "bfloat16"
    assert "compute bfloat16" in (tmp_path / "bf16" / "README.md").read_text()
    assert [(r["heads"], r["ffn"]) for r in bf16["layers"]] == [(r["heads"], r["ffn"]) for r in f32["layers"]]
    for a, b in zip(f32["layers"], bf16["layers"]):
        assert b["rel_error"] == pytest.approx(a["rel_error"], rel=0.1, abs=1e-3)
        assert b["reconstruct"]["error_before"] == pytest.approx(a["reconstruct"]["error_before"], rel=0.1, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disp_mask_training_runs_the_frozen_model_in_the_compute_dtype(dtype):
    """--disp-train's forwards follow --compute-dtype like the calibration's; the masks and the budget term stay
    float32, and a bfloat16 run still moves the kept fraction to its target."""
    from slimc.disp_train import kept_params, train_masks
    from test_disp import _mask_training_problem

    model, layers, shapes, widths, sites = _mask_training_problem()
    seen = []
    handle = layers[1].mlp.up_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    init = torch.ones(3, 4, 64, dtype=torch.bool)
    target = 0.7 * float(kept_params(init.float(), shapes, widths))
    windows = torch.randint(0, 128, (16, 16), generator=torch.Generator().manual_seed(0))
    with compute_dtype(dtype):
        r = train_masks(model, sites, shapes, widths, init, windows, steps=60, target_params=target, lr=0.1, lam=5.0)
    handle.remove()
    assert seen and set(seen) == {dtype}
    assert abs(r.kept_fraction_last - 1) < 0.1 and r.flipped > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights themselves are never cast
