"""Quantization grids: the rounding each export format performs, emulated in torch.

``get_grid(scheme).fake_quantize(weight)`` gives the weight the exported file will hold; AWQ's
search and the round-to-nearest baseline both quantize through it.
"""

from toolkit.compress.quant.base import BlockShapeError, QuantGrid, QuantizedWeight
from toolkit.compress.quant.grids import GRIDS, SCHEME_ALIASES, get_grid

__all__ = ["GRIDS", "SCHEME_ALIASES", "BlockShapeError", "QuantGrid", "QuantizedWeight", "get_grid"]
