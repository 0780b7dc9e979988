"""Commands that need the build toolchain (torch, transformers, peft, optimum) import it when they run, not when
the CLI starts: `bedside eval`, `plan`, `verify`... start without torch's import, and a target machine with the
base install gets a one-line error from `bedside compress` / `deploy` instead of a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from toolkit.core.errors import BedsideError

PROJECT_PACKAGES = ("toolkit", "exporters", "runtimes")


def import_build_module(module: str, command: str) -> ModuleType:
    """`module` (one that imports the build toolchain); without a dependency, a one-line BedsideError saying what
    `bedside COMMAND` needs installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] in PROJECT_PACKAGES:
            raise  # a module of Bedside itself: a broken installation, not a missing extra
        raise BedsideError(
            f"this installation has no {error.name or 'build dependency'}: `bedside {command}` needs the build "
            "tools; install them with `pip install 'bedside[build]'` (verify, run and profiles work without)"
        ) from None
