"""What a target machine without the build toolchain gets: verify/run/profiles import and work without
torch, build commands say what to install in one line, --version, and profiles packaged in the wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD_ONLY = ("torch", "transformers", "peft", "optimum", "accelerate", "onnx", "matplotlib", "safetensors")
BLOCK = f"import sys\nfor name in {BUILD_ONLY!r}: sys.modules[name] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_the_verify_and_run_paths_import_without_the_build_toolchain():
    result = run_python(
        "import toolkit.cli.verify, toolkit.cli.run, toolkit.cli.profiles, toolkit.deploy.verify\n"
        "import runtimes.llamacpp_runner, runtimes.onnx_runner\n"
        f"print('loaded', sorted(m for m in sys.modules if m.split('.')[0] in {BUILD_ONLY!r} and sys.modules[m]))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "loaded []"


def test_the_cli_starts_without_the_build_toolchain_and_imports_it_to_compress():
    """`bedside eval`, `plan`, `verify`... start without torch's import (about a second on this machine); compress
    and deploy import it when they run."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, toolkit.cli.main\n"
         f"print(sorted(m for m in {BUILD_ONLY!r} if m in sys.modules))\n"
         "import toolkit.cli.build_tools as b; b.import_build_module('toolkit.compress.pipeline', 'compress')\n"
         "print('torch' in sys.modules)"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]


def test_a_build_command_without_the_toolchain_is_one_line_exit_2():
    result = run_python(
        "sys.argv = ['bedside', 'compress', '--model', 'demo', '--out', 'x']\n"
        "from toolkit.cli.main import main\nmain()\n"
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: this installation has no torch: `bedside compress` needs the build tools; install them with "
        "`pip install 'bedside[build]'` (verify, run and profiles work without)"
    ]


def test_version_and_unwrapped_output_in_a_pipe():
    version = subprocess.run(
        [sys.executable, "-m", "toolkit.cli.main", "--version"], capture_output=True, text=True, cwd=REPO
    )
    assert version.returncode == 0 and version.stdout.strip() == "bedside 0.1.0"
    listing = subprocess.run(
        [sys.executable, "-m", "toolkit.cli.main", "profiles"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )
    assert listing.returncode == 0, listing.stderr
    rows = [line for line in listing.stdout.splitlines() if "jetson4gb" in line]
    assert len(rows) == 1 and "NVIDIA Jetson Orin Nano 4GB module" in rows[0]  # one row, not wrapped


@pytest.mark.slow
def test_the_wheel_carries_the_device_profiles(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("bedside-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"device_profiles/{p.name}" for p in (REPO / "device_profiles").glob("*.yaml")}
    assert shipped and shipped <= names
    assert "toolkit/core/formats.py" in names and not any(n.startswith(("tests/", "bench/")) for n in names)
