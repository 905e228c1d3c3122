"""User-facing errors: anything a user can cause is raised as SlimcError and printed as one line."""


class SlimcError(Exception):
    """An error the user can fix (bad path, bad ratio, missing dependency...). The CLI prints
    `slimc: error: <message>` and exits with status 2, never a traceback."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C honoured at a safe point (`slimc.interrupt`): the message says where the compile stopped and how to
    continue. The CLI prints `slimc: interrupted: <message>` and exits with 130. A KeyboardInterrupt subclass,
    so `except Exception` in library code does not swallow it."""
