"""bench/llama_tools.py without compiling: the sdist member check, the checked extraction, the cache lookup."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from bench.llama_tools import (
    BUILD_RECORD,
    build_tools,
    checked_members,
    extract_checked,
    sdist_path,
    tools_dir,
)
from toolkit.core.errors import BedsideError


def _archive(path: Path, entries: list[tuple[str, str, bytes | str]]) -> Path:
    """A .tar.gz of (name, kind, data) entries: kind "file" (data = bytes), "dir", "symlink" or "hardlink" (target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(data, bytes)
                info.size = len(data)
                info.mode = 0o755 if name.endswith(".sh") else 0o644
                tar.addfile(info, io.BytesIO(data))
                continue
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(data)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info)
    return path


def _members(path: Path) -> list[str]:
    with tarfile.open(path, "r:gz") as tar:
        return [name for _, name in checked_members(tar, path)[1]]


GOOD = [
    ("pkg-1.0", "dir", b""),
    ("pkg-1.0/vendor/llama.cpp/CMakeLists.txt", "file", b"project(x)\n"),
    ("pkg-1.0/vendor/llama.cpp/scripts/run.sh", "file", b"#!/bin/sh\n"),
    ("pkg-1.0/setup.py", "file", b"print(1)\n"),
]


def test_a_plain_archive_passes_and_only_the_prefix_is_extracted(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "good.tar.gz", GOOD)
    assert _members(archive) == [name for name, _, _ in GOOD]
    top = extract_checked(archive, tmp_path / "out", prefix="pkg-1.0/vendor/llama.cpp")
    assert top == tmp_path / "out" / "pkg-1.0"
    assert (top / "vendor/llama.cpp/CMakeLists.txt").read_bytes() == b"project(x)\n"
    assert not (top / "setup.py").exists()  # outside the prefix
    assert os.stat(top / "vendor/llama.cpp/scripts/run.sh").st_mode & 0o777 == 0o755
    assert os.stat(top / "vendor/llama.cpp/CMakeLists.txt").st_mode & 0o777 == 0o644


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        ([("pkg/a", "file", b"x"), ("pkg/link", "symlink", "/etc/passwd")], "symlink"),
        ([("pkg/a", "file", b"x"), ("pkg/hard", "hardlink", "pkg/a")], "hard link"),
        ([("pkg/fifo", "fifo", b"")], "fifo"),
        ([("pkg/../../evil", "file", b"x")], "unnormalised"),
        ([("/etc/evil", "file", b"x")], "unnormalised"),
        ([("pkg/./a", "file", b"x")], "unnormalised"),
        ([("pkg//a", "file", b"x")], "unnormalised"),
        ([("pkg/a\\b", "file", b"x")], "unnormalised"),
        ([("pkg/a", "file", b"x"), ("other/b", "file", b"y")], "one top folder"),
        ([("toplevel-file", "file", b"x")], "one top folder"),
        ([("pkg/a", "file", b"x"), ("pkg/a", "file", b"y")], "twice"),
        ([("pkg/a", "file", b"x"), ("pkg/a/b", "file", b"y")], "inside a file"),
        ([("pkg/a/b", "file", b"y"), ("pkg/a", "file", b"x")], "a file where the archive has a folder"),
    ],
)
def test_unsafe_members_are_refused_before_anything_is_written(
    tmp_path: Path, entries: list[tuple[str, str, bytes | str]], why: str
) -> None:
    archive = _archive(tmp_path / "bad.tar.gz", entries)
    with pytest.raises(BedsideError, match=why):
        _members(archive)
    with pytest.raises(BedsideError, match=why):
        extract_checked(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_damaged_archive_is_one_line(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(BedsideError, match="cannot be unpacked.*make setup"):
        extract_checked(archive, tmp_path / "out")


def test_missing_sdist_says_to_run_make_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_CACHE", str(tmp_path))
    assert sdist_path("9.9.9") == tmp_path / "sdist" / "llama_cpp_python-9.9.9.tar.gz"
    with pytest.raises(BedsideError, match=r"not found: run `make setup`"):
        build_tools(version="9.9.9")


def test_built_tools_are_found_without_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BEDSIDE_CACHE", str(tmp_path))
    folder = tools_dir("9.9.9")
    assert folder == tmp_path / "llama-tools" / "9.9.9"
    (folder / "bin").mkdir(parents=True)
    for name in ("llama-imatrix", "llama-bench"):
        (folder / "bin" / name).write_text("#!/bin/sh\n")
        (folder / "bin" / name).chmod(0o755)
    (folder / BUILD_RECORD).write_text(json.dumps({"build_seconds": 321.5}))
    tools = build_tools(version="9.9.9")  # no sdist needed: nothing is built
    assert tools.imatrix == folder / "bin" / "llama-imatrix"
    assert tools.bench == folder / "bin" / "llama-bench"
    assert tools.build_seconds == 321.5 and not tools.built_now
