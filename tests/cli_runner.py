"""`bedside ARGS` for tests: in this process by default (the entry point `toolkit.cli.main.main` with its
argv, environment, stdin and working folder swapped in), or in a real child process.

In process costs milliseconds instead of the 1.5-3 s a child spends importing Python, torch and transformers,
and runs the same code the console script runs: `main()` turns user errors into one `error:` line and exit
code 2. An exception `main()` lets through becomes exit code 1 with its traceback on stderr, as a child would
print it, so tests that assert "no traceback" still see one. Tests of process behaviour (signals, a killed
run, the `python -m` entry point, a fresh interpreter's imports) pass `process=True`.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What every run sees unless the test overrides it: rich output as wide as a log line, one BLAS thread.
BASE_ENV = {"COLUMNS": "200", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@contextlib.contextmanager
def _swapped_environment(env: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def bedside(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    process: bool = False,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run `bedside ARGS`; returns a CompletedProcess (returncode, stdout, stderr) either way."""
    environment = {**BASE_ENV, **(env or {})}
    if process:
        return subprocess.run(
            [sys.executable, "-m", "toolkit.cli.main", *args],
            input=stdin if stdin is not None else "",
            capture_output=True,
            text=True,
            cwd=cwd or REPO,
            env={**os.environ, **environment},
            timeout=timeout,
        )

    from toolkit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_stdin, saved_cwd = sys.argv, sys.stdin, Path.cwd()
    code = 0
    try:
        sys.argv = ["bedside", *args]
        sys.stdin = io.StringIO(stdin or "")
        os.chdir(cwd or REPO)
        with _swapped_environment(environment), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exited:
                code = exited.code if isinstance(exited.code, int) else (0 if exited.code is None else 1)
            except BaseException:  # noqa: BLE001 - a child process would print it and exit 1
                err.write(traceback.format_exc())
                code = 1
    finally:
        sys.argv, sys.stdin = saved_argv, saved_stdin
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(["bedside", *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(
    result: subprocess.CompletedProcess[str], *needles: str, code: int = 2, empty_stdout: bool = False
) -> str:
    """The run failed with exit `code`, no traceback and exactly one `error:` line holding every needle."""
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    if empty_stdout:
        assert result.stdout == "", result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
