"""`--out` folders: refused in one line before any work when they cannot be written, created only after.

`check_out_dir` creates nothing (a command checks its output folder with its other inputs, before
minutes of work); `make_out_dir` creates the folder once the inputs passed and proves it writable.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from toolkit.core.errors import BedsideError


def check_out_dir(out: Path, option: str = "--out") -> Path:
    """Refuse an `out` that cannot be (or become) a writable folder; returns its nearest existing folder.

    Nothing is created: an existing file, a path under a file, or a folder without write permission is a
    one-line BedsideError naming `option` and the path.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BedsideError(f"{option} '{out}' is a file: pass a folder")
    existing = out
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise BedsideError(f"{option} '{out}' is not writable: '{existing}' is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise BedsideError(
            f"{option} '{out}' is not writable: '{existing}' is a file, not a folder; pass a writable folder"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BedsideError(
            f"{option} '{out}' is not writable (no write permission on '{existing}'): pass a writable folder"
        )
    return existing


def make_out_dir(out: Path, option: str = "--out") -> Path:
    """Create `out` (and its parents) and write a probe file in it; a one-line BedsideError if that fails."""
    out = Path(out)
    check_out_dir(out, option)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise BedsideError(
            f"{option} '{out}' is not writable ({error.strerror or error}): pass a writable folder"
        ) from None
    return out
