"""`bedside plan`: choose a format, quantization scheme, depth, vision dtype, KV-cache precision and (beside a GPU)
placement that fit a device.

Exit codes: 0 when a plan fits, 3 when nothing does (the table or JSON is still printed, then one error line on
stderr), 2 on bad input (BedsideError, handled by toolkit.cli.main.main).
"""

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.cli.options import FormatOption, KvCacheOption, PruneLayersOption, QuantOption
from toolkit.core.errors import NothingFitsError
from toolkit.core.units import GIB, MIB
from toolkit.model.facts import ModelFacts, read_facts
from toolkit.plan.planner import make_plan, placement_label
from toolkit.plan.quality_priors import load_sensitivities
from toolkit.plan.schema import Candidate, Plan, write_plan
from toolkit.target.profiles import load_profile


def register(app: typer.Typer) -> None:
    """Add the `plan` command to the `bedside` app."""
    app.command("plan")(plan_command)


def plan_command(
    model: Annotated[str, typer.Option("--model", help="'demo' or a local checkpoint folder (config.json).")],
    profile: Annotated[str, typer.Option("--profile", help="Device profile name, 'host', or a YAML path.")],
    format_name: FormatOption = None,
    quant: QuantOption = None,
    prune_layers: PruneLayersOption = None,
    context: Annotated[
        int | None, typer.Option("--context", help="Context length to plan for (overrides the profile's).")
    ] = None,
    kv_cache: KvCacheOption = None,
    host_placement: Annotated[
        bool,
        typer.Option(
            "--host-placement/--device-only",
            help="Beside a discrete GPU, also consider the KV cache or some layers in host memory (llama.cpp).",
        ),
    ] = True,
    sensitivities: Annotated[
        Path | None,
        typer.Option("--sensitivities", help="Measured sensitivities JSON (replaces the quality priors)."),
    ] = None,
    no_heal: Annotated[
        bool,
        typer.Option(
            "--no-heal", help="Plan for a compression without LoRA healing (one-shot depth priors)."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as one JSON object.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Write plan.json here (atomically).")] = None,
    top: Annotated[int, typer.Option("--top", help="Candidates to show in the table.")] = 8,
) -> None:
    """Plan the compression of MODEL for a device: the best candidate that fits, and why."""

    device = load_profile(profile)
    facts = read_facts(model)
    measured = load_sensitivities(sensitivities) if sensitivities is not None else None
    plan = make_plan(
        facts,
        device,
        model,
        format=format_name,
        quant=quant,
        prune_layers=prune_layers,
        context=context,
        sensitivities=measured,
        kv_cache_dtype=kv_cache,
        host_placement=host_placement,
        healed=not no_heal,
    )
    plan.compression = compression_on_host(facts, plan, heal=not no_heal)
    if out is not None:
        write_plan(plan, out)
    if as_json:
        typer.echo(json.dumps(plan.model_dump(mode="json")))
    else:
        print_plan(plan, top, facts.num_layers)
    if not plan.fits:
        raise NothingFitsError(plan.reason)


def compression_on_host(facts: ModelFacts, plan: Plan, *, heal: bool) -> dict[str, Any]:
    """The compression's own peak memory per stage for the chosen candidate (compress's default data
    sizes), the host's memory, and whether the host can heal (else deploy compresses unhealed)."""
    import psutil

    from toolkit.compress.quant.methods import resolve_quant_method
    from toolkit.compress.record import CompressOptions
    from toolkit.plan.compression_memory import compression_memory, heals_in_sixteen_bits, streams_by_default

    defaults = CompressOptions()
    chosen = plan.chosen
    removed = chosen.layers_removed if chosen is not None else 0
    quantized = chosen is not None and chosen.quant is not None and chosen.quant.upper() not in ("F16", "FP16", "FP32")
    sequential = streams_by_default(facts)
    estimate = compression_memory(
        facts,
        calib_sequences=defaults.calib_sequences,
        seq_len=defaults.seq_len,
        eval_sequences=defaults.eval_sequences,
        prune_layers=removed,
        quant=quantized,
        sequential=sequential,
        heal=heal and removed > 0,
        heal_sixteen_bit=heals_in_sixteen_bits(sequential, str(facts.extra.get("dtype"))),
        gptq=quantized and resolve_quant_method(defaults.quant_method, chosen.quant if chosen else None) == "awq-gptq",
    )
    host = int(psutil.virtual_memory().total)
    estimate["host_memory_bytes"] = host
    estimate["can_heal"] = estimate["heal"] is None or estimate["heal"] <= host
    return estimate


def compression_table(compression: dict[str, Any]) -> Table:
    """Build-host memory per compress stage beside the host's memory."""
    mode = "block by block" if compression.get("sequential") else "in memory"
    table = Table(title=f"compression on this host ({mode}; host memory {_gib(compression['host_memory_bytes'])} GiB)")
    table.add_column("stage")
    table.add_column("peak GiB (estimate)", justify="right")
    for stage in ("perplexity", "prune", "heal", "quantize", "perplexity_quantized"):
        value = compression.get(stage)
        label = "heal (16-bit, checkpointing)" if stage == "heal" and compression.get("heal_sixteen_bit") else stage
        label = "perplexity of the quantized model" if stage == "perplexity_quantized" else label
        table.add_row(label, "-" if value is None else _gib(value))
    return table


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def _placement_cell(candidate: Candidate) -> str:
    """Short placement: "device", "-ngl N", "KV host", or both."""
    parts = []
    if candidate.gpu_layers is not None:
        parts.append(f"-ngl {candidate.gpu_layers}")
    if candidate.kv_on_host:
        parts.append("KV host")
    return ", ".join(parts) or "device"


def candidates_table(plan: Plan, top: int, num_layers: int) -> Table:
    """The chosen candidate and the next best (or, when nothing fits, the smallest), one row each."""
    rows: list[Candidate] = plan.candidates[:top]
    if not plan.fits:
        rows = sorted(plan.candidates, key=lambda c: c.memory.total_bytes)[:top]
    table = Table(
        title=f"Candidates ({len(plan.candidates)} considered; GiB; rm = layers removed of {num_layers})",
        caption="W weights, KV cache (kv: its precision), V vision tower + activations, OH runtime overhead, "
        "host: bytes in host memory beside a GPU; placement: -ngl N (head and N - 1 layers on the GPU) and KV "
        "cache in host memory",
    )
    columns = ("", "fmt", "quant", "rm", "vis", "kv", "placement", "W", "KV", "V", "OH", "total", "host", "fits",
               "ppl+%", "tok/s")  # fmt: skip
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("fmt", "quant", "vis", "kv", "placement") else "right"
        )
    for candidate in rows:
        m = candidate.memory
        mark = "*" if plan.chosen is not None and candidate == plan.chosen else ""
        table.add_row(
            mark,
            candidate.format,
            candidate.quant,
            str(candidate.layers_removed),
            candidate.vision_dtype or "-",
            candidate.kv_cache_dtype or "-",
            _placement_cell(candidate),
            _gib(m.weights_bytes),
            _gib(m.kv_cache_bytes),
            _gib(m.vision_bytes),
            _gib(m.overhead_bytes),
            _gib(m.total_bytes),
            _gib(m.host_bytes) if m.host_bytes else "-",
            "yes" if candidate.fits else "[red]no[/red]",
            f"{candidate.predicted_quality_loss:.2f}",
            f"{candidate.predicted_decode_tokens_per_s:.1f}" if candidate.predicted_decode_tokens_per_s else "-",
        )
    return table


def breakdown_table(candidate: Candidate) -> Table:
    """Every term of the chosen candidate's memory estimate (toolkit.plan.memory documents each)."""
    table = Table(title="Memory breakdown of the chosen candidate")
    table.add_column("term")
    table.add_column("MiB / value", justify="right")
    for key, value in candidate.memory.detail.items():
        shown = str(value) if key.startswith("param.") else f"{value / MIB:.1f}"
        table.add_row(escape(key), shown)
    table.add_row(
        "[bold]total (counted terms)[/bold]", f"[bold]{candidate.memory.total_bytes / MIB:.1f}[/bold]"
    )
    return table


def print_plan(plan: Plan, top: int, num_layers: int) -> None:
    """Rich output: header, candidates, the chosen breakdown and the reason."""
    console = Console()
    console.print(
        f"[bold]{escape(plan.model)}[/bold] on [bold]{escape(plan.profile)}[/bold]: context {plan.context_length}, "
        f"budget {_gib(plan.budget_bytes)} GiB, fp16 weights+vision {_gib(plan.fp16_bytes)} GiB"
    )
    console.print(candidates_table(plan, top, num_layers))
    if plan.chosen is not None:
        console.print(
            f"chosen KV cache {plan.chosen.kv_cache_dtype or '-'} on {escape(plan.chosen.runtime)}; placement: "
            f"{escape(placement_label(plan.chosen, num_layers))}"
        )
        console.print(breakdown_table(plan.chosen))
    if plan.compression is not None:
        console.print(compression_table(plan.compression))
        if not plan.compression.get("can_heal", True):
            console.print("[yellow]this host cannot hold healing: deploy compresses without it (the report says so)[/yellow]")
    console.print(
        ("[green]" if plan.fits else "[red]") + escape(plan.reason) + ("[/green]" if plan.fits else "[/red]")
    )
