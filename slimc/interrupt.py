"""Ctrl-C at a safe point. `install()` (the CLI does, first thing) replaces SIGINT's handler -- also when the
process inherited SIGINT as ignored, as `slimc compile ... &` from a non-interactive shell does. The first SIGINT
only raises a flag; long-running code calls `check(where)` where its state is consistent (between blocks,
between stages) and the compile stops there. A second SIGINT stops at once."""
from __future__ import annotations

import signal

from .errors import Interrupted

_requested = False


def install() -> None:
    global _requested
    signal.signal(signal.SIGINT, _handler)
    _requested = False


def _handler(signum, frame) -> None:
    global _requested
    if _requested:
        raise Interrupted("stopped at once by a second Ctrl-C")
    _requested = True


def requested() -> bool:
    return _requested


def check(where: str) -> None:
    """Stop here if Ctrl-C was pressed: raises Interrupted(where)."""
    if _requested:
        raise Interrupted(where)
