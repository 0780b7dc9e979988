"""The quantization methods `bedside compress --quant-method` and `bedside deploy --quant-method` offer.

Each prepares float weights (and, for GGUF, an importance matrix) that the exporter then rounds:

- ``awq``: activation-aware scales and clipping folded into the weights (toolkit/compress/quant/awq.py); for a
  GGUF scheme the search rounds candidates as the export does (libggml with the importance matrix of the
  scaled model, which is written beside the checkpoint and passed to llama.cpp's quantizer).
- ``rtn``: nothing; the exporter rounds to nearest (no matrix).
- ``imatrix``: llama.cpp's own method: no scales; the importance matrix ``mean_t x_tj^2`` of every decoder
  linear, gathered on the unscaled model (toolkit/compress/quant/imatrix.py), guides llama.cpp's weighted
  rounding. GGUF schemes only.
"""

from __future__ import annotations

QUANT_METHODS: dict[str, str] = {
    "awq": "activation-aware scales + clipping, searched on the export's rounding",
    "rtn": "round to nearest, no search, no importance matrix",
    "imatrix": "llama.cpp's importance matrix on the unscaled model (GGUF only)",
}
GGUF_ONLY_METHODS: frozenset[str] = frozenset({"imatrix"})
