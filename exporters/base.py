"""What every exporter shares: the result it returns, the error it raises, and the checks on its input.

An exporter turns one Hugging Face checkpoint folder into the files of one runtime (llama.cpp's GGUF,
ONNX Runtime's ONNX) and returns an `ExportResult`. It takes plain arguments (paths, strings, dicts)
and never imports `toolkit/`: the pipeline depends on exporters, not the other way round, so an
exporter can be run and tested on any folder.

Problems with the user's input (a missing config, a truncated weight file, an unknown scheme, a
missing llama.cpp converter) raise `ExportError` with a one-line message that names the problem and,
where there is one, the fix; the CLI prints it without a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RECORD_NAME = "export.json"
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


class ExportError(RuntimeError):
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


def checkpoint_sha256(model_dir: str | os.PathLike[str]) -> str:
    """A content hash of a checkpoint folder: sha256 over (relative path, sha256 of file) of every file.

    Sorted by path, hidden files skipped, so the same weights, config and tokenizer give the same hash
    wherever the folder lies. Reads every byte once (about 30 s for a 7B model in fp16).
    """
    folder = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        digest.update(relative.encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def staging_dir(out_dir: Path) -> Iterator[Path]:
    """A scratch folder inside `out_dir` (same file system, so finished files move by rename); removed after."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".bedside-export-", dir=out_dir))
    try:
        yield scratch
    finally:
        remove_tree(scratch)


def remove_tree(path: Path) -> None:
    """Delete a folder and everything in it (no error if it is already gone)."""
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir() and not child.is_symlink():
            child.rmdir()
        else:
            child.unlink()
    path.rmdir()


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, then rename over `path`.

    The one atomic file write of the project: a reader sees the old file or the new one, never half of
    one, and an interrupted write leaves no temporary behind. Mode 0644 like an ordinary write (mkstemp's
    own 0600 would hide reports and bundle files from the people who install them).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fchmod(stream.fileno(), 0o644)
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as indented JSON (with a final newline), atomically (write_text_atomic)."""
    write_text_atomic(path, json.dumps(value, indent=2) + "\n")


def write_record(out_dir: Path, record: dict[str, Any]) -> Path:
    """Write the export record as `<out_dir>/export.json` (atomically: temp file, then rename)."""
    path = out_dir / RECORD_NAME
    write_json_atomic(path, record)
    return path


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
