"""`bedside verify BUNDLE`: check a bundle's hashes, load and smoke-test its model, measure peak memory.

With `--trusted-key PUB` the bundle must also carry the key's signature of its manifest (`signature`).
Exit codes: 0 every check passed; 1 a check failed (each named with its number and threshold);
2 bad input (no such bundle, not a bundle, unsafe archive, unknown profile, unreadable key).
With `--json` stdout holds one JSON object, `passed` and `checks` in report.json's form, and nothing else.
"""

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from toolkit.deploy.verify import verify_bundle
from toolkit.validate.checks import format_number


def register(app: typer.Typer) -> None:
    """Add the `verify` command to the `bedside` app."""
    app.command("verify")(verify_command)


def verify_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder or its .tar.gz.")],
    profile: Annotated[
        str | None, typer.Option("--profile", help="Device profile to check against (default: the bundle's).")
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Runtime threads.")] = None,
    trusted_key: Annotated[
        Path | None,
        typer.Option(
            "--trusted-key",
            help="Ed25519 public key (PEM, keygen's .pub): fail unless manifest.json is signed by it.",
        ),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object (passed, checks as in report.json) instead."),
    ] = False,
) -> None:
    """Verify a deployment bundle on this machine; prints PASS/FAIL per check."""

    console = Console()
    result = verify_bundle(bundle, profile=profile, n_threads=threads, trusted_key=trusted_key)
    if json_output:
        checks = [check.model_dump(mode="json") for check in result.checks]
        sys.stdout.write(json.dumps({"passed": result.passed, "checks": checks}) + "\n")
        sys.stdout.flush()
        if not result.passed:
            raise SystemExit(1)
        return
    for check in result.checks:
        mark = "[green]PASS[/]" if check.passed else "[red]FAIL[/]"
        figure = (
            f": {format_number(check.value, check.unit)} {check.comparison} {format_number(check.threshold, check.unit)}"
            if check.threshold is not None
            else ""
        )
        console.print(f"{mark} {check.name}{figure} ({check.detail})", highlight=False, soft_wrap=True)
    failed = [check.name for check in result.checks if not check.passed]
    if failed:
        console.print(f"[red]verify failed:[/] {', '.join(failed)}", highlight=False, soft_wrap=True)
        raise SystemExit(1)
    console.print(f"[green]verify passed:[/] {len(result.checks)} checks on {bundle}", highlight=False)
