"""Text sources, calibration samples and evaluation windows.

`brown` is the offline default: the Brown corpus split by file into calibration and evaluation parts that
never overlap (the reference split of the project docs, so benchmarks compare with the reference figures).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from .errors import SlimcError

BROWN_CATEGORIES = "abcdefghjklmnpr"  # 15 categories; the corpus has no i, o, q
# last three files of each category, as in the reference split
BROWN_EVAL = {
    "a": (42, 43, 44), "b": (25, 26, 27), "c": (15, 16, 17), "d": (15, 16, 17), "e": (34, 35, 36),
    "f": (46, 47, 48), "g": (73, 74, 75), "h": (28, 29, 30), "j": (78, 79, 80), "k": (27, 28, 29),
    "l": (22, 23, 24), "m": (4, 5, 6), "n": (27, 28, 29), "p": (27, 28, 29), "r": (7, 8, 9),
}
SOURCES = ("brown", "wikitext2", "c4")
SPLITS = ("calibration", "evaluation")
_ATTACH_LEFT = {".", ",", ";", ":", "?", "!", ")", "'", '"close'}


def brown_files(split: str) -> list[str]:
    """File names of a Brown split: calibration = first 3 files per category, evaluation = last 3."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if split == "calibration":
        return [f"c{c}{i:02d}" for c in BROWN_CATEGORIES for i in (1, 2, 3)]
    return [f"c{c}{i:02d}" for c in BROWN_CATEGORIES for i in BROWN_EVAL[c]]


def _word(token: str) -> str:
    word = token.rsplit("/", 1)[0] if "/" in token else token
    return {"``": '"open', "''": '"close'}.get(word, word)


def prepare_brown_file(raw: str) -> str:
    """One tagged Brown file -> plain text: tags dropped, `` and '' turned into ", punctuation attached to the
    previous word (opening quotes and brackets to the next), doubled ;; ?? !! collapsed, one line per
    paragraph (blank-line separated chunk)."""
    lines = []
    for para in re.split(r"\n\s*\n", raw):
        out: list[str] = []
        glue_next = False
        for token in para.split():
            w = _word(token)
            if w in ("'", '"close') or w in _ATTACH_LEFT or re.fullmatch(r"[.,;:?!]+", w):
                w = '"' if w == '"close' else w
                if out:
                    out[-1] += w
                else:
                    out.append(w)
                glue_next = False
                continue
            w = '"' if w == '"open' else w
            if glue_next and out:
                out[-1] += w
            else:
                out.append(w)
            glue_next = w in ('"', "(")
        text = " ".join(out)
        text = re.sub(r"([;?!])\1+", r"\1", text)
        if text:
            lines.append(text)
    return "\n".join(lines)


def brown_text(split: str) -> str:
    from .assets import brown_dir

    root = brown_dir()
    parts = []
    for name in brown_files(split):
        f = root / name
        if not f.is_file():
            raise SlimcError(f"Brown corpus file {name} missing in {root}; run `slimc assets fetch` again")
        parts.append(prepare_brown_file(f.read_text(encoding="utf-8", errors="replace")))
    return "\n".join(parts)


def _datasets():
    if importlib.util.find_spec("datasets") is None:
        raise SlimcError("this text source needs the optional dependency `datasets` (pip install datasets)")
    import datasets

    return datasets


def load_text(source: str, split: str) -> str:
    """Text of `source` for `split` ("calibration" or "evaluation"). A PATH (a .txt file, or a directory whose
    .txt files are read in sorted order) gives the same text for both splits: keep your own files apart."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if source == "brown":
        return brown_text(split)
    if source == "wikitext2":
        ds = _load_hub(lambda d: d.load_dataset("wikitext", "wikitext-2-raw-v1",
                                                split="train" if split == "calibration" else "test"), source)
        return "\n\n".join(ds["text"])
    if source == "c4":
        shard = ("en/c4-train.00000-of-01024.json.gz" if split == "calibration"
                 else "en/c4-validation.00000-of-00008.json.gz")
        ds = _load_hub(lambda d: d.load_dataset("allenai/c4", data_files={"x": shard}, split="x"), source)
        return "\n\n".join(ds["text"][:20000])
    p = Path(source).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise SlimcError(f"no .txt files in {p}")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise SlimcError(f"text source not found: {source} (use {', '.join(SOURCES)} or a path to a .txt file or directory)")


def _load_hub(fn, name):
    datasets = _datasets()
    try:
        return fn(datasets)
    except Exception as e:
        raise SlimcError(f"cannot load {name} from the Hugging Face hub: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _token_ids(tokenizer, source: str, split: str) -> torch.Tensor:
    text = load_text(source, split)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_samples(tokenizer, source: str, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """n_samples non-overlapping windows of seq_len tokens from the calibration text, chosen at random."""
    ids = _token_ids(tokenizer, source, "calibration")
    n_windows = ids.numel() // seq_len
    if n_windows < n_samples:
        raise SlimcError(
            f"calibration text {source!r} has {ids.numel():,} tokens, {n_samples} samples x {seq_len} tokens need "
            f"{n_samples * seq_len:,}: use fewer --calib-samples, a shorter --seq-len, or more text"
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:n_samples]
    return windows[pick.sort().values]


def eval_windows(tokenizer, source: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping seq_len windows over the first max_tokens tokens of the evaluation text."""
    ids = _token_ids(tokenizer, source, "evaluation")
    if max_tokens:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise SlimcError(f"evaluation text {source!r} has {ids.numel():,} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)
