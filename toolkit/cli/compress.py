"""`bedside compress`: prune -> heal -> quantize a checkpoint as a plan (or explicit flags) says.

The decisions come from `--plan plan.json` (written by `bedside plan --out`), or from running the
planner for `--profile`, or from the flags alone; explicit flags override the plan's choices.
Results, record and stage cache are described in `toolkit.compress.pipeline`. Exit codes: 0 done, 2 bad
input (BedsideError, one line), 3 when the profile's plan finds nothing that fits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from toolkit.cli.build_tools import import_build_module
from toolkit.compress.record import CompressOptions
from toolkit.core.errors import BedsideError, NothingFitsError
from toolkit.core.units import MIB
from toolkit.model.facts import read_facts
from toolkit.model.source import resolve_model_dir
from toolkit.plan.planner import make_plan
from toolkit.plan.schema import read_plan
from toolkit.target.profiles import load_profile

if TYPE_CHECKING:
    from toolkit.compress.pipeline import CompressResult
    from toolkit.plan.schema import Plan


def register(app: typer.Typer) -> None:
    """Add the `compress` command to the `bedside` app."""
    app.command("compress")(compress_command)


def compress_command(
    model: Annotated[str, typer.Option("--model", help="'demo' or a local checkpoint folder.")],
    out: Annotated[
        Path, typer.Option("--out", help="Output folder (checkpoint/, compression.json, stages/).")
    ],
    plan_path: Annotated[
        Path | None,
        typer.Option("--plan", help="plan.json from `bedside plan --out` (its chosen candidate)."),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", help="Run the planner for this device profile and follow it.")
    ] = None,
    prune_layers: Annotated[
        int | None, typer.Option("--prune-layers", help="Number of decoder layers to remove.")
    ] = None,
    method: Annotated[
        str | None, typer.Option("--method", help="Layer-selection method (activation, last, angular, ...).")
    ] = None,
    quant: Annotated[
        str | None,
        typer.Option("--quant", help="Export scheme to prepare for (Q4_K_M, Q4_0, int4_b32, ...)."),
    ] = None,
    quant_method: Annotated[
        str | None,
        typer.Option(
            "--quant-method",
            help="auto (default: awq-gptq for GGUF, awq otherwise), awq (scales + clipping, searched on the "
            "export rounding), awq-gptq (AWQ, then GPTQ rounding on the exact Q4_0/Q5_0 grid, GGUF only), rtn "
            "(none) or imatrix (llama.cpp importance matrix, GGUF only).",
        ),
    ] = None,
    awq_search_rounding: Annotated[
        str | None,
        typer.Option(
            "--awq-search-rounding",
            help="How AWQ rounds its candidates where no torch grid is the export's rounding (GGUF with a "
            "matrix): rerank (default: emulated, then the best few with libggml), exact (all with libggml; "
            "slowest), emulated (fastest; for quick runs of big models).",
        ),
    ] = None,
    replace: Annotated[
        str | None,
        typer.Option(
            "--replace",
            help="Removed layers: linear (default: a fitted linear map folded into the block before each "
            "removed span, no extra parameters) or none (plain removal).",
        ),
    ] = None,
    no_heal: Annotated[bool, typer.Option("--no-heal", help="Skip LoRA healing after pruning.")] = False,
    heal_steps: Annotated[int | None, typer.Option("--heal-steps", help="LoRA optimizer steps.")] = None,
    heal_sequences: Annotated[
        int | None,
        typer.Option(
            "--heal-sequences",
            help="Healing sequences from the calibration data (1-1024; default: --calib-sequences).",
        ),
    ] = None,
    heal_lr: Annotated[float | None, typer.Option("--heal-lr", help="LoRA learning rate (default 2e-4).")] = None,
    heal_rank: Annotated[int | None, typer.Option("--heal-rank", help="LoRA rank (alpha = 2 x rank; default 8).")] = None,
    heal_objective: Annotated[
        str | None,
        typer.Option(
            "--heal-objective",
            help="kd (default: distil the unpruned model's top-64 next-token log-probabilities) or ce (the LM "
            "loss on the calibration text).",
        ),
    ] = None,
    heal_projector: Annotated[
        bool,
        typer.Option("--heal-projector", help="A LLaVA: train the vision projector in full while healing."),
    ] = False,
    calib: Annotated[
        str | None,
        typer.Option("--calib", help="Calibration data: a file or a named set (default radiology)."),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval", help="Held-apart data for per-stage perplexity (default: a split)."),
    ] = None,
    calib_sequences: Annotated[
        int | None, typer.Option("--calib-sequences", help="Calibration sequences (1-128).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per calibration sequence.")] = None,
    sequential: Annotated[
        str | None,
        typer.Option(
            "--sequential",
            help="Block by block (one decoder block in memory): auto (default: models above 2 GiB in "
            "float32), on, off.",
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bars.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print compression.json on stdout instead of the summary (no bars).")
    ] = False,
) -> None:
    """Prune, heal and quantize MODEL into OUT; re-running resumes finished stages."""
    pipeline = import_build_module("toolkit.compress.pipeline", "compress")  # torch: when compressing, not at start

    flags: dict[str, Any] = {
        "prune_layers": prune_layers,
        "method": method,
        "quant": quant,
        "quant_method": quant_method,
        "awq_search_rounding": awq_search_rounding,
        "replace": replace,
        "heal_steps": heal_steps,
        "heal_sequences": heal_sequences,
        "heal_lr": heal_lr,
        "heal_rank": heal_rank,
        "heal_objective": heal_objective,
        "calib": calib,
        "eval_data": eval_data,
        "calib_sequences": calib_sequences,
        "seq_len": seq_len,
        "sequential": sequential,
    }
    overrides = {key: value for key, value in flags.items() if value is not None}
    if no_heal:
        overrides["heal"] = False
    if heal_projector:
        overrides["heal_projector"] = True
    if plan_path is not None and profile is not None:
        raise BedsideError("give --plan or --profile, not both (--plan already holds a profile's decision)")
    plan: Plan | None = None
    if plan_path is not None:
        plan = read_plan(plan_path)
        check_plan_model(plan, model, plan_path)
    elif profile is not None:
        plan = plan_for_profile(model, profile, overrides)
    elif "prune_layers" not in overrides and "quant" not in overrides:
        raise BedsideError(
            "nothing to do: give --plan plan.json, --profile NAME, or at least --prune-layers / --quant"
        )
    options = pipeline.options_from_plan(plan, **overrides) if plan is not None else CompressOptions(**overrides)
    result = pipeline.compress(model, out, options, plan=plan, progress=not (no_progress or json_output))
    if json_output:
        typer.echo(json.dumps(result.record, indent=2))
    else:
        print_summary(result)


def check_plan_model(plan: Plan, model: str, plan_path: Path) -> None:
    """Refuse a plan made for another model (its layer indices and sizes would not apply)."""

    if plan.model == model:
        return
    try:
        same = resolve_model_dir(plan.model).resolve() == resolve_model_dir(model).resolve()
    except BedsideError:
        same = False
    if not same:
        raise BedsideError(
            f"plan '{plan_path}' was made for model '{plan.model}', not '{model}': "
            f"run `bedside plan --model {model}` again"
        )


def plan_for_profile(model: str, profile: str, overrides: dict[str, Any]) -> Plan:
    """Run the planner for `profile`, pinning what the flags fix (layers removed, scheme)."""

    device = load_profile(profile)
    facts = read_facts(model)
    plan = make_plan(
        facts,
        device,
        model,
        quant=overrides.get("quant"),
        prune_layers=overrides.get("prune_layers"),
        healed=overrides.get("heal", True),
    )
    if not plan.fits or plan.chosen is None:
        raise NothingFitsError(plan.reason or f"nothing fits profile '{profile}'")
    return plan


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_summary(result: CompressResult) -> None:
    """Layers removed, per-stage perplexity, time and peak memory, and where the outputs are."""

    record = result.record
    quality = record["quality"]
    table = Table(title=f"bedside compress: {record['model']['name']}")
    for column in ("stage", "status", "seconds", "peak RSS MiB", "perplexity"):
        table.add_column(column, justify="left" if column in ("stage", "status") else "right")
    table.add_row("original", "-", "-", "-", _ppl(quality["original"]))
    for stage, quality_key in (("prune", "pruned"), ("heal", "healed"), ("quantize", "quantized")):
        entry = record["stages"][stage]
        if "skipped" in entry:
            table.add_row(stage, f"skipped: {entry['skipped']}", "-", "-", _ppl(quality[quality_key]))
            continue
        table.add_row(
            stage,
            "resumed" if entry["resumed"] else "done",
            f"{entry['seconds']:.1f}",
            f"{entry['peak_rss_bytes'] / MIB:.0f}",
            _ppl(quality[quality_key]),
        )
    console = Console()
    console.print(table)
    removed = record["layers_removed"]
    console.print(
        f"layers removed: {removed or 'none'} ({record['num_layers_after']} of "
        f"{record['model']['num_layers']} remain); quant: "
        f"{record['quant']['scheme'] + ' / ' + str(record['quant']['method']) if record['quant'] else 'none'}"
    )
    replacement = record.get("replacement")
    for span in (replacement or {}).get("spans", []):
        held = span.get("held_apart_relative_error_after")
        console.print(
            f"linear replacement of layers {span['layers']} ({span['fold']}): span output error "
            f"{span['relative_error_before']:.3f} -> {span['relative_error_after']:.3f} on calibration"
            + (
                f", {span['held_apart_relative_error_before']:.3f} -> {held:.3f} held apart"
                if held is not None
                else ""
            )
        )
    for span in (replacement or {}).get("skipped", []):
        console.print(f"linear replacement skipped for layers {span['layers']}: {span['reason']}")
    console.print(f"checkpoint: {result.checkpoint}")
    if result.imatrix is not None:
        console.print(f"importance matrix: {result.imatrix}")
    console.print(f"record: {result.checkpoint.parent / 'compression.json'}  ({record['seconds']:.1f} s)")
