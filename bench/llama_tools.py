"""llama.cpp's own command-line tools (llama-imatrix, llama-bench), built from the sdist that set-up downloaded.

They are the references of two benchmarks (bench/imatrix_parity.py, bench/runtime_parity.py), so they are built
from the very llama.cpp that Bedside runs: vendor/llama.cpp of the llama-cpp-python sdist in
$BEDSIDE_CACHE/sdist, with the flags of set-up's wheel (GGML_NATIVE=OFF: a portable AVX2 build without the AMX
backend, whose quantized batch path crashes on this CPU) and static libraries, so the binaries need nothing beside
them. Built once into $BEDSIDE_CACHE/llama-tools/<version>/bin under a file lock, in a temporary folder renamed
when complete, so an interrupted build leaves nothing half-made (a later run deletes the leftover).

The sdist is checked before anything is written: every member must be a regular file or a folder with a relative,
normalised name under the archive's one top folder (no links, devices, '..', absolute or duplicate names).

    .venv/bin/python -m bench.llama_tools        # build (5-8 min on 2 idle cores) or find; print the paths
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from toolkit.core.atomic import building_folder, remove_stale_temporaries, write_json_atomic
from toolkit.core.errors import BedsideError
from toolkit.core.paths import LLAMA_CPP_VERSION, cache_dir
from toolkit.core.safe_tar import Member, check_members, write_members

TARGETS: tuple[str, ...] = ("llama-imatrix", "llama-bench")
# Set-up's wheel flags (GGML_NATIVE=OFF, Release) plus what keeps the build to the two tools, offline.
CMAKE_OPTIONS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
)
BUILD_RECORD = "build.json"


@dataclass(frozen=True)
class LlamaTools:
    """Paths of the built binaries, and how long their build took (seconds, as recorded when built)."""

    imatrix: Path
    bench: Path
    build_seconds: float
    built_now: bool


def sdist_path(version: str = LLAMA_CPP_VERSION) -> Path:
    """The llama-cpp-python sdist `make setup` downloads."""
    return cache_dir() / "sdist" / f"llama_cpp_python-{version}.tar.gz"


def tools_dir(version: str = LLAMA_CPP_VERSION) -> Path:
    """Where the tools of one llama-cpp-python version live: <cache>/llama-tools/<version> (bin/, build.json)."""
    return cache_dir() / "llama-tools" / version


def checked_members(tar: tarfile.TarFile, archive: Path) -> tuple[str, list[Member]]:
    """The top folder and every member of `tar`, checked by toolkit.core.safe_tar's rules.

    Raises BedsideError naming the first offending member (safe_tar.RefusedMember is a ValueError).
    """
    try:
        return check_members(tar)
    except ValueError as error:
        raise BedsideError(f"sdist '{archive}' refused: {error}") from None


def extract_checked(archive: Path, target: Path, prefix: str = "") -> Path:
    """Check every member of `archive` (checked_members), then write those under `prefix` into `target`.

    Files are written 0644 (0755 when executable in the archive) with O_EXCL | O_NOFOLLOW, so nothing is
    written through a link or over an existing file. Returns the archive's top folder inside `target`.
    """
    try:
        with tarfile.open(archive, "r:gz") as tar:
            top, members = checked_members(tar, archive)
            write_members(tar, members, target, keep_executable=True, prefix=prefix)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise BedsideError(
            f"sdist '{archive}' cannot be unpacked ({error}): delete it and run `make setup`"
        ) from None
    return target / top


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing): one build at a time, others wait and reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def generator() -> list[str]:
    """CMake's generator: Ninja when installed, else Unix Makefiles."""
    return ["-G", "Ninja"] if shutil.which("ninja") else ["-G", "Unix Makefiles"]


def _run_logged(command: Sequence[str], log: Path, what: str) -> None:
    """Run `command`, appending its output to `log`; a failure is one BedsideError line naming the log."""
    with open(log, "ab") as stream:
        stream.write(("$ " + " ".join(command) + "\n").encode())
        stream.flush()
        completed = subprocess.run(
            command, stdout=stream, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
        )
    if completed.returncode != 0:
        raise BedsideError(f"{what} failed with status {completed.returncode}: see {log}")


def _found(folder: Path) -> LlamaTools | None:
    bin_dir = folder / "bin"
    paths = [bin_dir / target for target in TARGETS]
    record = folder / BUILD_RECORD
    if not all(os.access(path, os.X_OK) for path in paths) or not record.is_file():
        return None
    seconds = float(json.loads(record.read_text(encoding="utf-8")).get("build_seconds", 0.0))
    return LlamaTools(imatrix=paths[0], bench=paths[1], build_seconds=seconds, built_now=False)


def build_tools(jobs: int = 2, version: str = LLAMA_CPP_VERSION) -> LlamaTools:
    """The built llama-imatrix and llama-bench of `version`: found in the cache, or built now (module docstring)."""
    final = tools_dir(version)
    found = _found(final)
    if found is not None:
        return found
    archive = sdist_path(version)
    if not archive.is_file():
        raise BedsideError(
            f"llama-cpp-python sdist '{archive}' not found: run `make setup` (it downloads it)"
        )
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BedsideError(f"building llama.cpp's tools needs {tool} on PATH")
    with file_lock(final.parent / f"{version}.lock"):
        found = _found(final)  # another process may have built it while this one waited
        if found is not None:
            return found
        remove_stale_temporaries(final.parent)
        log = final.parent / f"{version}-build.log"
        log.unlink(missing_ok=True)
        start = time.perf_counter()
        with building_folder(final) as folder:
            top = extract_checked(
                archive, folder / "src", prefix=f"llama_cpp_python-{version}/vendor/llama.cpp"
            )
            source, build = top / "vendor" / "llama.cpp", folder / "build"
            _run_logged(
                ["cmake", "-S", str(source), "-B", str(build), *generator(), *CMAKE_OPTIONS],
                log,
                "configuring llama.cpp",
            )
            _run_logged(
                ["cmake", "--build", str(build), f"-j{jobs}", "--target", *TARGETS],
                log,
                "building llama.cpp's tools",
            )
            (folder / "bin").mkdir()
            for target in TARGETS:
                shutil.copy2(build / "bin" / target, folder / "bin" / target)
            seconds = time.perf_counter() - start
            write_json_atomic(
                folder / BUILD_RECORD,
                {
                    "llama_cpp_python": version,
                    "targets": list(TARGETS),
                    "cmake_options": list(CMAKE_OPTIONS),
                    "generator": generator()[1],
                    "jobs": jobs,
                    "build_seconds": round(seconds, 1),
                    "loadavg_end": [round(value, 2) for value in os.getloadavg()],
                },
            )
            shutil.rmtree(folder / "src")
            shutil.rmtree(build)
    tools = _found(final)
    if tools is None:
        raise BedsideError(f"llama.cpp's tools were built but are missing from {final / 'bin'}")
    return LlamaTools(tools.imatrix, tools.bench, tools.build_seconds, built_now=True)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.llama_tools [--jobs N]`: build or find the tools; print their paths and the build time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = parser.parse_args(argv)
    try:
        tools = build_tools(jobs=max(1, args.jobs))
    except BedsideError as error:
        print(f"error: {error}")
        return 2
    state = "built now" if tools.built_now else "already built"
    print(f"llama-imatrix: {tools.imatrix}")
    print(f"llama-bench:   {tools.bench}")
    print(f"{state}; the build took {tools.build_seconds:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
