"""`bedside keygen --out PATH`: a new Ed25519 key pair for signing bundles (toolkit.deploy.signing).

PATH is the private key (PEM, mode 0600; keep it on the build host, pass it to `deploy --sign-key`);
PATH.pub the public key (give it to hospital IT for `verify --trusted-key`). Neither is ever overwritten.
Exit codes: 0 written; 2 a file exists or cannot be written.
"""

from pathlib import Path
from typing import Annotated

import typer

from toolkit.deploy.signing import write_keypair


def register(app: typer.Typer) -> None:
    """Add the `keygen` command to the `bedside` app."""
    app.command("keygen")(keygen_command)


def keygen_command(
    out: Annotated[
        Path, typer.Option("--out", help="Private key file to write; the public key goes to OUT.pub.")
    ],
) -> None:
    """Write a new Ed25519 key pair for `deploy --sign-key` and `verify --trusted-key`."""

    private, public, fingerprint = write_keypair(out)
    typer.echo(f"private key: {private} (mode 0600: keep it on the build host; deploy --sign-key {private})")
    typer.echo(f"public key:  {public} (for hospital IT: verify BUNDLE --trusted-key {public.name})")
    typer.echo(f"key sha256:  {fingerprint}")
