"""GPTQ error-compensated rounding (Frantar et al. 2023) onto ggml's Q4_0 / Q5_0 grid, written so that the
GGUF export stores exactly these codes.

For one linear with weight ``W [out, in]`` and calibration inputs ``X [T, in]`` (after AWQ's scaling,
``x / s``), GPTQ minimises the layer-output error ``|| X W^T - X Q^T ||^2`` column by column, the columns
taken in descending order of ``diag H`` (GPTQ's "act-order": the inputs that matter most are rounded first,
while the most columns are left to absorb their error)::

    H = X^T X / T ;  H += damp * mean(diag H) * I ;  U = chol(H^-1)^T  (upper, in the permuted order)
    for each column i (in that order):
        q_i = Q(w_i)                                  (the grid below)
        e_i = (w_i - q_i) / U_ii
        w_j <- w_j - e_i U_ij      for every later column j

The grid is ggml's ``Q4_0`` (``b = 4``) or ``Q5_0`` (``b = 5``): per row and block of 32 consecutive
inputs, values ``d * c`` with ``c`` in ``[-2^(b-1), 2^(b-1) - 1]``. Every block's ``d`` is fixed before the
first column ("static groups", as act-order needs): ``d = M / -2^(b-1)``, ``M`` the signed element of
largest magnitude of the starting weight, rounded to ``k`` significant bits (``round_step``);
``c = clamp(round(w / d))``, and ``M``'s own element (the anchor) is coded ``-2^(b-1)`` whatever the
compensation did to it.

**Why the export reproduces these codes exactly.** llama.cpp re-rounds ``f16(W)`` (ggml_legacy.py's
formulas, or ``make_qx_quants`` with an importance matrix). Every value of a block is ``d * c`` with
``|c| <= 2^(b-1)``, so the anchor ``-2^(b-1) d`` is the block's signed maximum, ggml's ``d`` is the same
``d`` (division by a power of two is exact), and every other value is a multiple of it: plain rounding and
the matrix-weighted search (whose error is zero on such a block) both give back ``c``. That holds when
``d * c`` is exact in the checkpoint's dtype and in float16: ``d`` keeps ``k = p - (b - 1)`` significant bits,
``p`` the smaller of the two significands (bfloat16 8, float16 11), e.g. 5 bits for a bfloat16 checkpoint at
Q4_0 (a step at most 1.6 % off ``M / -8``, which the compensation absorbs). AWQ (``gptq=True``) checks the
property on the export's real rounding (libggml + matrix) and the record counts any block that differs.
"""

from __future__ import annotations

import torch

from toolkit.compress.quant.ggml_legacy import GGML_BLOCK, signed_absmax
from toolkit.core.errors import BedsideError

GPTQ_TYPES: dict[str, int] = {"Q4_0": 4, "Q5_0": 5}
"""ggml types GPTQ writes exactly -> code bits (the centred block-32 formats)."""
SIGNIFICAND_BITS: dict[torch.dtype, int] = {torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}
DAMP = 0.01  # fraction of mean(diag H) added to the diagonal (GPTQ's and llm-compressor's default)
BLOCK_COLUMNS = 128  # columns per lazy batch update (GPTQ's default)


def step_bits(storage_dtype: torch.dtype, code_bits: int) -> int:
    """Significant bits ``k`` of a step ``d`` such that every ``d * c`` is exact in ``storage_dtype`` and in float16."""
    if storage_dtype not in SIGNIFICAND_BITS:
        raise BedsideError(
            f"GPTQ: no exact grid for a checkpoint stored as {storage_dtype}; use float32, float16 or bfloat16"
        )
    return min(SIGNIFICAND_BITS[storage_dtype], SIGNIFICAND_BITS[torch.float16]) - (code_bits - 1)


def round_step(step: torch.Tensor, bits: int) -> torch.Tensor:
    """``step`` rounded to ``bits`` significant binary digits, then to float16 (what ggml stores)."""
    mantissa, exponent = torch.frexp(step.to(torch.float32))  # step = mantissa * 2^exponent, |mantissa| in [0.5, 1)
    scale = float(2**bits)
    rounded = torch.ldexp(torch.round(mantissa * scale) / scale, exponent)
    return rounded.to(torch.float16).to(torch.float32)


def prepare_hessian(gram: torch.Tensor, tokens: int, damp: float = DAMP) -> torch.Tensor:
    """``U = chol((X^T X / T + damp mean(diag) I)^-1)^T`` from ``gram = X^T X``, in float32 as the GPTQ reference
    (at most three ``in x in`` matrices alive: a 7B's 11008-wide down_proj needs 1.5 GB); dead inputs get 1 on
    the diagonal."""
    h = gram.to(torch.float32) / max(tokens, 1)
    diagonal = torch.diagonal(h)
    diagonal[diagonal <= 0] = 1.0
    diagonal += damp * diagonal.mean()
    lower = torch.linalg.cholesky(h)
    del h
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True)


def output_error(weight: torch.Tensor, rounded: torch.Tensor, gram: torch.Tensor, tokens: int) -> float:
    """``tr(D H D^T) / out`` with ``D = W - Q`` and ``H = X^T X / T``: the mean squared output error per row."""
    delta = weight.to(torch.float32) - rounded.to(torch.float32)
    products = (delta @ gram.to(torch.float32)).mul_(delta)
    return float(products.sum(dtype=torch.float64)) / max(tokens, 1) / weight.shape[0]


def gptq_round(
    weight: torch.Tensor,
    gram: torch.Tensor,
    tokens: int,
    type_name: str,
    *,
    storage_dtype: torch.dtype = torch.float32,
    act_order: bool = True,
    damp: float = DAMP,
    block_columns: int = BLOCK_COLUMNS,
) -> torch.Tensor:
    """GPTQ of ``weight [out, in]`` with inputs' ``gram = X^T X`` over ``tokens`` onto ``type_name``'s grid.

    The formulas are the module docstring's; ``act_order=False`` takes the columns in their natural order.
    Returns the float32 rounded weight: every 32-block of every row is ``d * c``, exact in ``storage_dtype`` and
    float16.
    """
    if type_name not in GPTQ_TYPES:
        raise BedsideError(f"GPTQ writes {', '.join(GPTQ_TYPES)} exactly, not {type_name}")
    out_features, in_features = weight.shape
    if in_features % GGML_BLOCK:
        raise BedsideError(f"GPTQ on {type_name}: {in_features} inputs are not whole blocks of {GGML_BLOCK}")
    bits = GPTQ_TYPES[type_name]
    half = 1 << (bits - 1)
    w = weight.detach().to(torch.float32).clone()
    blocks = w.reshape(out_features, -1, GGML_BLOCK)
    peak = signed_absmax(blocks)
    steps = round_step(peak / -half, step_bits(storage_dtype, bits))  # [out, blocks]
    anchors = torch.zeros_like(w, dtype=torch.bool)
    starts = torch.arange(0, in_features, GGML_BLOCK)
    anchors.scatter_(1, blocks.abs().argmax(dim=-1) + starts[None, :], True)  # the first maximum, as ggml's loop

    diagonal = torch.diagonal(gram)
    order = torch.argsort(diagonal, descending=True, stable=True) if act_order else torch.arange(in_features)
    upper = prepare_hessian(gram[order][:, order], tokens, damp)
    # Transposed, [in, out]: the column loop (in Python, once per input) reads and updates whole columns of W,
    # contiguous rows here instead of strided columns (docs/BENCHMARKS.md, session 17).
    wt = w.T[order].contiguous()
    step = steps.repeat_interleave(GGML_BLOCK, dim=1).T[order].contiguous()
    inverse = torch.where(step == 0, torch.zeros_like(step), 1.0 / torch.where(step == 0, 1.0, step))
    anchors = anchors.T[order].contiguous()
    lowest = torch.full((out_features,), float(-half))
    q = torch.empty_like(wt)
    block_columns = max(1, block_columns)
    for start in range(0, in_features, block_columns):
        end = min(start + block_columns, in_features)
        w1 = wt[start:end].clone()
        err = torch.empty_like(w1)
        u1 = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            codes = torch.round(w1[i] * inverse[column]).clamp_(-half, half - 1)
            codes = torch.where(anchors[column], lowest, codes)
            values = codes.mul_(step[column])
            q[column] = values
            e = (w1[i] - values).div_(u1[i, i])
            w1[i + 1 :] -= u1[i, i + 1 :, None] * e[None, :]
            err[i] = e
        wt[end:] -= upper[start:end, end:].T @ err
    rounded = torch.empty_like(w)
    rounded[:, order] = q.T
    return rounded
