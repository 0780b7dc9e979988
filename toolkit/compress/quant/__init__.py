"""Quantization grids: the rounding each export format performs, emulated in torch or done by libggml itself.

``get_grid(scheme).fake_quantize(weight)`` gives the weight the exported file will hold; AWQ's
search and the round-to-nearest baseline both quantize through it. ggml types without a torch emulation
(Q2_K, the IQ types) are ``LibggmlGrid``s: libggml's own quantizer through ctypes (``ggml_lib``).
"""

from toolkit.compress.quant.base import BlockShapeError, QuantGrid, QuantizedWeight
from toolkit.compress.quant.ggml_lib import LibggmlGrid
from toolkit.compress.quant.grids import GRIDS, SCHEME_ALIASES, get_grid

__all__ = [
    "GRIDS",
    "SCHEME_ALIASES",
    "BlockShapeError",
    "LibggmlGrid",
    "QuantGrid",
    "QuantizedWeight",
    "get_grid",
]
