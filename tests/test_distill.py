"""Distillation from the dense model lowers the KL of a damaged model on windows it never trained on."""
import copy

import torch

from slimc.distill import HOLDOUT_EVERY, _held_out_kl, distill, judge_split

from conftest import tiny_model


def _damaged(seed=0):
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if ".layers." in name and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.5)
    windows = torch.randint(0, 128, (32, 16), generator=torch.Generator().manual_seed(1))
    return teacher, student, windows


def test_distillation_lowers_kl_on_held_out_and_unseen_windows():
    teacher, student, windows = _damaged()
    unseen = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    unseen_before = _held_out_kl(student, teacher, unseen, 4)
    embed = student.model.embed_tokens.weight.detach().clone()
    r = distill(student, teacher, windows, epochs=10, lr=1e-3, batch_size=4)
    assert r.kept and r.kl_after < 0.8 * r.kl_before
    assert r.steps == 10 * (32 - 32 // HOLDOUT_EVERY) // 4 and r.tokens == r.steps * 4 * 16
    assert _held_out_kl(student, teacher, unseen, 4) < unseen_before
    assert torch.equal(student.model.embed_tokens.weight, embed)  # embeddings (tied lm_head) untouched


def test_distillation_that_does_not_help_is_undone():
    teacher, student, windows = _damaged()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    r = distill(student, teacher, windows, epochs=2, lr=50.0, batch_size=4)
    assert not r.kept and r.best_epoch == 0 and r.kl_after == r.kl_before and len(r.epoch_kls) == 2
    for k, v in student.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_distillation_leaves_with_the_epoch_that_judged_best():
    # at this step size the held-out KL is not monotone over the epochs (checked: epoch 8 of 10 is lowest)
    teacher, student, windows = _damaged()
    r = distill(student, teacher, windows, epochs=10, lr=2e-3, batch_size=4)
    assert len(r.epoch_kls) == 10 and 0 < r.best_epoch < 10
    assert r.kl_after == min(r.epoch_kls) == r.epoch_kls[r.best_epoch - 1] < r.epoch_kls[-1] < r.kl_before
    _, held = judge_split(windows)
    assert _held_out_kl(student, teacher, held, 4) == r.kl_after  # the weights are that epoch's, not the last
    assert r.steps == 10 * (32 - 32 // HOLDOUT_EVERY) // 4  # the cost is every epoch trained


def test_the_report_says_which_epoch_distillation_kept():
    from slimc.report import distill_setting

    cfg = {"distill_epochs": 2, "distill_lr": 2e-4}
    kept = {"kept": True, "best_epoch": 1, "kl_before": 0.298, "kl_after": 0.288, "epoch_kls": [0.288, 0.31]}
    assert distill_setting(cfg, kept) == "2 epochs, lr 0.0002; kept epoch 1 (held-out KL 0.298 -> 0.288)"
    undone = {**kept, "kept": False, "best_epoch": 0, "kl_after": 0.298, "epoch_kls": [0.30, 0.31]}
    assert "none kept" in distill_setting(cfg, undone)


def test_compile_distils_on_the_fresh_windows_too(tmp_path):
    """--distill-windows N: the compile distils on its calibration windows plus N more (a PATH's own text here),
    and the report says so."""
    import json

    import slimc
    from conftest import save_tiny_dir

    src = save_tiny_dir(tmp_path / "src", "qwen2", vocab_size=300)
    (tmp_path / "calib.txt").write_text(" ".join(f"word{i % 97} of line {i}." for i in range(3000)))
    opts = dict(calib=str(tmp_path / "calib.txt"), calib_samples=8, seq_len=32, sparsity=0.4, distill_epochs=1)
    reports = {}
    for n in (0, 8):
        slimc.compile(str(src), str(tmp_path / f"out{n}"), distill_windows=n, **opts)
        reports[n] = json.loads((tmp_path / f"out{n}" / "report.json").read_text())
    # 8 calibration windows, every 8th held out to judge: 7 trained on; with 8 more, 14 of 16
    assert reports[0]["distill"]["tokens"] == 7 * 32 and reports[8]["distill"]["tokens"] == 14 * 32
    lever = next(lv for lv in reports[8]["levers"] if lv["lever"] == "distill")
    assert "calibration + 8 windows of fresh text" in lever["setting"]
