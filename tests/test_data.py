"""Brown text preparation and split, calibration / evaluation windows, text sources (no network, no model)."""
import sys

import pytest
import torch

from slimc import data
from slimc.errors import SlimcError


class CharTokenizer:
    """One token per character (ids 0-127), called the way slimc calls a Hugging Face tokenizer."""

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False  # a BOS in the middle of the token stream would be wrong
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_tags_dropped_on_the_last_slash():
    raw = "\tand/or/cc 1/2/cd //in Atlanta's/np$ headline/nn-hl ./.-hl"
    assert data.prepare_brown_file(raw) == "and/or 1/2 / Atlanta's headline."


def test_quotes_and_punctuation_glued():
    raw = ("\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, ``/`` (/( so/rb )/) ''/'' "
           "--/-- more/ap '/' pro/jj '/' than/in '/' con/jj '/' :/: it's/pps+bez fine/jj ?/. !/.")
    assert data.prepare_brown_file(raw) == ("The jury said \"no evidence\", \"(so)\" -- more 'pro' than 'con': "
                                            "it's fine?!")


def test_doubled_punctuation_collapsed_and_paragraphs_kept():
    raw = ("\n\n\tHe/pps left/vbd ;/. ;/. why/wrb ?/. ?/.\n\n\n"
           "\tHeadline/nn-hl \nStop/vb !/. !/. !/.\n\n")
    assert data.prepare_brown_file(raw).split("\n") == ["He left; why?", "Headline Stop!"]


def test_brown_split_matches_reference():
    cal, ev = data.brown_files("calibration"), data.brown_files("evaluation")
    assert len(cal) == len(ev) == 45 and not set(cal) & set(ev)
    held = data.brown_files("heldout")  # where defaults are chosen: in neither of the other two
    assert held == [f"c{c}0{i}" for c in "abcdefghjklnpr" for i in (4, 5, 6)] and not set(held) & (set(cal) | set(ev))
    assert cal == [f"c{c}0{i}" for c in "abcdefghjklmnpr" for i in (1, 2, 3)]
    # docs/assets.md, written out: ca42-44, cb25-27, cc15-17, ... cr07-09
    ranges = "a42 b25 c15 d15 e34 f46 g73 h28 j78 k27 l22 m04 n27 p27 r07".split()
    assert ev == [f"c{r[0]}{int(r[1:]) + k:02d}" for r in ranges for k in range(3)]


def test_distillation_windows_are_fresh_brown_text_from_no_other_split():
    from slimc.config import CompileConfig
    from slimc.pipeline import _distillation_windows

    tok = CharTokenizer()  # one id per character: a window's text can be looked up in the text it came from
    calib = data.calibration_samples(tok, "brown", 4, 64, seed=0)
    cfg = CompileConfig("m", "o", calib="brown", distill_epochs=1, distill_windows=6)
    windows = _distillation_windows(cfg, tok, calib)
    assert windows.shape == (10, 64) and torch.equal(windows[:4], calib)
    as_bytes = lambda split: bytes(tok(data.brown_text(split), add_special_tokens=False)["input_ids"])  # noqa: E731
    train = as_bytes("train")
    assert all(bytes(w.tolist()) in train for w in windows[4:])
    for split in ("calibration", "evaluation", "heldout"):
        other = as_bytes(split)
        assert not any(bytes(w.tolist()) in other for w in windows[4:]), split
    assert _distillation_windows(CompileConfig("m", "o", distill_epochs=1), tok, calib) is calib


def test_distillation_windows_from_a_short_text_are_fewer_and_say_so(tmp_path, capsys):
    from slimc.config import CompileConfig
    from slimc.pipeline import _distillation_windows

    tok = CharTokenizer()
    path = _text_file(tmp_path, "x" * 200)  # a PATH gives its own text for the train split: 3 windows of 64
    calib = data.calibration_samples(tok, path, 2, 64, seed=0)
    windows = _distillation_windows(CompileConfig("m", "o", calib=path, distill_epochs=1, distill_windows=10), tok, calib)
    assert windows.shape == (5, 64)
    assert "fewer than --distill-windows 10: distilling on 3 more" in capsys.readouterr().err


def test_brown_train_split_is_every_other_file():
    train = data.brown_files("train")
    others = set(data.brown_files("calibration")) | set(data.brown_files("evaluation")) | set(data.brown_files("heldout"))
    assert len(train) == len(set(train)) == 500 - len(others) == 368 and not set(train) & others
    # every category's files run 01..last without a gap; the corpus has 500 files
    assert "ca07" in train and "ca41" in train and "ca42" not in train and not any(f.startswith("cm") for f in train)
    assert "cr01" not in train and "cg72" in train


def _text_file(tmp_path, text):
    f = tmp_path / "t.txt"
    f.write_text(text)
    return str(f)


def test_calibration_samples_are_seeded_distinct_windows(tmp_path):
    g = torch.Generator().manual_seed(0)
    text = "".join(chr(97 + int(i)) for i in torch.randint(0, 26, (400,), generator=g))  # 12 windows of 32
    src = _text_file(tmp_path, text)
    a = data.calibration_samples(CharTokenizer(), src, 5, 32, seed=1)
    assert a.dtype == torch.long and a.shape == (5, 32)
    assert torch.equal(a, data.calibration_samples(CharTokenizer(), src, 5, 32, seed=1))
    assert not torch.equal(a, data.calibration_samples(CharTokenizer(), src, 5, 32, seed=2))
    windows = torch.tensor([ord(c) for c in text[: 12 * 32]]).view(12, 32)
    starts = [int((windows == row).all(1).nonzero()[0]) for row in a]  # each row is an aligned window
    assert len(set(starts)) == 5


def test_too_little_calibration_text_is_a_clear_error(tmp_path):
    src = _text_file(tmp_path, "x" * 100)
    with pytest.raises(SlimcError, match=r"has 100 tokens.*need 320.*fewer"):
        data.calibration_samples(CharTokenizer(), src, 10, 32, 0)


def test_default_calibration_size_takes_what_a_short_text_holds(tmp_path, capsys):
    src = _text_file(tmp_path, "abcdefgh" * 12 + "x")  # 97 tokens: 3 windows of 32
    windows = data.calibration_samples(CharTokenizer(), src, 10, 32, 0, strict=False)
    assert windows.shape == (3, 32)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 windows of 32 tokens" in err[0] and "default 10" in err[0]
    with pytest.raises(SlimcError, match="fewer than one window|need"):  # nothing to calibrate on: still refused
        data.calibration_samples(CharTokenizer(), _text_file(tmp_path, "x" * 10), 10, 32, 0, strict=False)


def test_only_a_size_the_user_left_at_the_default_may_shrink():
    from slimc.config import DEFAULT_CALIB_SAMPLES, DEFAULT_SEQ_LEN, CompileConfig

    assert CompileConfig("m", "o").calibration_request() == (DEFAULT_CALIB_SAMPLES, DEFAULT_SEQ_LEN, False)
    assert CompileConfig("m", "o", seq_len=256).calibration_request() == (DEFAULT_CALIB_SAMPLES, 256, True)
    assert CompileConfig("m", "o", calib_samples=16).calibration_request()[2]
    with pytest.raises(SlimcError, match="positive"):
        CompileConfig("m", "o", calib_samples=0)


def test_eval_windows_in_order_capped_tail_dropped(tmp_path):
    text = "".join(chr(32 + i % 90) for i in range(1000))
    src = _text_file(tmp_path, text)
    w = data.eval_windows(CharTokenizer(), src, 64, max_tokens=300)
    assert w.shape == (4, 64)
    assert w.flatten().tolist() == [ord(c) for c in text[:256]]
    assert data.eval_windows(CharTokenizer(), src, 64).shape == (15, 64)
    with pytest.raises(SlimcError, match="fewer than one window"):
        data.eval_windows(CharTokenizer(), src, 2048)


def test_path_sources(tmp_path):
    for name, text in [("b.txt", "second"), ("sub/c.txt", "third"), ("a.txt", "first"), ("d.md", "ignored")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert data.load_text(str(tmp_path), "calibration") == "first\n\nsecond\n\nthird"
    assert data.load_text(str(tmp_path / "b.txt"), "evaluation") == "second"
    with pytest.raises(SlimcError, match="not found"):
        data.load_text(str(tmp_path / "nope.txt"), "evaluation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlimcError, match="no .txt files"):
        data.load_text(str(tmp_path / "empty"), "evaluation")


def test_unknown_source_lists_accepted_values():
    with pytest.raises(SlimcError, match="brown, brown-heldout, wikitext2, c4, a path .* or a .jsonl of conversations"):
        data.load_text("wikitext-103", "calibration")


def test_hub_source_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `datasets` unimportable
    with pytest.raises(SlimcError, match=r"`datasets` \(pip install datasets\)"):
        data.load_text("wikitext2", "evaluation")
