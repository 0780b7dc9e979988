"""Atomic file and folder writes: a reader sees the old version or the new one, never half of one.

Files go to a temporary beside the target, are fsynced and renamed over it; folders are built
under `.tmp-<name>-<pid>` and renamed when complete, and a later run removes temporaries whose
process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.core.errors import BedsideError

TEMPORARY_PREFIX = ".tmp-"


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, fsync, then rename over `path` (write_bytes_atomic)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync, then rename over `path`.

    An interrupted write leaves no temporary behind. Mode 0644 like an ordinary write (mkstemp's
    own 0600 would hide reports and bundle files from the people who install them).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), 0o644)
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as indented JSON (with a final newline), atomically (write_text_atomic)."""
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `.tmp-*-<pid>` folders/files under `folder` whose process no longer runs."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.name.startswith(TEMPORARY_PREFIX):
            continue
        pid_text = path.name.rsplit("-", 1)[-1]
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue  # another live run is writing it
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def building_folder(final: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; on success rename it to `final`, on error delete it.

    An existing `final` is replaced: the new folder is renamed in, then the old one deleted (the
    old one is moved aside first, so `final` is missing only between two renames).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f"{TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    try:
        yield temporary
        old = final.parent / f"{TEMPORARY_PREFIX}old-{final.name}-{os.getpid()}"
        if final.exists():
            os.rename(final, old)
        os.rename(temporary, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A scratch folder inside `out_dir` (same file system, so finished files move by rename); removed after."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file in the way, no permission: the caller's input, one line
        raise BedsideError(
            f"cannot create the output folder '{out_dir}' ({error.strerror or error})"
        ) from None
    scratch = Path(tempfile.mkdtemp(prefix=".bedside-export-", dir=out_dir))
    try:
        yield scratch
    finally:
        remove_tree(scratch)


def remove_tree(path: Path) -> None:
    """Delete a folder and everything in it, never following a symlink (no error if it is already gone)."""
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir() and not child.is_symlink():
            child.rmdir()
        else:
            child.unlink()
    path.rmdir()
