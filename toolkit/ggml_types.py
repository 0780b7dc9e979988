"""The ggml tensor types a GGUF file can hold: elements per block and bytes per block.

Source: gguf-py `GGML_QUANT_SIZES` (gguf/constants.py, the copy vendored in llama-cpp-python 0.3.36 and
the installed gguf package), which mirrors ggml's `ggml_type_traits` (`blck_size`, `type_size`).
Checked against the installed gguf package by tests/test_memory.py.

Size of a tensor of shape (rows, ncols) stored as type T (ggml `ggml_row_size` times rows):

    bytes = rows * (ncols / T.block_size) * T.type_size          (ncols must be a multiple of block_size)

K-quant super-blocks hold QK_K = 256 weights; their byte counts are written out as gguf-py spells them.
"""

from dataclasses import dataclass

QK_K = 256  # elements of a K-quant super-block (ggml-common.h)


@dataclass(frozen=True)
class GgmlType:
    """One ggml storage type: `block_size` elements share `type_size` bytes."""

    name: str
    block_size: int
    type_size: int

    @property
    def bits_per_weight(self) -> float:
        """8 * type_size / block_size (scales and mins included)."""
        return 8 * self.type_size / self.block_size

    def fits_row(self, ncols: int) -> bool:
        """Whether a row of `ncols` elements splits into whole blocks (llama.cpp's `ncols % blck_size == 0`)."""
        return ncols % self.block_size == 0

    def row_bytes(self, ncols: int) -> int:
        """Bytes of one row: ncols / block_size * type_size (ggml_row_size)."""
        if not self.fits_row(ncols):
            raise ValueError(
                f"{self.name}: a row of {ncols} is not a multiple of the block size {self.block_size}"
            )
        return ncols // self.block_size * self.type_size

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor: rows * row_bytes(ncols), where ncols is the last (contiguous) dimension.

        torch shapes (out_features, in_features) have ggml ne[0] = in_features = shape[-1].
        """
        ncols = shape[-1] if shape else 1
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return rows * self.row_bytes(ncols)


# name: (elements per block, bytes per block), exactly gguf-py's GGML_QUANT_SIZES for these types.
_SIZES: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q4_0": (32, 2 + 16),  # fp16 scale + 32 4-bit codes                    = 18 B / 32
    "Q4_1": (32, 2 + 2 + 16),  # fp16 scale + fp16 min + 32 4-bit codes       = 20 B / 32
    "Q5_0": (32, 2 + 4 + 16),  # fp16 scale + 32 high bits + 32 4-bit codes   = 22 B / 32
    "Q5_1": (32, 2 + 2 + 4 + 16),  # + fp16 min                               = 24 B / 32
    "Q8_0": (32, 2 + 32),  # fp16 scale + 32 int8                             = 34 B / 32
    "Q2_K": (QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),  # 84 B / 256
    "Q3_K": (QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),  # 110 B / 256
    "Q4_K": (QK_K, 2 + 2 + QK_K // 2 + 12),  # 144 B / 256
    "Q5_K": (QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),  # 176 B / 256
    "Q6_K": (QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),  # 210 B / 256
    "Q8_K": (QK_K, 4 + QK_K + QK_K // 8),
    "IQ4_NL": (32, 2 + 16),
}

GGML_TYPES: dict[str, GgmlType] = {
    name: GgmlType(name, block, size) for name, (block, size) in _SIZES.items()
}


def ggml_type(name: str) -> GgmlType:
    """Look a type up by its gguf-py enum name (F16, Q4_K, ...); case-insensitive."""
    key = name.upper()
    if key not in GGML_TYPES:
        raise KeyError(f"unknown ggml type {name!r}; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[key]
