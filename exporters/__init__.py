"""Exporters: turn a Hugging Face checkpoint folder into the files of one runtime.

Registry `EXPORTERS` maps a format name to a function with the common signature

    export(model_dir, quant, out_dir, *, imatrix=None, metadata=None, **options) -> ExportResult

and `export(model_dir, format, quant, out_dir, ...)` dispatches on it. Adding a format is one module and
one line here. Exporters take plain arguments and import only `toolkit.core` (the pipeline depends on them).
Heavy libraries (llama_cpp, optimum, onnxruntime) are imported inside the functions that use them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from exporters.base import ExportError, ExportResult
from exporters.gguf_exporter import export_gguf
from exporters.onnx_exporter import export_onnx
from toolkit.core.formats import FORMATS

Exporter = Callable[..., ExportResult]

EXPORTERS: dict[str, Exporter] = {
    "gguf": export_gguf,
    "onnx": export_onnx,
}

# Scheme names per format: the one table in toolkit/core/formats.py.
SCHEMES = FORMATS


def export(
    model_dir: str | os.PathLike[str],
    format: str,  # noqa: A002 - the CLI's word for it
    quant: str,
    out_dir: str | os.PathLike[str],
    *,
    imatrix: str | os.PathLike[str] | None = None,
    metadata: dict[str, Any] | None = None,
    **options: Any,
) -> ExportResult:
    """Export `model_dir` to `format` ("gguf" or "onnx") in scheme `quant`, writing into `out_dir`.

    `options` go to the format's exporter (e.g. `threads` for GGUF; `symmetric`, `block_size`,
    `lm_head` for ONNX). Raises ExportError for an unknown format or scheme and for bad input.
    """
    if format not in EXPORTERS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(EXPORTERS)}")
    return EXPORTERS[format](model_dir, quant, out_dir, imatrix=imatrix, metadata=metadata, **options)


__all__ = ["EXPORTERS", "SCHEMES", "ExportError", "ExportResult", "export", "export_gguf", "export_onnx"]
