"""`bedside inspect MODEL`: what a model is made of, from its config.json alone (no weights read).

The first question before planning a compression: where do the parameters sit (embeddings,
decoder layers, lm_head, vision tower, projector) and what shape is the attention (KV heads,
head dim) that sets the KV-cache size.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from toolkit.model.facts import ModelFacts, read_facts


def register(app: typer.Typer) -> None:
    """Add the `inspect` command to the `bedside` app."""
    app.command("inspect")(inspect_model)


def inspect_model(
    model: Annotated[
        str, typer.Argument(help="'demo' or a local Hugging Face checkpoint folder (config.json is enough).")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the facts as JSON instead of tables.")
    ] = False,
) -> None:
    """Show a model's parameters per component and its shape, read from config.json only."""
    facts = read_facts(model)
    if as_json:
        typer.echo(json.dumps(facts.to_dict(), indent=2))
        return
    console = Console()
    console.print(parameter_table(facts))
    console.print(shape_table(facts))


def _approx(n: int) -> str:
    """7.06 B, 131.3 M: the reading size beside the exact count."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.{2 if unit == 'B' else 1}f} {unit}"
    return str(n)


def parameter_table(facts: ModelFacts) -> Table:
    """Parameters per component; rows without a share are part of another row, shown for scale."""
    total = facts.total_params
    table = Table(title=f"{facts.architecture} ({facts.family}): parameters")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("≈", justify="right")
    table.add_column("share", justify="right")
    table.add_column("note", style="dim")

    def row(name: str, n: int, note: str = "", share: bool = True) -> None:
        percent = f"{100 * n / total:.1f} %" if share and total else ""
        table.add_row(name, f"{n:,}", _approx(n), percent, note)

    components = facts.components()
    row("embeddings", components["embeddings"], "token_embd")
    row("one decoder layer", facts.layer_params, "", share=False)
    row(f"decoder layers x{facts.num_layers}", components["decoder_layers"])
    row("lm_head", components["lm_head"], "tied" if facts.tie_word_embeddings else "output")
    row("final norm", components["final_norm"], "output_norm")
    row("norms (all)", facts.norm_params, "in rows above", share=False)
    if facts.vision is not None:
        vision = facts.vision
        row(
            f"vision tower x{vision.num_layers}",
            components["vision_tower"],
            f"{vision.layers_used} layers used",
        )
        row("  unused by LLaVA", vision.unused_params, "in vision tower", share=False)
        row("projector", components["projector"], vision.projector_hidden_act)
    table.add_row(
        "total", f"{total:,}", _approx(total), "100 %", f"{facts.tensor_count} tensors", style="bold"
    )
    return table


def shape_table(facts: ModelFacts) -> Table:
    """The shape facts planning reads: depth, widths, attention layout, vocabulary, image tokens."""
    table = Table(title="shape")
    table.add_column("fact")
    table.add_column("value", justify="right")
    rows: list[tuple[str, object]] = [
        ("layers", facts.num_layers),
        ("hidden size", facts.hidden_size),
        ("intermediate size", facts.intermediate_size),
        ("attention heads", facts.num_heads),
        ("KV heads", facts.num_kv_heads),
        ("head dim", facts.head_dim),
        ("vocab", facts.vocab_size),
        ("tied embeddings", "yes" if facts.tie_word_embeddings else "no"),
        ("max positions", facts.max_position_embeddings),
        ("KV cache per token (f16)", f"{facts.kv_bytes_per_token(2) / 1024:,.1f} KiB"),
        ("decoder layers at", facts.layers_path),
    ]
    if facts.vision is not None:
        vision = facts.vision
        rows += [
            ("image size / patch", f"{vision.image_size} / {vision.patch_size}"),
            ("image tokens per image", vision.image_tokens_per_image),
        ]
    for name, value in rows:
        table.add_row(
            name, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        )
    return table
