"""Command-line options that several `bedside` commands take with the same meaning, declared once."""

from typing import Annotated

import typer

KvCacheOption = Annotated[
    str | None,
    typer.Option(
        "--kv-cache", help="Pin llama.cpp's KV-cache precision (one of the profile's: f16, q8_0, q4_0)."
    ),
]
FormatOption = Annotated[str | None, typer.Option("--format", help="Pin the export format (gguf, onnx).")]
QuantOption = Annotated[str | None, typer.Option("--quant", help="Pin the quantization scheme (e.g. Q4_K_M).")]
PruneLayersOption = Annotated[
    int | None, typer.Option("--prune-layers", help="Pin the number of decoder layers to remove.")
]
