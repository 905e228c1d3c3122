"""User-facing errors: anything a user can cause is raised as SlimcError and printed as one line."""


class SlimcError(Exception):
    """An error the user can fix (bad path, bad ratio, missing dependency...). The CLI prints
    `slimc: error: <message>` and exits with status 2, never a traceback."""
