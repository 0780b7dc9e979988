"""`bedside export`: write a checkpoint as the files of one runtime (GGUF for llama.cpp, ONNX for ONNX Runtime).

`--model` is "demo", a Hugging Face checkpoint folder, or the output folder of `bedside compress`
(checkpoint/ + compression.json + imatrix.gguf). For a compress folder the checkpoint inside is exported,
its importance matrix guides GGUF rounding unless `--imatrix` names another, and the layers removed and the
sha256 of compression.json go into the artifact's metadata, so an export can be traced to its compression.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from exporters import export
from toolkit.compress.record import read_compression_record
from toolkit.core.errors import BedsideError
from toolkit.core.formats import resolve_scheme, vision_dtypes_for
from toolkit.core.hashing import file_sha256
from toolkit.core.output_dir import check_out_dir
from toolkit.core.records import COMPRESSION_RECORD
from toolkit.model.checkpoint import loadable_checkpoint

IMATRIX_NAME = "imatrix.gguf"


def register(app: typer.Typer) -> None:
    """Add the `export` command to the `bedside` app."""
    app.command("export")(export_command)


@dataclass
class ExportSource:
    """What to export: the checkpoint folder, the importance matrix to use, and metadata for the artifact."""

    checkpoint: Path
    imatrix: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    compression_record: Path | None = None


def resolve_source(model: str, format_name: str, imatrix: Path | None) -> ExportSource:
    """Resolve `--model` (demo, checkpoint folder or compress folder) and `--imatrix` into an ExportSource."""
    folder = Path(model).expanduser()
    if model != "demo" and folder.is_dir() and (folder / COMPRESSION_RECORD).is_file():
        record_path = folder / COMPRESSION_RECORD
        record = read_compression_record(folder)
        checkpoint = folder / "checkpoint"
        if not (checkpoint / "config.json").is_file():
            raise BedsideError(
                f"{folder}: compression.json but no checkpoint/config.json; run `bedside compress` again"
            )
        loadable_checkpoint(checkpoint)
        metadata: dict[str, Any] = {
            "layers_removed": list(record.layers_removed),
            "compression_sha256": file_sha256(record_path),
        }
        if record.plan:
            metadata["plan"] = record.plan
        chosen = imatrix
        if chosen is None and format_name == "gguf" and (folder / IMATRIX_NAME).is_file():
            chosen = folder / IMATRIX_NAME
        return ExportSource(
            checkpoint=checkpoint, imatrix=chosen, metadata=metadata, compression_record=record_path
        )
    return ExportSource(checkpoint=loadable_checkpoint(model), imatrix=imatrix)


def export_command(
    model: Annotated[
        str, typer.Option("--model", help="'demo', a checkpoint folder, or a `bedside compress` folder.")
    ],
    format_name: Annotated[str, typer.Option("--format", help="gguf or onnx.")],
    quant: Annotated[
        str,
        typer.Option(
            "--quant",
            help=(
                "GGUF: F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, IQ4_XS, Q3_K_M, IQ3_M, IQ3_XXS, Q2_K, IQ2_M "
                "(IQ3_XXS / IQ2_M need --imatrix where llama.cpp writes IQ2/IQ3_XXS tensors); "
                "ONNX: fp32, fp16, int8, int4, int4_b32, int4_b128."
            ),
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the artifact and export.json into.")],
    imatrix: Annotated[
        Path | None, typer.Option("--imatrix", help="llama.cpp importance matrix (GGUF only).")
    ] = None,
    vision_dtype: Annotated[
        str | None,
        typer.Option(
            "--vision-dtype",
            help="A LLaVA's vision tower + projector: GGUF mmproj f16 (default) or q8_0; ONNX keeps its graph's float.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the export record as JSON.")] = False,
) -> None:
    """Export MODEL to FORMAT in scheme QUANT, writing OUT/<model file> and OUT/export.json."""

    fmt, scheme = resolve_scheme(format_name, quant)
    check_out_dir(out)  # an existing file or a path under one: refused before any work
    if imatrix is not None and fmt != "gguf":
        raise BedsideError("--imatrix applies to --format gguf only (llama.cpp's quantizer uses it)")
    if vision_dtype is not None and vision_dtype not in vision_dtypes_for(fmt, scheme):
        raise BedsideError(
            f"--vision-dtype {vision_dtype}: a {fmt} {scheme} export writes the vision tower in "
            f"{' or '.join(vision_dtypes_for(fmt, scheme))}"
        )
    if imatrix is not None and not imatrix.is_file():
        raise BedsideError(f"importance matrix '{imatrix}' not found: pass a llama-imatrix GGUF file")
    source = resolve_source(model, fmt, imatrix)
    console = Console(stderr=True)
    with console.status(f"exporting {source.checkpoint} to {fmt} {scheme} ..."):
        result = export(
            source.checkpoint,
            fmt,
            scheme,
            out,
            imatrix=source.imatrix if fmt == "gguf" else None,
            metadata=source.metadata or None,
            **({"vision_dtype": vision_dtype} if vision_dtype is not None else {}),
        )
    if as_json:
        typer.echo(json.dumps(result.record, indent=2, default=str))
        return
    table = Table(title=f"{fmt} {scheme} export of {source.checkpoint}")
    table.add_column("file")
    table.add_column("MiB", justify="right")
    for name, size in result.sizes.items():
        table.add_row(name, f"{size / 1024**2:,.1f}")
    Console().print(table)
    notes = []
    if source.imatrix is not None and fmt == "gguf":
        notes.append(f"importance matrix: {source.imatrix}")
    if source.compression_record is not None:
        notes.append(f"compression record: {source.compression_record}")
    for note in notes:
        Console().print(note)
    Console().print(f"model file: {result.model_file}")
