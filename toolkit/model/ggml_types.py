"""The ggml tensor types a GGUF file can hold: elements per block and bytes per block.

Read from gguf-py's `GGML_QUANT_SIZES` (gguf/constants.py), which mirrors ggml's `ggml_type_traits`
(`blck_size`, `type_size`); nothing is restated here.

Size of a tensor of shape (rows, ncols) stored as type T (ggml `ggml_row_size` times rows):

    bytes = rows * (ncols / T.block_size) * T.type_size          (ncols must be a multiple of block_size)
"""

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType


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


# Every type gguf-py knows, with its (elements per block, bytes per block) from GGML_QUANT_SIZES.
GGML_TYPES: dict[str, GgmlType] = {
    quant_type.name: GgmlType(quant_type.name, *GGML_QUANT_SIZES[quant_type])
    for quant_type in GGMLQuantizationType
    if quant_type in GGML_QUANT_SIZES
}


def ggml_type(name: str) -> GgmlType:
    """Look a type up by its gguf-py enum name (F16, Q4_K, ...); case-insensitive."""
    key = name.upper()
    if key not in GGML_TYPES:
        raise KeyError(f"unknown ggml type {name!r}; known: {', '.join(GGML_TYPES)}")
    return GGML_TYPES[key]
