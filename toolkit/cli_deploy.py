"""`bedside deploy`: the main job. Today it plans and stops, naming the stages not wired in yet."""

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from toolkit.errors import NothingFitsError

# Stages of plan -> compress -> export -> validate -> bundle, and whether deploy runs them yet.
DEPLOY_STAGES: tuple[tuple[str, bool], ...] = (
    ("plan", True),
    ("compress (prune -> heal -> AWQ)", False),
    ("export (GGUF / ONNX)", False),
    ("validate on the target runtime", False),
    ("report + bundle", False),
)


def register(app: typer.Typer) -> None:
    """Add the `deploy` command to the `bedside` app."""
    app.command("deploy")(deploy_command)


def deploy_command(
    profile: Annotated[str, typer.Option("--profile", help="Device profile name, 'host', or a YAML path.")],
    model: Annotated[str, typer.Option("--model", help="'demo' or a local checkpoint folder.")] = "demo",
    calib: Annotated[str | None, typer.Option("--calib", help="Calibration data (path or named source).")] = None,
    eval_data: Annotated[str | None, typer.Option("--eval", help="Evaluation data (path or named source).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for plan.json (and, later, the bundle).")] = Path(
        "out/deploy"
    ),
) -> None:
    """Plan the deployment of MODEL on PROFILE; the stages after planning are not wired in yet."""
    from toolkit.cli_plan import print_plan, write_plan
    from toolkit.facts import read_facts
    from toolkit.planner import make_plan
    from toolkit.profiles import load_profile

    console = Console(stderr=True)
    device = load_profile(profile)
    facts = read_facts(model)
    if calib is not None or eval_data is not None:
        from toolkit.data import load_dataset_spec

        for spec in (calib, eval_data):
            if spec is not None:
                load_dataset_spec(spec)  # fail early on bad data, one line, exit 2
    plan = make_plan(facts, device, model)
    print_plan(plan, top=5, num_layers=facts.num_layers)
    if not plan.fits:
        raise NothingFitsError(plan.reason)
    write_plan(plan, out / "plan.json")
    console.print(f"plan written to {out / 'plan.json'}")
    missing = [name for name, built in DEPLOY_STAGES if not built]
    console.print(
        "[bold yellow]deploy is incomplete:[/] stages not built into `deploy` yet: "
        + "; ".join(missing)
        + ". No bundle was produced."
    )
