"""Every sha256 a record carries: of a file, a checkpoint folder, its weights, a JSON value, token ids.

All are hex digests. Folder hashes are over sorted relative paths, so the same content gives the
same hash wherever the folder lies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.errors import BedsideError

WEIGHT_SUFFIXES = (".safetensors",)


def file_sha256(path: Path, chunk_size: int = 1 << 22) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sha256(model_dir: str | os.PathLike[str]) -> str:
    """sha256 over (relative path, sha256 of file) of every file of a folder, hidden files skipped.

    `sha256( join_sorted(relpath + "\\0" + file_sha256 + "\\n") )`. Reads every byte once (about
    30 s for a 7B model in fp16).
    """
    folder = Path(model_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        digest.update(relative.encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files (`*.safetensors`), sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES)


def weights_sha256(folder: Path) -> str:
    """sha256 over the names and bytes of a checkpoint's `*.safetensors` files only, in name order.

    The compress stage cache's identity of the weights: config and tokenizer do not count (unlike
    `checkpoint_sha256`). Raises BedsideError when the folder holds no weights.
    """
    files = weight_files(folder)
    if not files:
        raise BedsideError(f"checkpoint folder '{folder}' has no *.safetensors weights")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode("utf-8") + b"\x00")
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys, no spaces, str() for other types)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_ids_sha256(*arrays: Any) -> str:
    """sha256 over the shape and little-endian int64 bytes of each token-id array (None: a marker).

    Takes numpy arrays or CPU torch tensors (anything `numpy.asarray` reads).
    """
    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none")
            continue
        values = np.ascontiguousarray(np.asarray(array), dtype="<i8")
        digest.update(repr(tuple(values.shape)).encode())
        digest.update(values.tobytes())
    return digest.hexdigest()
