"""Registry of quantization grids by name: every export scheme, every ggml tensor type, comparison grids.

Names and what they emulate (formulas in each family's module docstring):

- ggml tensor types, bit-exact with llama.cpp's reference quantizer (no importance matrix):
  ``F32``, ``F16`` (float_grids), ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1`` (ggml_legacy),
  ``Q3_K``, ``Q4_K``, ``Q5_K``, ``Q6_K`` (ggml_kquants).
- ggml tensor types without a torch emulation, rounded by libggml itself (ggml_lib.LibggmlGrid, exactly what
  llama.cpp writes): ``Q2_K``, ``IQ4_XS``, ``IQ4_NL``, ``IQ3_S``, ``IQ3_XXS``, ``IQ2_S``, ``IQ2_XS``,
  ``IQ2_XXS``, ``IQ1_S``, ``IQ1_M``. Registered without an importance matrix; the types llama.cpp writes only
  with one (``ggml_lib.IMATRIX_REQUIRED``) raise until given one: ``get_grid("IQ2_S").with_imatrix(v)``.
- llama.cpp file types of ``toolkit.core.formats.FORMATS["gguf"]``: a file type mixes tensor types, so
  each maps to its default type in ``toolkit.model.storage_types.GGUF_MIXES`` (``Q4_K_M -> Q4_K``,
  ``Q5_K_M -> Q5_K``, ``Q3_K_M -> Q3_K``, ``IQ3_M -> IQ3_S``, ``IQ2_M -> IQ2_S``). Which tensors llama.cpp
  writes at another type (``Q6_K`` for some, ``Q5_0`` / ``Q8_0`` / ``Q4_0`` / ``Q5_1`` / ``IQ4_NL`` for rows
  not a multiple of 256) is that module's type table (``StoredTensor.dtype``): quantize each tensor with
  ``get_grid(<its dtype>)``.
- ONNX Runtime MatMulNBits (onnx_blockwise): ``int{4,8}_b{32,64,128}_{sym,asym}``, float32 scales.
  The schemes of ``FORMATS["onnx"]`` (``int8``, ``int4_b32``, ``int4_b128``) are built from
  ``toolkit.model.storage_types.ONNX_SCHEMES`` (bits, block, symmetric, scale dtype), the table the byte
  counts and the exporter follow; ``fp32`` / ``fp16`` are float storage. The exporter should configure
  MatMulNBitsQuantizer from the grid (``bits``, ``group_size``, ``symmetric``).
- Comparison grids ``asym4_g32|g64|g128`` and ``sym4_g32|g64|g128``: the MatMulNBits arithmetic at
  those group sizes. The demo model's weights lie exactly on an asymmetric block-32 grid (they come
  from Q4_1), so use g64 / g128 or symmetric grids to compare methods on it. ``sym6_g16``: the same
  arithmetic at 6 bits on blocks of 16, the first pass of Q6_K (AWQ's search stand-in for it).
"""

from __future__ import annotations

import torch

from toolkit.compress.quant.base import QuantGrid
from toolkit.compress.quant.float_grids import F16, F32, FloatGrid
from toolkit.compress.quant.ggml_kquants import KQUANT_GRIDS
from toolkit.compress.quant.ggml_legacy import LEGACY_GRIDS
from toolkit.compress.quant.ggml_lib import LIBGGML_GRIDS
from toolkit.compress.quant.onnx_blockwise import onnx_grid
from toolkit.core.errors import BedsideError
from toolkit.model.storage_types import GGUF_MIXES, ONNX_SCHEMES, gguf_fallback

_GGML_TYPES: dict[str, QuantGrid] = {
    grid.name: grid for grid in (F32, F16, *LEGACY_GRIDS, *KQUANT_GRIDS, *LIBGGML_GRIDS)
}

_ONNX_GRIDS: dict[str, QuantGrid] = {
    grid.name: grid
    for grid in (
        onnx_grid(bits, block, symmetric)
        for bits in (4, 8)
        for block in (32, 64, 128)
        for symmetric in (True, False)
    )
}
_ONNX_FLOAT: dict[str, QuantGrid] = {
    "fp32": FloatGrid(name="fp32", bits=32, bits_per_weight=32.0, storage_dtype=torch.float32),
    "fp16": FloatGrid(name="fp16", bits=16, bits_per_weight=16.0, storage_dtype=torch.float16),
}

_COMPARISON_GRIDS: dict[str, QuantGrid] = {
    grid.name: grid
    for grid in (
        onnx_grid(4, block, symmetric, name=f"{'sym' if symmetric else 'asym'}4_g{block}")
        for block in (32, 64, 128)
        for symmetric in (True, False)
    )
}
# Q6_K's shape without its scale search or int8 sub-block scales: AWQ's fast stand-in for Q6_K rows
_COMPARISON_GRIDS["sym6_g16"] = onnx_grid(6, 16, True, name="sym6_g16")

_SCALE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}
_ONNX_SCHEME_GRIDS: dict[str, QuantGrid] = {
    scheme: onnx_grid(
        spec.bits, spec.block_size, spec.symmetric, name=scheme, scale_dtype=_SCALE_DTYPES[spec.float_dtype]
    )
    for scheme, spec in ONNX_SCHEMES.items()
    if spec.bits is not None and spec.block_size is not None
}

# llama.cpp file type -> its default tensor type, where they differ
SCHEME_ALIASES: dict[str, str] = {
    scheme: mix.default for scheme, mix in GGUF_MIXES.items() if scheme != mix.default
}

GRIDS: dict[str, QuantGrid] = {
    **_GGML_TYPES,
    **_ONNX_FLOAT,
    **_ONNX_GRIDS,
    **_COMPARISON_GRIDS,
    **_ONNX_SCHEME_GRIDS,
}
GRIDS.update({alias: GRIDS[target] for alias, target in SCHEME_ALIASES.items()})


def get_grid(name: str) -> QuantGrid:
    """The grid registered as ``name`` (a scheme, a ggml type or a grid name)."""
    try:
        return GRIDS[name]
    except KeyError:
        known = ", ".join(sorted(GRIDS))
        raise BedsideError(f"unknown quantization scheme {name!r}; known: {known}") from None


def grid_for_row(name: str, ncols: int) -> QuantGrid:
    """The grid a weight with rows of ``ncols`` inputs is stored in under scheme ``name``.

    llama.cpp demotes a ggml type whose block does not divide the row (``tensor_type_fallback``:
    Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0, IQ types -> IQ4_NL; F16 when even
    that does not fit), e.g.
    the demo model's 576-wide rows under Q4_K_M. Other grids (ONNX blockwise, float) pad partial
    blocks, so they are returned unchanged.
    """
    grid = get_grid(name)
    if grid.name not in _GGML_TYPES:
        return grid
    return get_grid(gguf_fallback(grid.name, ncols))
