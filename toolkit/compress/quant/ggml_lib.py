"""libggml's own quantizer and dequantizer through ctypes: exactly the rounding llama.cpp writes, every ggml type.

What it emulates: nothing; it calls the code llama.cpp's quantizer calls. ``llama_model_quantize`` stores each
tensor with ``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` (src/llama-quant.cpp,
``llama_tensor_quantize_impl``) and a runtime reads it back with ``ggml_get_type_traits(type)->to_float``; so

    quantize_dequantize(W, T, imatrix) = to_float_T(ggml_quantize_chunk(T, W, imatrix))

row by row, where ``imatrix`` is one non-negative weight per input column (llama.cpp's importance matrix
``in_sum2 / counts`` of that tensor) or absent. The library is ``libggml-base.so`` shipped in the llama_cpp
wheel (``<llama_cpp package>/lib``), the same file ``llama_model_quantize`` links, found from the installed
package, never a fixed path. Type numbers and block sizes come from gguf-py (``gguf.constants``), which mirrors
ggml.h; ``ggml_type_traits`` is declared as in ggml.h of the llama-cpp-python 0.3.36 sdist
(vendor/llama.cpp/ggml/include/ggml.h)::

    struct ggml_type_traits { const char * type_name; int64_t blck_size; int64_t blck_size_interleave;
                              size_t type_size; bool is_quantized; ggml_to_float_t to_float;
                              ggml_from_float_t from_float_ref; };

Guards, because libggml aborts the whole process (GGML_ASSERT) where Python should raise: a row must hold whole
blocks, values must be finite, and a type llama.cpp refuses to write without an importance matrix needs one
(``IMATRIX_REQUIRED``: llama-quant.cpp ``tensor_requires_imatrix``; libggml itself asserts only for IQ2_XXS,
IQ2_XS and IQ1_S, ``ggml_quantize_requires_imatrix``). Every quantized row is checked with
``ggml_validate_row_data``, as llama.cpp does before writing.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from toolkit.compress.quant.base import BlockShapeError, QuantGrid, QuantizedWeight
from toolkit.core.errors import BedsideError

LIBRARY_NAME = "libggml-base.so"

# ggml_quantize_chunk's switch (ggml/src/ggml.c); other types (Q8_1, Q8_K, integer types) abort in libggml.
QUANTIZABLE_TYPES: frozenset[str] = frozenset(
    {
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
        "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS", "TQ1_0",
        "TQ2_0", "MXFP4", "NVFP4", "Q1_0",
    }
)  # fmt: skip

# Types llama.cpp will not write without an importance matrix (src/llama-quant.cpp, tensor_requires_imatrix;
# Q2_K only inside a Q2_K_S file, which Bedside does not offer). A superset of ggml_quantize_requires_imatrix.
IMATRIX_REQUIRED: frozenset[str] = frozenset({"IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"})

# Inputs that share one scale (the clipping group of QuantGrid.clip): the sub-block of each super-block.
SCALE_GROUP: dict[str, int] = {
    "Q2_K": 16, "Q3_K": 16, "Q4_K": 32, "Q5_K": 32, "Q6_K": 16,
    "IQ4_XS": 32, "IQ3_S": 32, "IQ3_XXS": 32, "IQ2_XXS": 32, "IQ2_XS": 16, "IQ2_S": 16, "IQ1_S": 32, "IQ1_M": 16,
}  # fmt: skip

# Types whose blocks store a minimum besides the scale (value = d*q - m): asymmetric grids.
_WITH_MIN: frozenset[str] = frozenset({"Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K"})

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def library_path() -> Path:
    """``libggml-base.so`` inside the installed llama_cpp package; BedsideError when it is not there."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise BedsideError(
            "llama-cpp-python is not installed (libggml's quantizer ships in it): run `make setup`"
        )
    path = Path(spec.origin).parent / "lib" / LIBRARY_NAME
    if not path.is_file():
        raise BedsideError(
            f"{LIBRARY_NAME} not found in {path.parent}: reinstall llama-cpp-python (`make setup`)"
        )
    return path


@functools.cache
def _library() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p,
    ]  # fmt: skip
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


def type_number(type_name: str) -> int:
    """ggml's enum value of a type (gguf.constants.GGMLQuantizationType); BedsideError for a type libggml cannot
    quantize."""
    key = type_name.upper()
    if key not in QUANTIZABLE_TYPES or key not in GGMLQuantizationType.__members__:
        known = ", ".join(sorted(t for t in QUANTIZABLE_TYPES if t in GGMLQuantizationType.__members__))
        raise BedsideError(f"libggml cannot quantize to {type_name!r}; types: {known}")
    return int(GGMLQuantizationType[key])


def block_layout(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a type (gguf.constants.GGML_QUANT_SIZES)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(type_number(type_name))]


def requires_imatrix(type_name: str) -> bool:
    """Whether llama.cpp writes this type only with an importance matrix (see IMATRIX_REQUIRED)."""
    return type_name.upper() in IMATRIX_REQUIRED


@functools.cache
def _to_float(number: int) -> Any:
    traits = _library().ggml_get_type_traits(number).contents
    if not traits.to_float:
        return None  # F32: stored as is
    return _TO_FLOAT(traits.to_float)


def _check_rows(weights: np.ndarray, type_name: str) -> tuple[int, int, int]:
    """(type number, block, bytes per block) after checking shape and values; BedsideError otherwise."""
    number = type_number(type_name)
    block, type_size = block_layout(type_name)
    if weights.ndim != 2:
        raise BlockShapeError(
            f"libggml {type_name} quantizes 2-D [rows, n_per_row] arrays, got {weights.shape}"
        )
    if weights.shape[1] % block:
        raise BlockShapeError(
            f"libggml {type_name} needs rows of whole {block}-blocks, got rows of {weights.shape[1]} "
            f"(llama.cpp falls back to another type for such rows: toolkit.model.storage_types.gguf_fallback)"
        )
    if not np.isfinite(weights).all():
        raise BedsideError(f"libggml {type_name}: the weights hold NaN or infinite values")
    return number, block, type_size


def _check_imatrix(imatrix: np.ndarray | None, type_name: str, n_per_row: int) -> np.ndarray | None:
    if imatrix is None:
        if requires_imatrix(type_name):
            raise BedsideError(
                f"ggml type {type_name} needs an importance matrix (llama.cpp refuses to write it without one): "
                "pass imatrix= (the tensor's mean squared input per column, as llama-imatrix gathers it)"
            )
        return None
    values = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32).reshape(-1))
    if values.size != n_per_row:
        raise BedsideError(
            f"importance matrix of {values.size} values for rows of {n_per_row} (one value per input column)"
        )
    if not np.isfinite(values).all() or (values < 0).any():
        raise BedsideError("importance matrix values must be finite and non-negative")
    return values


def quantize_rows(
    weights: np.ndarray, type_name: str, imatrix: np.ndarray | None = None, threads: int = 1
) -> np.ndarray:
    """ggml blocks of a [rows, n_per_row] float32 array: uint8 [rows, n_per_row / block * type_size].

    ``imatrix``: one weight per column (float32, length n_per_row), shared by every row, as llama.cpp passes
    it per tensor. ``threads`` > 1 splits the rows into chunks quantized concurrently (ctypes releases the GIL;
    each row is quantized independently, so the bytes do not depend on the split).
    """
    source = np.ascontiguousarray(weights, dtype=np.float32)
    number, block, type_size = _check_rows(source, type_name)
    rows, n_per_row = source.shape
    matrix = _check_imatrix(imatrix, type_name, n_per_row)
    row_bytes = n_per_row // block * type_size
    blocks = np.empty((rows, row_bytes), dtype=np.uint8)
    if rows == 0:
        return blocks
    lib = _library()
    lib.ggml_quantize_init(number)  # once, before any thread: allocates the IQ lattices
    matrix_pointer = None if matrix is None else matrix.ctypes.data

    def run(first: int, last: int) -> int:
        return int(
            lib.ggml_quantize_chunk(
                number, source[first:last].ctypes.data, blocks[first:last].ctypes.data, 0, last - first,
                n_per_row, matrix_pointer,
            )
        )  # fmt: skip

    chunks = max(1, min(int(threads), rows))
    bounds = np.linspace(0, rows, chunks + 1).astype(int)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    if len(spans) == 1:
        written = run(*spans[0])
    else:
        with ThreadPoolExecutor(max_workers=len(spans)) as pool:
            written = sum(pool.map(lambda span: run(*span), spans))
    if written != blocks.nbytes:
        raise BedsideError(f"libggml {type_name} wrote {written} bytes, expected {blocks.nbytes}")
    if not lib.ggml_validate_row_data(number, blocks.ctypes.data, blocks.nbytes):
        raise BedsideError(f"libggml {type_name}: the quantized rows fail ggml_validate_row_data")
    return blocks


def dequantize_rows(blocks: np.ndarray, type_name: str, n_per_row: int) -> np.ndarray:
    """float32 [rows, n_per_row] from ggml blocks (``ggml_get_type_traits(type)->to_float``)."""
    number = type_number(type_name)
    block, type_size = block_layout(type_name)
    if n_per_row % block:
        raise BlockShapeError(f"libggml {type_name} needs rows of whole {block}-blocks, got {n_per_row}")
    data = np.ascontiguousarray(blocks, dtype=np.uint8)
    row_bytes = n_per_row // block * type_size
    if data.ndim != 2 or data.shape[1] != row_bytes:
        raise BedsideError(
            f"{type_name} rows of {n_per_row} take {row_bytes} bytes each, got an array of shape {data.shape}"
        )
    rows = data.shape[0]
    to_float = _to_float(number)
    if to_float is None:
        return data.view(np.float32).reshape(rows, n_per_row).copy()
    values = np.empty((rows, n_per_row), dtype=np.float32)
    if rows:
        to_float(data.ctypes.data, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * n_per_row)
    return values


def quantize_dequantize(
    weights: np.ndarray, type_name: str, imatrix: np.ndarray | None = None, threads: int = 1
) -> np.ndarray:
    """The float32 weights a llama.cpp file of this type holds for ``weights`` (quantize, then to_float)."""
    source = np.ascontiguousarray(weights, dtype=np.float32)
    blocks = quantize_rows(source, type_name, imatrix, threads)
    return dequantize_rows(blocks, type_name, source.shape[1])


def _nominal_bits(type_name: str) -> int:
    """Bits of a code as the type's name says (IQ4_XS -> 4, TQ1_0 -> 1, BF16 -> 16)."""
    match = re.search(r"\d+", type_name)
    return int(match.group()) if match else 8


class LibggmlGrid(QuantGrid):
    """A ggml type rounded by libggml itself (module docstring): ``fake_quantize`` is what llama.cpp writes.

    ``LibggmlGrid("IQ4_XS")`` rounds without an importance matrix; ``LibggmlGrid("IQ2_S", imatrix=v)`` (or
    ``grid.with_imatrix(v)``) rounds with the per-column weights ``v`` of one tensor, as llama.cpp does with
    the importance matrix of that tensor. A type in IMATRIX_REQUIRED raises BedsideError without one.

    There is no integer-code view (IQ types store indices into lattice codebooks): ``quantize()`` raises; use
    ``fake_quantize()`` for the weights, ``quantize_rows()`` for the stored bytes.
    """

    imatrix: np.ndarray | None
    threads: int

    def __init__(
        self, type_name: str, imatrix: np.ndarray | torch.Tensor | None = None, threads: int = 1
    ) -> None:
        key = type_name.upper()
        block, type_size = block_layout(key)
        matrix = None
        if imatrix is not None:
            values = imatrix.detach().cpu().numpy() if isinstance(imatrix, torch.Tensor) else imatrix
            matrix = np.array(values, dtype=np.float32).reshape(-1)
            matrix.setflags(write=False)
        for name, value in (
            ("name", key),
            ("bits", _nominal_bits(key)),
            ("group_size", SCALE_GROUP.get(key, block)),
            ("symmetric", key not in _WITH_MIN),
            ("bits_per_weight", 8 * type_size / block),
            ("row_multiple", block),
            ("imatrix", matrix),
            ("threads", max(1, int(threads))),
        ):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        matrix = "None" if self.imatrix is None else f"<{self.imatrix.size} values>"
        return f"LibggmlGrid({self.name!r}, imatrix={matrix})"

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    @property
    def requires_imatrix(self) -> bool:
        """Whether llama.cpp writes this type only with an importance matrix."""
        return requires_imatrix(self.name)

    def with_imatrix(self, imatrix: np.ndarray | torch.Tensor | None) -> LibggmlGrid:
        """The same type rounded with another importance matrix (one value per input column)."""
        return LibggmlGrid(self.name, imatrix, self.threads)

    def fake_quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """libggml's round trip of a ``[out, in]`` weight (clipped first, see QuantGrid.clip), in its dtype."""
        prepared = self._prepare(weight, clip_ratio)
        values = quantize_dequantize(prepared.cpu().numpy(), self.name, self.imatrix, self.threads)
        return torch.from_numpy(values).to(device=weight.device, dtype=weight.dtype)

    def _quantize_float32(self, weight: torch.Tensor, in_features: int) -> QuantizedWeight:
        raise BedsideError(
            f"grid {self.name} (libggml) has no integer-code view: use fake_quantize(), or "
            "toolkit.compress.quant.ggml_lib.quantize_rows() for the stored bytes"
        )


# Registered grids: the types llama.cpp's file types write that have no torch emulation (grids.py).
LIBGGML_GRID_TYPES: tuple[str, ...] = (
    "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_S", "IQ1_M",
)  # fmt: skip
LIBGGML_GRIDS: tuple[LibggmlGrid, ...] = tuple(LibggmlGrid(name) for name in LIBGGML_GRID_TYPES)
