"""Command-line options that several `bedside` commands take with the same meaning, declared once."""

from typing import Annotated

import typer

KvCacheOption = Annotated[
    str | None,
    typer.Option(
        "--kv-cache", help="Pin llama.cpp's KV-cache precision (one of the profile's: f16, q8_0, q4_0)."
    ),
]
