"""`bedside profiles`: list the device profiles, or show one with the source of every figure."""

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.core.errors import BedsideError
from toolkit.core.units import GIB
from toolkit.target.profiles import (
    DeviceProfile,
    available_bytes,
    budget_bytes,
    list_profiles,
    load_profile,
    profile_to_yaml,
)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB"


def _bandwidth_text(profile: DeviceProfile) -> str:
    tier = profile.model_memory_tier
    text = f"{tier.bandwidth_gbs.value:g} GB/s"
    sustained = tier.sustained_bandwidth_gbs
    if sustained is not None and sustained.value != tier.bandwidth_gbs.value:
        text += f" ({sustained.value:g} sustained)"
    return text


def profiles_table(names: list[str]) -> Table:
    """One row per profile; a profile that fails to load shows its error instead of stopping the list."""
    table = Table(title="Device profiles", show_lines=False)
    for column in (
        "name",
        "device",
        "model tier",
        "bandwidth",
        "budget (after headroom)",
        "formats",
        "context",
    ):
        table.add_column(column, overflow="fold")
    for name in names:
        try:
            profile = load_profile(name)
        except BedsideError as error:
            table.add_row(name, f"[red]{escape(str(error))}[/red]", "", "", "", "", "")
            continue
        tier = profile.model_memory_tier
        table.add_row(
            name,
            escape(profile.description),
            f"{tier.capacity_gib.value:g} GiB {tier.kind} ({escape(tier.name)})",
            _bandwidth_text(profile),
            f"{_gib(budget_bytes(profile))} ({_gib(available_bytes(profile))})",
            ", ".join(profile.formats),
            str(profile.context_length),
        )
    return table


def _flatten(value: Any, path: str) -> list[tuple[str, str, str]]:
    """(field path, value, source) rows; a {value, source} mapping is one Figure row."""
    if isinstance(value, dict):
        if set(value) == {"value", "source"}:
            return [(path, f"{value['value']:g}", str(value["source"]))]
        rows: list[tuple[str, str, str]] = []
        for key, item in value.items():
            rows += _flatten(item, f"{path}.{key}" if path else key)
        return rows
    if isinstance(value, list) and any(isinstance(item, dict) or " " in str(item) for item in value):
        return [row for index, item in enumerate(value) for row in _flatten(item, f"{path}[{index}]")]
    if isinstance(value, list):
        return [(path, ", ".join(str(item) for item in value) or "-", "")]
    return [(path, "-" if value is None else str(value), "")]


def profile_rows(profile: DeviceProfile) -> list[tuple[str, str, str]]:
    """Every field of the profile with its source, then the budget the planner will use."""
    rows = _flatten(profile.model_dump(mode="json"), "")
    rows.append(("budget", _gib(budget_bytes(profile)), "computed: model tier capacity_gib - reserved_gib"))
    rows.append(
        (
            "available",
            _gib(available_bytes(profile)),
            "computed: budget x (1 - headroom_pct / 100); a memory estimate must stay under it",
        )
    )
    return rows


def profile_detail_table(profile: DeviceProfile) -> Table:
    """The `show` view: field, value and source in three columns."""
    table = Table(title=f"{escape(profile.name)}: {escape(profile.description)}", show_lines=False)
    table.add_column("field", overflow="fold", no_wrap=False)
    table.add_column("value", overflow="fold", ratio=1)
    table.add_column("source", overflow="fold", ratio=3)
    for field, value, source in profile_rows(profile):
        table.add_row(escape(field), escape(value), escape(source))
    return table


def register(app: typer.Typer) -> None:
    """Add `bedside profiles` (lists) and `bedside profiles show NAME_OR_PATH` to the CLI."""
    profiles_app = typer.Typer(
        help="Device profiles: list them, or show one with the source of every figure.",
        invoke_without_command=True,
        no_args_is_help=False,
    )

    @profiles_app.callback(invoke_without_command=True)
    def list_command(ctx: typer.Context) -> None:
        """List the shipped profiles and "host" (measured now): memory, bandwidth, budget, formats."""
        if ctx.invoked_subcommand is None:
            Console().print(profiles_table(list_profiles()))

    @profiles_app.command("show")
    def show_command(
        name_or_path: Annotated[
            str, typer.Argument(help='A shipped profile name, "host", or the path to a profile YAML.')
        ],
        as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
        as_yaml: Annotated[
            bool, typer.Option("--yaml", help="Print the profile as YAML (e.g. to freeze a host profile).")
        ] = False,
    ) -> None:
        """Show every field of one profile with the source of each figure."""
        if as_json and as_yaml:
            raise BedsideError("choose one of --json and --yaml")
        profile = load_profile(name_or_path)
        if as_json:
            typer.echo(profile.model_dump_json(indent=2))
        elif as_yaml:
            typer.echo(profile_to_yaml(profile), nl=False)
        else:
            Console().print(profile_detail_table(profile))

    app.add_typer(profiles_app, name="profiles")
