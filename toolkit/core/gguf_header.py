"""The GGUF header (metadata and tensor table), read in Python with bounds, so a bad file gets a one-line error.

llama.cpp aborts or crashes on some truncated or corrupted files; reading the header here first turns those
into GgufHeaderError naming the file and what is wrong, before the native loader sees it. It is also how the
exporters and the planner read a GGUF's metadata and tensor table: gguf-py's ``GGUFReader`` builds numpy views of
every vocabulary string, where this reader skips long arrays (a tenth of the time on the demo model: docs/BENCHMARKS.md,
"Test-suite time"). tests/test_gguf_header.py holds the two equal.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from toolkit.core.errors import BedsideError

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what llama.cpp reads (version 1 had 32-bit counts and is refused there too)
GGML_MAX_DIMS = 4
# GGUF metadata value types: id -> (name, struct format); 8 (string) and 9 (array) are variable-sized.
_SCALAR_TYPES = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<?"),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {**{i: name for i, (name, _) in _SCALAR_TYPES.items()}, _STRING: "string", _ARRAY: "array"}
# Bounds no GGUF writer comes near: beyond them a count or length is corrupted, not cut off.
MAX_COUNT = 1 << 24  # metadata keys or tensors (real files: tens of keys, hundreds of tensors)
MAX_ARRAY_ITEMS = 1 << 26  # items of one metadata array (a 256k-token vocabulary is 1 << 18)
MAX_STRING_BYTES = 1 << 30  # one string (chat templates are kilobytes)
# Arrays of scalars up to this many items are read into `GGUFHeader.values` (per-layer settings such as
# `<arch>.attention.sliding_window_pattern`); longer ones (vocabulary scores and types) are skipped.
SMALL_ARRAY_ITEMS = 4096


class GgufHeaderError(BedsideError):
    """A file that is not GGUF, or whose header is cut off or corrupted: one line naming the file and the fault."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table: ``shape`` in ggml order (``ne0``, the row width, first), as gguf-py gives it."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    type_name: str  # GGMLQuantizationType's name ("Q4_0", "F16"...), or "type N" for a type newer than gguf-py
    offset: int  # from the start of the data section
    n_bytes: int | None  # None for a type newer than gguf-py


@dataclass
class GGUFHeader:
    """What the header of a GGUF file says (metadata, tensor table), read without loading tensors."""

    version: int
    architecture: str | None
    alignment: int
    n_tensors: int
    data_offset: int
    data_bytes_needed: int | None  # end of the last tensor's data; None if a tensor type is unknown
    keys: set[str] = field(default_factory=set)
    # key -> value: scalars, strings and arrays of at most SMALL_ARRAY_ITEMS scalars (as lists); other arrays absent
    values: dict[str, Any] = field(default_factory=dict)
    tensors: list[GGUFTensorInfo] = field(default_factory=list)


class _Truncated(Exception):
    """The file ends inside the header (a cut-off download or copy)."""


class _Corrupted(Exception):
    """The header holds something no GGUF writer produces; the message says what."""


class _HeaderReader:
    """Reads the header fields, checking every length against the bytes the file has left."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    @property
    def left(self) -> int:
        return self.size - self.handle.tell()

    def need(self, count: int, what: str, plausible: bool = True) -> None:
        """Raise unless `count` more bytes exist: corrupted when the length itself is implausible, else cut off."""
        if count <= self.left:
            return
        if not plausible:
            raise _Corrupted(
                f"{what} runs past the end of the file ({count:,} bytes needed, {self.left:,} left)"
            )
        raise _Truncated(f"{what} needs {count:,} bytes, {self.left:,} left")

    def read(self, count: int, what: str) -> bytes:
        self.need(count, what)
        return self.handle.read(count)

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("<Q", what)
        self.need(length, f"{what}: string length {length:,}", length <= MAX_STRING_BYTES)
        return self.handle.read(length).decode("utf-8", errors="replace")

    def value(self, value_type: int, what: str) -> Any:
        """Read a scalar, string or short array of scalars (returned; a list), or skip another array (None)."""
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type, count = self.unpack("<IQ", what)
            plausible = count <= MAX_ARRAY_ITEMS
            if item_type in _SCALAR_TYPES:
                name, fmt = _SCALAR_TYPES[item_type]
                self.need(
                    struct.calcsize(fmt) * count, f"{what}: array of {count:,} {name} values", plausible
                )
                if count <= SMALL_ARRAY_ITEMS:
                    return list(struct.unpack(f"<{count}{fmt[1:]}", self.handle.read(struct.calcsize(fmt) * count)))
                self.handle.seek(struct.calcsize(fmt) * count, 1)
            elif item_type in (_STRING, _ARRAY):
                self.need(count * 8, f"{what}: array of {count:,} {_TYPE_NAMES[item_type]} values", plausible)
                for index in range(count):
                    self.value(item_type, f"{what}[{index}]")
            else:
                raise _Corrupted(f"{what}: array of unknown value type {item_type} (known: 0-12)")
            return None
        if value_type not in _SCALAR_TYPES:
            raise _Corrupted(f"{what}: unknown value type {value_type} (known: 0-12)")
        return self.unpack(_SCALAR_TYPES[value_type][1], what)[0]


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF header (metadata keys, tensor table) in well under a second, tensors untouched.

    Raises GgufHeaderError naming the file and what is wrong: not GGUF, cut off inside the header
    ("truncated inside the GGUF header"), or a field no writer produces ("corrupted GGUF header: ...",
    naming the metadata key or tensor and the value).
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise GgufHeaderError(
                f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})"
            )
        reader = _HeaderReader(handle, size)
        try:
            version, n_tensors, n_kv = reader.unpack("<IQQ", "version and counts")
            if version not in GGUF_VERSIONS:
                raise _Corrupted(
                    f"version {version} (llama.cpp reads versions {', '.join(map(str, GGUF_VERSIONS))})"
                )
            for count, what in ((n_kv, "metadata keys"), (n_tensors, "tensors")):
                if count > MAX_COUNT:
                    raise _Corrupted(f"{count:,} {what} (no GGUF writer makes more than {MAX_COUNT:,})")
            architecture, alignment, keys = None, 32, set()
            values: dict[str, Any] = {}
            for index in range(1, n_kv + 1):
                where = f"metadata key {index} of {n_kv:,}"
                key = reader.string(where)
                where = f"{where} '{key}'"
                (value_type,) = reader.unpack("<I", where)
                value = reader.value(value_type, where)
                keys.add(key)
                if value is not None:
                    values[key] = value
                if key == "general.architecture":
                    architecture = value
                elif key == "general.alignment":
                    if (
                        isinstance(value, bool)
                        or not isinstance(value, int)
                        or value <= 0
                        or value & (value - 1)
                    ):
                        raise _Corrupted(f"general.alignment {value!r} is not a power of two")
                    alignment = value
            data_end: int | None = 0
            tensors: list[GGUFTensorInfo] = []
            for index in range(1, n_tensors + 1):
                where = f"tensor {index} of {n_tensors:,}"
                name = reader.string(where)
                where = f"{where} '{name}'"
                (n_dims,) = reader.unpack("<I", where)
                if not 1 <= n_dims <= GGML_MAX_DIMS:
                    raise _Corrupted(f"{where}: {n_dims:,} dimensions (GGUF allows 1 to {GGML_MAX_DIMS})")
                dims = reader.unpack(f"<{n_dims}Q", where)
                tensor_type, offset = reader.unpack("<IQ", where)
                if offset % alignment:
                    raise _Corrupted(
                        f"{where}: data offset {offset:,} is not a multiple of the alignment {alignment}"
                    )
                try:
                    known = GGMLQuantizationType(tensor_type)
                    block, type_size = GGML_QUANT_SIZES[known]
                except (ValueError, KeyError):
                    data_end = None  # a type newer than this gguf package: its size is unknown
                    tensors.append(GGUFTensorInfo(name, tuple(dims), tensor_type, f"type {tensor_type}", offset, None))
                    continue
                if dims[0] % block:
                    raise _Corrupted(
                        f"{where}: first dimension {dims[0]:,} is not a multiple of its type's block of {block}"
                    )
                elements = 1
                for dim in dims:
                    elements *= dim
                n_bytes = elements // block * type_size
                tensors.append(GGUFTensorInfo(name, tuple(dims), tensor_type, known.name, offset, n_bytes))
                if data_end is not None:
                    data_end = max(data_end, offset + n_bytes)
        except _Truncated as error:
            raise GgufHeaderError(
                f"{path}: truncated inside the GGUF header ({size:,} bytes; {error}): copy or export it again"
            ) from None
        except _Corrupted as error:
            raise GgufHeaderError(f"{path}: corrupted GGUF header: {error}") from None
        position = handle.tell()
    data_offset = (position + alignment - 1) // alignment * alignment
    return GGUFHeader(
        version=version,
        architecture=architecture,
        alignment=alignment,
        n_tensors=n_tensors,
        data_offset=data_offset,
        data_bytes_needed=None if data_end is None else data_offset + data_end,
        keys=keys,
        values=values,
        tensors=tensors,
    )


def truncated_data(path: str | Path, header: GGUFHeader) -> str | None:
    """'<path>: truncated GGUF file (N bytes, its tensors need M)' when the file ends before its tensor data does."""
    size = Path(path).stat().st_size
    if header.data_bytes_needed is not None and size < header.data_bytes_needed:
        return f"{path}: truncated GGUF file ({size:,} bytes, its tensors need {header.data_bytes_needed:,})"
    return None
