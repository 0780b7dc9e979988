"""The `bedside` command. Each command registers itself from its own module in toolkit/cli/."""

import importlib
import os
import sys
from typing import Annotated

import typer

from toolkit import __version__
from toolkit.core.errors import BedsideError

# Offline at run time: set-up fetched everything through the package registry.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(
    name="bedside",
    help="Compress a medical LM/VLM so that it provably fits and works on a target device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


# Command modules in help order; each has register(app). Adding a command is one name here.
COMMANDS = (
    "setup",
    "profiles",
    "model",
    "plan",
    "simulate",
    "emulate",
    "compress",
    "export",
    "eval",
    "run",
    "deploy",
    "verify",
    "keygen",
)


def _register_all() -> None:
    # compress and deploy import the build toolchain (torch...) only when they run: toolkit/cli/build_tools.py
    for module_name in COMMANDS:
        importlib.import_module(f"toolkit.cli.{module_name}").register(app)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bedside {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)
    ] = False,
) -> None:
    """Compress a medical LM/VLM so that it provably fits and works on a target device."""


_register_all()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (3 when nothing fits)."""
    # Output that is not a terminal (a pipe, a file, CI) is not wrapped at rich's default 80 columns,
    # so `bedside profiles | grep NAME` finds whole names.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    if wide:
        os.environ["COLUMNS"] = "240"
    try:
        app(standalone_mode=False)
    except BedsideError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as error:
        # Usage errors (unknown option, bad value) are click's ClickException, which typer >= 0.2x
        # vendors as typer._click: recognise it by its interface instead of importing either.
        if callable(getattr(error, "format_message", None)) and hasattr(error, "exit_code"):
            # No arguments at all: the help was printed and the error has no text of its own.
            message = (
                error.format_message().strip()
                or "missing command or arguments: see the help above (`bedside --help`)"
            )
            typer.echo(f"error: {message}", err=True)
            sys.exit(2)
        raise
    finally:
        if wide:
            del os.environ["COLUMNS"]


if __name__ == "__main__":
    main()
