"""`bedside simulate`: predict prefill and decode speed of a plan, bundle or export on a device profile.

The model is toolkit/plan/simulator.py (a memory-tier epoch model calibrated on this host). `--json` prints one
JSON object: decode_tokens_per_s, prefill_tokens_per_s, ttft_s, placement, oom_context, per_token_latency_s
(along latency_positions) and what they rest on. `--plot PATH` also writes latency along the context for each
placement the simulation weighed (PNG, SVG or PDF by the suffix; matplotlib, from `bedside[build]`). A plan is
simulated at its own context and placement unless --context / --placement say otherwise, so the decode speed
printed is the plan's predicted_decode_tokens_per_s. Bad input (unknown placement, a placement that fits no tier,
a context beyond the model's maximum) is one error line and exit 2 (toolkit.cli.main.main).
"""

import io
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.core.atomic import write_bytes_atomic
from toolkit.core.errors import BedsideError
from toolkit.core.units import MIB
from toolkit.plan.schema import read_plan
from toolkit.plan.simulator import DECODE_TOKENS, PLACEMENTS, Simulation, simulate
from toolkit.plan.workload import read_artifact_workload, workload_from_plan
from toolkit.target.profiles import load_profile


def register(app: typer.Typer) -> None:
    """Add the `simulate` command to the `bedside` app."""
    app.command("simulate")(simulate_command)


def simulate_command(
    profile: Annotated[str, typer.Option("--profile", help="Device profile name, 'host', or a YAML path.")],
    plan: Annotated[Path | None, typer.Option("--plan", help="plan.json (its chosen candidate).")] = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="A bundle folder, an export folder, or a .gguf file.")
    ] = None,
    context: Annotated[
        int | None, typer.Option("--context", help="Context length in tokens (default: the profile's).")
    ] = None,
    placement: Annotated[
        str, typer.Option("--placement", help=f"Where weights and KV cache live: {', '.join(PLACEMENTS)}.")
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="CPU threads the runtime uses (default: the profile's cores)."),
    ] = None,
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", help="Decode steps after the prompt (as `bedside eval`).")
    ] = DECODE_TOKENS,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Write latency along the context per placement to this .png/.svg/.pdf."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Predict time to first token, prefill and decode speed of a deployment on a device profile."""
    if (plan is None) == (bundle is None):
        raise BedsideError("give exactly one of --plan plan.json or --bundle DIR|EXPORT|FILE.gguf")
    if threads is not None and threads <= 0:
        raise BedsideError(f"--threads must be a positive number, got {threads}")
    if plot is not None and plot.suffix.lower() not in PLOT_FORMATS:
        raise BedsideError(f"--plot {plot}: name a {', '.join(PLOT_FORMATS)} file")
    device = load_profile(profile)
    if plan is not None:
        planned = read_plan(plan)
        workload = workload_from_plan(planned, device)
        context = planned.context_length if context is None else context
    else:
        workload = read_artifact_workload(bundle, device)  # type: ignore[arg-type]
    result = simulate(workload, device, context, placement, threads, decode_tokens)
    if plot is not None:
        write_latency_plot(result, plot, workload.num_layers)
    if as_json:
        typer.echo(json.dumps(result.to_json(workload.num_layers)))
        return
    print_simulation(result, workload.num_layers)


def print_simulation(result: Simulation, layers: int) -> None:
    """Summary table, the placement's bytes per tier, and latency along the context."""
    console = Console()
    summary = Table(
        title=f"{escape(result.workload)} on {escape(result.profile)} ({result.runtime}), context {result.context}"
    )
    summary.add_column("figure")
    summary.add_column("predicted", justify="right")
    summary.add_row("placement", escape(result.placement.label(layers)))
    summary.add_row("time to first token", f"{result.ttft_s:.3f} s ({result.prompt_tokens} prompt tokens)")
    summary.add_row("prefill", f"{result.prefill_tokens_per_s:,.1f} tok/s")
    summary.add_row("decode", f"{result.decode_tokens_per_s:,.2f} tok/s (last {result.decode_tokens} steps)")
    summary.add_row(
        "memory runs out at", "fits" if result.oom_context is None else f"{result.oom_context} tokens"
    )
    for tier, nbytes in result.tier_bytes.items():
        summary.add_row(f"memory on {escape(tier)}", f"{nbytes / MIB:,.1f} MiB")
    for name, rate in result.alternatives.items():
        summary.add_row(
            f"  decode if {escape(name)}", "does not fit" if rate is None else f"{rate:,.2f} tok/s"
        )
    console.print(summary)
    latency = Table(title="Decode latency along the context")
    latency.add_column("position", justify="right")
    latency.add_column("ms / token", justify="right")
    step = max(1, len(result.latency_positions) // 8)
    shown = list(zip(result.latency_positions, result.per_token_latency_s, strict=True))
    for position, seconds in shown[::step] + ([shown[-1]] if (len(shown) - 1) % step else []):
        latency.add_row(str(position), f"{seconds * 1000:.2f}")
    console.print(latency)
    for processor, figures in result.efficiency.items():
        console.print(
            f"[dim]{processor}: bandwidth x{figures['bandwidth']:.3f}, compute x{figures['compute']:.3f}, "
            f"{float(figures['step_overhead_s']) * 1000:.2f} ms/step; {escape(str(figures['source']))}[/]"  # type: ignore[arg-type]
        )
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]")


PLOT_FORMATS = (".png", ".svg", ".pdf")


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend; a one-line error on a base install without it."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise BedsideError(
            "--plot needs matplotlib, which the base install leaves out: `pip install 'bedside[build]'`"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_latency_plot(result: Simulation, path: Path, layers: int) -> None:
    """Milliseconds per decoded token along the context, one line per placement the simulation weighed (the
    chosen one bold), the context where memory runs out marked; written atomically in the suffix's format."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    chosen = result.placement.label(layers)
    for label, seconds in result.latency_by_placement.items():
        if seconds is None:
            continue
        is_chosen = label == chosen
        rate = result.alternatives.get(label)
        axes.plot(
            result.latency_positions,
            [value * 1000 for value in seconds],
            linewidth=2.6 if is_chosen else 1.2,
            label=f"{label}{' (chosen)' if is_chosen else ''}: {rate:.2f} tok/s" if rate else label,
        )
    if result.oom_context is not None:
        axes.axvline(result.oom_context, color="red", linestyle="--", label=f"memory runs out ({result.oom_context})")
    unplaced = [label for label, seconds in result.latency_by_placement.items() if seconds is None]
    axes.set_xlabel("position in the context (tokens cached)")
    axes.set_ylabel("ms per decoded token")
    axes.set_ylim(bottom=0)
    axes.set_title(
        f"{result.workload} on {result.profile} ({result.runtime}), predicted"
        + (f"; no fit: {', '.join(unplaced)}" if unplaced else ""),
        fontsize=9,
    )
    axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format=path.suffix.lower().lstrip("."), dpi=100)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
