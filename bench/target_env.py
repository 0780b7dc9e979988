"""Bench 5: a target with only the base install verifies a bundle (no torch, no transformers).

Run from the repository root after a deploy (default bundle: out/deploy-jetson4gb/bundle-jetson4gb.tar.gz):

    .venv/bin/python -m bench.target_env [--bundle PATH]

Creates a fresh virtual environment under the bench cache, installs the cached llama-cpp-python wheel
(built by `make setup`) and then `bedside` itself with its base dependencies only (`pip install .`,
pinned by constraints.txt; no `[build]` extra), checks that torch is absent, and runs
`bedside verify BUNDLE` there. Records the install size, the packages installed and the verify result
in docs/benchmarks/target_env.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR, bench_cache_dir, command_line, utc_now, write_json_atomic
from toolkit.core.paths import LLAMA_CPP_VERSION, cache_dir

RESULTS = RESULTS_DIR / "target_env.json"
DEFAULT_BUNDLE = REPO_ROOT / "out" / "deploy-jetson4gb" / "bundle-jetson4gb.tar.gz"


def llama_wheel() -> Path:
    """The llama-cpp-python wheel `make setup` built (portable, no AMX)."""
    wheels = sorted((cache_dir() / "wheels").glob(f"llama-{LLAMA_CPP_VERSION}-*/llama_cpp_python-*.whl"))
    if not wheels:
        raise SystemExit("no cached llama-cpp-python wheel: run `make setup` first")
    return wheels[-1]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    args = parser.parse_args()
    args.bundle = args.bundle.resolve()
    if not args.bundle.exists():
        raise SystemExit(
            f"bundle {args.bundle} not found: run `make deploy PROFILE=jetson4gb` first or pass --bundle"
        )
    home = bench_cache_dir("target_env") / "venv"
    shutil.rmtree(home, ignore_errors=True)
    started = time.perf_counter()
    venv.EnvBuilder(with_pip=True, clear=True).create(home)
    python = str(home / "bin" / "python")
    pip = [
        python,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "install",
        "-q",
        "-c",
        str(REPO_ROOT / "constraints.txt"),
    ]
    steps = {
        "llama_cpp_wheel": run([*pip, "--no-deps", str(llama_wheel())]),
        "bedside_base": run([*pip, str(REPO_ROOT)]),
    }
    for name, step in steps.items():
        if step.returncode != 0:
            raise SystemExit(f"{name} failed:\n{step.stderr[-3000:]}")
    install_seconds = time.perf_counter() - started
    packages = run([python, "-m", "pip", "list", "--format=json"]).stdout
    names = sorted(p["name"].lower() for p in json.loads(packages))
    torch_absent = run([python, "-c", "import torch"]).returncode != 0
    verify_started = time.perf_counter()
    verify = run([str(home / "bin" / "bedside"), "verify", str(args.bundle)], cwd=home)
    result = {
        "created_utc": utc_now(),
        "command": command_line(),
        "python": sys.version.split()[0],
        "bundle": str(args.bundle),
        "install_seconds": round(install_seconds, 1),
        "venv_bytes": folder_bytes(home),
        "packages": names,
        "torch_absent": torch_absent,
        "transformers_absent": "transformers" not in names,
        "verify_exit_code": verify.returncode,
        "verify_seconds": round(time.perf_counter() - verify_started, 1),
        "verify_output_tail": verify.stdout[-2500:] + verify.stderr[-1000:],
    }
    write_json_atomic(RESULTS, result)
    print(json.dumps({k: v for k, v in result.items() if k != "packages"}, indent=2))
    if verify.returncode != 0 or not torch_absent:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
