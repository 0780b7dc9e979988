"""The GGUF header check before llama.cpp loads a file: toolkit.core.gguf_header's reader, its faults as RuntimeLoadError.

llama.cpp aborts or crashes on some truncated or corrupted files; reading the header first turns those into a
one-line RuntimeLoadError naming the file and what is wrong, before the native loader sees it.
"""

from __future__ import annotations

from pathlib import Path

from runtimes.results import RuntimeLoadError
from toolkit.core.gguf_header import GGUF_MAGIC, GGUFHeader, GgufHeaderError, truncated_data
from toolkit.core.gguf_header import read_gguf_header as _read_header

__all__ = ["GGUF_MAGIC", "GGUFHeader", "diagnose_gguf", "read_gguf_header"]


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """``toolkit.core.gguf_header.read_gguf_header``, raising RuntimeLoadError (same message) for a bad file."""
    try:
        return _read_header(path)
    except GgufHeaderError as error:
        raise RuntimeLoadError(str(error)) from None


def diagnose_gguf(path: str | Path) -> str:
    """One-line reason why llama.cpp may refuse `path` (called after a failed load)."""
    path = Path(path)
    try:
        header = read_gguf_header(path)
    except RuntimeLoadError as error:
        return str(error)
    truncated = truncated_data(path, header)
    if truncated is not None:
        return truncated
    if "tokenizer.ggml.tokens" not in header.keys:
        return f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.tokens in its metadata)"
    return (
        f"{path}: llama.cpp could not load this GGUF file (architecture {header.architecture!r}; "
        "unsupported architecture or corrupted tensor data)"
    )
