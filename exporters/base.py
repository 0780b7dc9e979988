"""What every exporter shares: the result it returns, the error it raises, and the checks on its input.

An exporter turns one Hugging Face checkpoint folder into the files of one runtime (llama.cpp's GGUF,
ONNX Runtime's ONNX) and returns an `ExportResult`. It takes plain arguments (paths, strings, dicts)
and imports only `toolkit.core`: the pipeline depends on exporters, not the other way round, so an
exporter can be run and tested on any folder.

Problems with the user's input (a missing config, a truncated weight file, an unknown scheme, a
missing llama.cpp converter) raise `ExportError` with a one-line message that names the problem and,
where there is one, the fix; the CLI prints it without a traceback.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.core.atomic import remove_tree, staging_dir, write_json_atomic
from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.errors import BedsideError
from toolkit.core.records import EXPORT_RECORD

__all__ = ["remove_tree", "staging_dir"]  # re-exported for the exporters

RECORD_NAME = EXPORT_RECORD
RECORD_SCHEMA_VERSION = 1

# Files a tokenizer may consist of; at least one of the first three must exist for a text model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class ExportError(BedsideError):
    """An export that cannot be done as asked; the message is one line saying what and why."""


@dataclass
class ExportResult:
    """What an export wrote.

    Attributes:
        files: every file written (the model file first), absolute paths.
        format: "gguf" or "onnx".
        quant: the scheme name as given (e.g. "Q4_K_M", "int4_b32").
        sizes: bytes per file name (relative to the output folder).
        record: the JSON-serialisable export record, also written to `<out_dir>/export.json`.
    """

    files: list[Path]
    format: str
    quant: str
    sizes: dict[str, int] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def model_file(self) -> Path:
        """The file a runtime loads (the GGUF, or model.onnx)."""
        return self.files[0]

    @property
    def total_bytes(self) -> int:
        """Bytes of every file written, tokenizer and record included."""
        return sum(self.sizes.values())


def check_checkpoint(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate a Hugging Face checkpoint folder before spending minutes on it; return its config.

    Checks: the folder exists; config.json parses and names a model_type; weights exist
    (*.safetensors or pytorch_model*.bin) and every safetensors file is complete (its header parses
    and the file is exactly as long as the header says: a truncated download is caught here, not
    deep inside a converter); a tokenizer is present.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ExportError(f"model folder {folder} does not exist or is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ExportError(f"{config_path} names no model_type: not a transformers model config")
    try:
        refuse_custom_code(folder)  # converters would import the folder's own code
    except BedsideError as error:
        raise ExportError(str(error)) from None
    safetensors = sorted(folder.glob("*.safetensors"))
    if not safetensors and not sorted(folder.glob("pytorch_model*.bin")):
        raise ExportError(f"{folder} has no weights (*.safetensors or pytorch_model*.bin)")
    for path in safetensors:
        check_safetensors_file(path)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ExportError(f"{folder} has no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return config


def check_safetensors_file(path: Path) -> None:
    """Raise ExportError unless `path` is a complete safetensors file (header + every tensor's bytes)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_length,) = struct.unpack("<Q", raw_length)
            if header_length > min(size - 8, 100 << 20):
                raise ValueError(f"header length {header_length} exceeds the file")
            header = json.loads(handle.read(header_length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path} is not a valid safetensors file ({error})") from None
    expected = 8 + header_length + max(ends, default=0)
    if size != expected:
        raise ExportError(
            f"{path} is truncated or corrupted: {size} bytes on disk, the header describes {expected}"
        )


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """Write the export record as `<out_dir>/export.json` (atomically: temp file, then rename).

    The exporter that made the files is the one writer of export.json; nothing rewrites it afterwards
    (a deploy keeps what it adds in its own records). `record["file"]` names the file a runtime loads.
    """
    path = out_dir / RECORD_NAME
    write_json_atomic(path, record)
    return path


def read_record(out_dir: Path) -> dict[str, Any]:
    """The export record `<out_dir>/export.json` as `write_record` wrote it."""
    return json.loads((Path(out_dir) / RECORD_NAME).read_text(encoding="utf-8"))


def normalise_metadata(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """The caller's metadata as JSON-compatible values (Paths to str), rejecting what JSON cannot hold."""
    if not metadata:
        return {}
    try:
        return json.loads(json.dumps(metadata, default=_json_default))
    except (TypeError, ValueError) as error:
        raise ExportError(f"export metadata is not JSON-serialisable ({error})") from None


def _json_default(value: object) -> object:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "model_dump"):  # pydantic models (plans, records)
        return value.model_dump(mode="json")
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
