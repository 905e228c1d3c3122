"""Text sources, calibration samples and evaluation windows.

`brown` is the offline default: the Brown corpus split by file into calibration and evaluation parts that
never overlap (the reference split of docs/assets.md, so benchmarks compare with the reference figures).
`brown-heldout` is a third part, files 04-06 of every category but m (whose 04-06 are evaluation files), in
neither: defaults are chosen on it. The rest of Brown (368 of its 500 files, 960k SmolLM2 tokens) is its `train`
split: text for distillation, which wants far more tokens than calibration and must not see the other three parts.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import torch

from .errors import SlimcError

SOURCES = ("brown", "brown-heldout", "wikitext2", "c4")
SPLITS = ("calibration", "evaluation", "train")
HELDOUT = "heldout"  # Brown files 04-06: for choosing defaults, never reported as the result
BROWN_CATEGORIES = "abcdefghjklmnpr"  # 15 categories; the corpus has no i, o, q
# evaluation = the last three files of each category, as in the reference split
BROWN_EVAL = {
    "a": (42, 43, 44), "b": (25, 26, 27), "c": (15, 16, 17), "d": (15, 16, 17), "e": (34, 35, 36),
    "f": (46, 47, 48), "g": (73, 74, 75), "h": (28, 29, 30), "j": (78, 79, 80), "k": (27, 28, 29),
    "l": (22, 23, 24), "m": (4, 5, 6), "n": (27, 28, 29), "p": (27, 28, 29), "r": (7, 8, 9),
}
_CLOSING = {".", ",", ";", ":", "?", "!", ")", "]", "''"}  # glued to the previous word
_OPENING = {"(", "[", "``"}  # the next word is glued to these
# C4 shards hold ~356k (train) / ~45k (validation) documents; the first ones are plenty for calibration or
# perplexity and keep tokenization to seconds
_C4_DOCS = 20_000


def brown_files(split: str) -> list[str]:
    """File names of a Brown split: calibration = first 3 files per category, evaluation = last 3,
    heldout = files 04-06 where those are in neither (all categories but m), train = every other file."""
    if split not in (*SPLITS, HELDOUT):
        raise ValueError(f"unknown split {split!r}")
    # category m has six files only: its 04-06 are evaluation files, so the held-out part has no m
    numbers = {"calibration": {c: (1, 2, 3) for c in BROWN_CATEGORIES},
               HELDOUT: {c: (4, 5, 6) for c in BROWN_CATEGORIES if BROWN_EVAL[c] != (4, 5, 6)},
               "evaluation": BROWN_EVAL}
    if split == "train":  # a category's evaluation files are its last three, so its last number is its count
        taken = {c: {i for part in numbers.values() for i in part.get(c, ())} for c in BROWN_CATEGORIES}
        return [f"c{c}{i:02d}" for c in BROWN_CATEGORIES for i in range(1, BROWN_EVAL[c][-1] + 1)
                if i not in taken[c]]
    return [f"c{c}{i:02d}" for c in BROWN_CATEGORIES if c in numbers[split] for i in numbers[split][c]]


def prepare_brown_file(raw: str) -> str:
    """One tagged Brown file -> plain text: `/tag` dropped from each token, `` and '' turned into ",
    punctuation glued to the previous word (opening quotes and brackets to the next; single quotes ' paired
    up), the corpus's doubled ;; ?? !! collapsed, one line per paragraph (blank-line separated chunk)."""
    lines = []
    for para in re.split(r"\n\s*\n", raw):
        out: list[str] = []
        glue = single_open = False
        for token in para.split():
            word = token.rsplit("/", 1)[0]  # the tag follows the last '/': "and/or/cc" -> "and/or"
            if not word:
                continue
            opening, closing = word in _OPENING, word in _CLOSING
            if word == "'":  # the corpus writes both single quotes as ': pair them up within the paragraph
                opening, closing = not single_open, single_open
                single_open = not single_open
            text = '"' if word in ("``", "''") else word
            if out and (closing or glue):
                out[-1] += text
            else:
                out.append(text)
            glue = opening
        line = re.sub(r"([;?!])\1+", r"\1", " ".join(out))
        if line:
            lines.append(line)
    return "\n".join(lines)


def brown_text(split: str) -> str:
    """Prepared text of the Brown `split`, files in split order joined by newlines (fetches the corpus once)."""
    from .assets import brown_dir

    root = brown_dir()
    parts = []
    for name in brown_files(split):
        f = root / name
        if not f.is_file():
            raise SlimcError(f"Brown corpus file {name} missing in {root}; delete that directory and fetch again")
        parts.append(prepare_brown_file(f.read_text(encoding="utf-8", errors="replace")))
    return "\n".join(parts)


def load_text(source: str, split: str) -> str:
    """Text of `source` ("brown", "wikitext2", "c4" or a PATH) for `split` ("calibration", "evaluation" or
    "train": text to distil on).

    `brown-heldout` gives Brown files 04-06 for every split. Only Brown has a train split of its own; the others
    give their calibration text for it. A PATH (a .txt file, or a directory whose .txt files, found
    recursively, are read in sorted order) gives the same text for every split: keep calibration and
    evaluation files apart yourself."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    calib = split != "evaluation"
    if source == "brown":
        return brown_text(split)
    if source == "brown-heldout":
        return brown_text(HELDOUT)
    if source == "wikitext2":
        ds = _load_hub(source, "wikitext", "wikitext-2-raw-v1", split="train" if calib else "test")
        return "\n\n".join(ds["text"])
    if source == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz" if calib else "en/c4-validation.00000-of-00008.json.gz"
        ds = _load_hub(source, "allenai/c4", data_files={"x": shard}, split="x")
        return "\n\n".join(ds[:_C4_DOCS]["text"])
    p = Path(source).expanduser()
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise SlimcError(f"no .txt files in {p}")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise SlimcError(f"text source not found: {source} "
                     f"(use {', '.join(SOURCES)}, a path to a .txt file or directory, or a .jsonl of conversations)")


def _load_hub(name: str, *args, **kwargs):
    """`datasets.load_dataset(*args, **kwargs)`, with a missing package or a failed download as SlimcError."""
    if importlib.util.find_spec("datasets") is None:
        raise SlimcError(f"text source {name!r} needs the optional dependency `datasets` (pip install datasets)")
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # network, hub or cache trouble: all the user can act on is the message
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SlimcError(f"cannot load {name} from the Hugging Face hub: {first}") from e


def _token_ids(tokenizer, source: str, split: str) -> torch.Tensor:
    """The whole text tokenized once, without special tokens (windows then never start with a BOS)."""
    text = load_text(source, split)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_samples(tokenizer, source: str, n_samples: int, seq_len: int, seed: int,
                        strict: bool = True, split: str = "calibration") -> torch.Tensor:
    """[n_samples, seq_len] LongTensor: distinct non-overlapping windows of the calibration text (or of the
    `train` split: text to distil on), chosen at random (seeded) and returned in text order. A .jsonl file of
    conversations is rendered with the model's chat template instead, in a seeded order, each window starting at
    a conversation. A text too short for n_samples windows is refused when `strict` (the user chose the size),
    else all its windows are used and one line says so."""
    if n_samples < 1 or seq_len < 1:
        raise SlimcError(f"calibration needs at least 1 sample of at least 1 token (got {n_samples} x {seq_len})")
    from .chat import is_conversation_file

    if is_conversation_file(source):
        return _conversation_samples(tokenizer, source, n_samples, seq_len, seed, strict)
    ids = _token_ids(tokenizer, source, split)
    n_windows = ids.numel() // seq_len
    if 0 < n_windows < n_samples and not strict:
        _say_fewer(source, n_windows, n_samples, seq_len, f"{ids.numel():,} tokens", split)
        n_samples = n_windows
    if n_windows < n_samples:
        raise SlimcError(
            f"calibration text {source!r} has {ids.numel():,} tokens, {n_samples} samples x {seq_len} tokens need "
            f"{n_samples * seq_len:,}: use fewer --calib-samples, a shorter --seq-len, or more text"
        )
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    pick = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))[:n_samples]
    return windows[pick.sort().values]


def distillation_windows(tokenizer, source: str, n_windows: int, seq_len: int, seed: int) -> torch.Tensor:
    """`--distill-windows`: n windows of fresh text from `source`'s train split (Brown: its files in no other
    split; other sources: their calibration text), seeded; fewer when it holds fewer, said in one line. The one
    reading of that text, for the compile and for benchmarks/distill_sweep.py alike."""
    return calibration_samples(tokenizer, source, n_windows, seq_len, seed, strict=False, split="train")


def _say_fewer(source: str, have: int, asked: int, seq_len: int, what: str, split: str = "calibration") -> None:
    if split == "train":  # --distill-windows asked for more fresh text than there is
        print(f"slimc: distillation text {source!r} ({what}) holds {have} windows of {seq_len} tokens, fewer than "
              f"--distill-windows {asked}: distilling on {have} more", file=sys.stderr)
        return
    print(f"slimc: calibration text {source!r} ({what}) holds {have} windows of {seq_len} tokens, fewer than the "
          f"default {asked}: calibrating on {have} (set --calib-samples / --seq-len to choose)", file=sys.stderr)


def _conversation_samples(tokenizer, source: str, n_samples: int, seq_len: int, seed: int,
                          strict: bool = True) -> torch.Tensor:
    import random

    from .chat import pack_windows, read_conversations

    conversations = read_conversations(source)
    random.Random(seed).shuffle(conversations)
    windows = pack_windows(tokenizer, conversations, seq_len, n_samples)
    if 0 < windows.shape[0] < n_samples and not strict:
        _say_fewer(source, windows.shape[0], n_samples, seq_len, f"{len(conversations)} conversations")
        return windows
    if windows.shape[0] < n_samples:
        raise SlimcError(f"{source}: its conversations fill {windows.shape[0]} windows of {seq_len} tokens, "
                         f"{n_samples} needed: use fewer --calib-samples, a shorter --seq-len, or more conversations")
    return windows


def eval_windows(tokenizer, source: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[n_windows, seq_len] LongTensor: non-overlapping windows over the first `max_tokens` tokens of the
    evaluation text (None = all); the incomplete tail is dropped."""
    ids = _token_ids(tokenizer, source, "evaluation")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len if seq_len > 0 else 0
    if n == 0:
        raise SlimcError(f"evaluation text {source!r} has {ids.numel():,} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)
