"""The quantization methods `bedside compress --quant-method` and `bedside deploy --quant-method` offer.

Each prepares float weights (and, for GGUF, an importance matrix) that the exporter then rounds:

- ``awq``: activation-aware scales and clipping folded into the weights (toolkit/compress/quant/awq.py); for a
  GGUF scheme the search rounds candidates as the export does (libggml with the importance matrix of the
  scaled model, which is written beside the checkpoint and passed to llama.cpp's quantizer).
- ``awq-gptq``: ``awq``, then GPTQ's error-compensated rounding (toolkit/compress/quant/gptq.py) of every
  ``Q4_0`` / ``Q5_0`` linear onto the export's exact grid, so the checkpoint holds the codes the GGUF stores;
  linears of other types keep AWQ's float weights. GGUF schemes only.
- ``auto`` (the default): ``awq-gptq`` for a GGUF scheme, ``awq`` otherwise (``resolve_quant_method``).
- ``rtn``: nothing; the exporter rounds to nearest (no matrix).
- ``imatrix``: llama.cpp's own method: no scales; the importance matrix ``mean_t x_tj^2`` of every decoder
  linear, gathered on the unscaled model (toolkit/compress/quant/imatrix.py), guides llama.cpp's weighted
  rounding. GGUF schemes only.
"""

from __future__ import annotations

QUANT_METHODS: dict[str, str] = {
    "auto": "awq-gptq for a GGUF scheme, awq otherwise (the default)",
    "awq": "activation-aware scales + clipping, searched on the export's rounding",
    "awq-gptq": "awq, then GPTQ error-compensated rounding on the exact Q4_0/Q5_0 export grid (GGUF only)",
    "rtn": "round to nearest, no search, no importance matrix",
    "imatrix": "llama.cpp's importance matrix on the unscaled model (GGUF only)",
}
GGUF_ONLY_METHODS: frozenset[str] = frozenset({"imatrix", "awq-gptq"})
AWQ_METHODS: frozenset[str] = frozenset({"awq", "awq-gptq"})


def resolve_quant_method(method: str, scheme: str | None) -> str:
    """The method ``auto`` stands for: ``awq-gptq`` where the export is GGUF (GPTQ needs llama.cpp's exact grid),
    ``awq`` for other schemes; any other method as it is."""
    from toolkit.core.formats import format_of_scheme

    if method != "auto":
        return method
    return "awq-gptq" if scheme is not None and format_of_scheme(scheme) == "gguf" else "awq"
