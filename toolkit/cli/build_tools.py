"""Commands that need the build toolchain (torch, transformers, peft, optimum) import it when they run, not when
the CLI starts: `bedside eval`, `plan`, `verify`... start without torch's import, and a target machine with the
base install gets a one-line error from `bedside compress` / `deploy` instead of a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from toolkit.core.errors import BedsideError

PROJECT_PACKAGES = ("toolkit", "exporters", "runtimes")


def missing_build_tools(command: str, missing: str) -> BedsideError:
    """The one-line error of `bedside COMMAND` on an installation without the module `missing`."""
    return BedsideError(
        f"this installation has no {missing}: `bedside {command}` needs the build tools; "
        "install them with `pip install 'bedside[build]'` (verify, run and profiles work without)"
    )


def import_build_module(module: str, command: str) -> ModuleType:
    """`module` (one that imports the build toolchain), or missing_build_tools' error when a dependency is absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] in PROJECT_PACKAGES:
            raise  # a module of Bedside itself: a broken installation, not a missing extra
        raise missing_build_tools(command, error.name or "build dependency") from None
