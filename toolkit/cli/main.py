"""The `bedside` command. Each command registers itself from its own module in toolkit/cli/."""

import os
import sys

import typer

from toolkit.cli import compress as cli_compress
from toolkit.cli import deploy as cli_deploy
from toolkit.cli import eval as cli_eval
from toolkit.cli import export as cli_export
from toolkit.cli import model as cli_model
from toolkit.cli import plan as cli_plan
from toolkit.cli import profiles as cli_profiles
from toolkit.cli import run as cli_run
from toolkit.cli import setup as cli_setup
from toolkit.cli import verify as cli_verify
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


def _register_all() -> None:
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
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as error:
        # Usage errors (unknown option, bad value) are click's ClickException, which typer >= 0.2x
        # vendors as typer._click: recognise it by its interface instead of importing either.
        if callable(getattr(error, "format_message", None)) and hasattr(error, "exit_code"):
            typer.echo(f"error: {error.format_message()}", err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
