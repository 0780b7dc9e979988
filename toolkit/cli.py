"""The `bedside` command. Each area registers its commands from its own cli_<area>.py module."""

import os
import sys

import typer

from exporters.base import ExportError
from runtimes.base import RuntimeLoadError
from toolkit.errors import BedsideError

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


def _register_all() -> None:
    from toolkit import (
        cli_compress,
        cli_deploy,
        cli_eval,
        cli_export,
        cli_model,
        cli_plan,
        cli_profiles,
        cli_run,
        cli_setup,
        cli_verify,
    )

    for module in (
        cli_setup,
        cli_profiles,
        cli_model,
        cli_plan,
        cli_compress,
        cli_export,
        cli_eval,
        cli_run,
        cli_deploy,
        cli_verify,
    ):
        module.register(app)


_register_all()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (3 when nothing fits)."""
    try:
        app(standalone_mode=False)
    except BedsideError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except (ExportError, RuntimeLoadError) as error:  # one-line errors from exporters/ and runtimes/
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as error:  # click usage errors carry their own exit code
        import click

        if isinstance(error, click.exceptions.ClickException):
            typer.echo(f"error: {error.format_message()}", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
