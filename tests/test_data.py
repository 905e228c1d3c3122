"""Text preparation, the Brown split, and calibration / evaluation windows."""
import pytest
import torch

from slimc import data
from slimc.errors import SlimcError

from conftest import ByteTokenizer


def test_brown_tags_stripped_and_punctuation_attached():
    raw = ("\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, and/cc and/or/cc 1/2/cd ./.\n\n\n"
           "\tWhy/wrb ?/. ?/. (/( so/rb )/) !/. !/.\n")
    text = data.prepare_brown_file(raw)
    assert text.splitlines() == ['The jury said "no evidence", and and/or 1/2.', "Why? (so)!"]


def test_brown_split_is_disjoint_and_matches_reference():
    cal, ev = data.brown_files("calibration"), data.brown_files("evaluation")
    assert len(cal) == len(ev) == 45 and not set(cal) & set(ev)
    assert cal[:3] == ["ca01", "ca02", "ca03"] and cal[-1] == "cr03"
    assert ev[:3] == ["ca42", "ca43", "ca44"] and "cm04" in ev and ev[-1] == "cr09"


def test_calibration_samples_are_seeded_windows(tmp_path):
    f = tmp_path / "t.txt"
    g = torch.Generator().manual_seed(0)
    f.write_text("".join(chr(97 + int(i)) for i in torch.randint(0, 26, (400,), generator=g)))  # 12 windows of 32
    tok = ByteTokenizer()
    a = data.calibration_samples(tok, str(f), 5, 32, seed=1)
    b = data.calibration_samples(tok, str(f), 5, 32, seed=1)
    c = data.calibration_samples(tok, str(f), 5, 32, seed=2)
    assert a.shape == (5, 32) and torch.equal(a, b) and not torch.equal(a, c)
    ids = torch.tensor(tok(f.read_text())["input_ids"])
    starts = [int((ids.unfold(0, 32, 32) == row).all(1).nonzero()[0]) for row in a]
    assert len(set(starts)) == 5  # distinct non-overlapping windows


def test_too_little_calibration_text_is_a_clear_error(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("x" * 100)
    with pytest.raises(SlimcError, match=r"100 tokens.*need 320"):
        data.calibration_samples(ByteTokenizer(), str(f), 10, 32, 0)


def test_eval_windows_cut_and_cap(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("y" * 1000)
    w = data.eval_windows(ByteTokenizer(), str(f), 64, max_tokens=300)
    assert w.shape == (4, 64)
    with pytest.raises(SlimcError, match="fewer than one window"):
        data.eval_windows(ByteTokenizer(), str(f), 2048)


def test_text_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert data.load_text(str(tmp_path), "calibration") == "first\n\nsecond"
    with pytest.raises(SlimcError, match="not found"):
        data.load_text(str(tmp_path / "nope.txt"), "evaluation")
