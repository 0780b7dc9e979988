"""Untrusted .tar archives: check every member before anything is written, then write them file by file.

Why here: deployment bundles (`bedside verify`) and the llama.cpp sdist the benchmarks build from are
unpacked by the same rules, so there is one implementation to get right. `filter="data"` alone is not
enough on Python < 3.11.13 (CVE-2025-4517), so nothing is left to tarfile's own extraction.

Rules: only regular files and folders; names relative and normalised (no '', '.', '..' parts, no
backslash or control character); all under one top folder; each named once; nothing inside a member
that is a file, no file where another member needs a folder. Files are written with
O_CREAT | O_EXCL | O_NOFOLLOW, so nothing is written through a link or over an existing file.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

Member = tuple[tarfile.TarInfo, str]  # the member and its name without a folder's trailing slash


class RefusedMember(ValueError):
    """A member that breaks the rules: `name` and `why` ("is a symlink: ...") for the caller's message."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"member '{name}' {why}")
        self.name, self.why = name, why


def is_safe_relative_path(name: object) -> bool:
    """Whether `name` is a normalised relative POSIX path (no '', '.', '..' parts, no backslash or control character)."""
    if not isinstance(name, str) or not name or name.startswith("/"):
        return False
    if "\\" in name or any(ord(char) < 32 or ord(char) == 127 for char in name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def member_kind(member: tarfile.TarInfo) -> str:
    """'file', 'folder', or what else the member is ("a symlink", "a device", ...)."""
    if member.issym():
        return "a symlink"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a fifo"
    if member.issparse():
        return "a sparse file"
    if member.isfile():
        return "file"
    if member.isdir():
        return "folder"
    return f"of tar type {member.type!r}"


def check_members(
    tar: tarfile.TarFile,
    max_members: int | None = None,
    on_member: Callable[[tarfile.TarInfo, str, str], None] | None = None,
) -> tuple[str, list[Member]]:
    """Every member of `tar` checked by the module's rules, in archive order, with the one top folder.

    `on_member(member, name, top)` sees each accepted member while the archive is read forward (to read a
    small file on the way). Raises RefusedMember for the first offending member, and ValueError when the
    archive is empty or holds more than `max_members` members.
    """
    members: list[Member] = []
    kinds: dict[str, str] = {}
    parents: set[str] = set()
    top: str | None = None
    for member in tar:
        if max_members is not None and len(members) >= max_members:
            raise ValueError(f"more than {max_members} members")
        kind = member_kind(member)
        name = member.name[:-1] if kind == "folder" and member.name.endswith("/") else member.name
        if kind not in ("file", "folder"):
            raise RefusedMember(name, f"is {kind}: only files and folders are accepted")
        if not is_safe_relative_path(name):
            raise RefusedMember(name, "has an absolute, '..' or unnormalised name")
        parts = name.split("/")
        top = top or parts[0]
        if parts[0] != top or (len(parts) == 1 and kind != "folder"):
            raise RefusedMember(name, f"is not inside the archive's one top folder '{top}'")
        if name in kinds:
            raise RefusedMember(name, "is in the archive twice")
        if kind == "file" and name in parents:
            raise RefusedMember(name, "is a file where the archive has a folder")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if kinds.get(parent) == "file":
                raise RefusedMember(name, "lies inside a file of the archive")
            parents.add(parent)
        kinds[name] = kind
        members.append((member, name))
        if on_member is not None:
            on_member(member, name, top)
    if top is None:
        raise ValueError("the archive is empty")
    return top, members


def write_members(
    tar: tarfile.TarFile, members: list[Member], folder: Path, keep_executable: bool = False, prefix: str = ""
) -> None:
    """Write checked members under `folder` (only those under `prefix` when given): folders 0755, files 0644.

    Files executable in the archive stay 0755 with `keep_executable`. Raises tarfile.ReadError when a member
    has no data or is shorter than its header says, OSError when a path exists already or is a link.
    """
    scope = prefix.rstrip("/") + "/" if prefix else ""
    for member, name in members:
        if scope and not (name + "/").startswith(scope):
            continue
        target = folder.joinpath(*name.split("/"))
        if member.isdir():
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
            continue
        target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        source = tar.extractfile(member)
        if source is None:
            raise tarfile.ReadError(f"member '{name}' has no data")
        mode = 0o755 if keep_executable and member.mode & 0o111 else 0o644
        handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(handle, "wb") as stream:
            shutil.copyfileobj(source, stream, 1 << 20)
            if stream.tell() != member.size:
                raise tarfile.ReadError(f"member '{name}' is shorter than its header says")
