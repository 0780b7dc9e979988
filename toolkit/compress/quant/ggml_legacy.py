"""ggml's block-32 formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, emulated bit-exactly.

Formulas of ggml-quants.c ``quantize_row_*_ref`` (what llama.cpp's quantizer writes when no
importance matrix is given, and what gguf-py's ``gguf.quants.quantize`` reproduces), per block of 32
consecutive inputs ``x``; all arithmetic in float32, ``fp16()`` the stored half-precision value:

- Q8_0: ``d = max|x| / 127``, ``q = roundf(x * (1/d))`` (ties away from zero), stored ``fp16(d)``;
  value ``fp16(d) * q``. 8.5 bits per weight.
- Q4_0: ``M`` = the signed x of largest magnitude (first one on ties), ``d = M / -8``,
  ``q = min(15, trunc(x * (1/d) + 8.5))``; value ``fp16(d) * (q - 8)``. 4.5 bits per weight.
- Q5_0: as Q4_0 with ``d = M / -16``, ``q = min(31, trunc(x * (1/d) + 16.5))``; value
  ``fp16(d) * (q - 16)``. 5.5 bits per weight.
- Q4_1: ``d = (max - min) / 15``, ``q = min(15, trunc((x - min) * (1/d) + 0.5))``; value
  ``fp16(d) * q + fp16(min)``. 5 bits per weight.
- Q5_1: as Q4_1 with 31 levels: ``d = (max - min) / 31``. 6 bits per weight.

``1/d`` is taken as 0 when ``d`` is 0, so an all-zero block stores zeros. Quantization uses the
float32 ``d`` while the stored (and dequantized) one is ``fp16(d)``. Rows must hold whole blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.compress.quant.base import QuantGrid, QuantizedWeight, float32_scalar, round_half_away_from_zero

GGML_BLOCK = 32


def _reciprocal_or_zero(step: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f/d : 0.0f``."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    return torch.where(step == 0, torch.zeros_like(step), float32_scalar(1.0, step) / safe)


def signed_absmax(blocks: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The element of largest magnitude, keeping its sign; the first one on ties (ggml's loop), and +0.0 for a
    block of zeros (ggml's running maximum starts at +0.0f, so a block of -0.0 stores a positive-zero scale).

    ``max`` where ``max > -min``, ``min`` where ``-min > max``; only blocks holding both ``+m`` and ``-m`` need
    the position of the first (the index of the first maximum of ``|x|``), so the others cost two reductions.
    """
    high = blocks.amax(dim=dim)
    low = blocks.amin(dim=dim)
    result = torch.where(high >= -low, high, low)
    tie = (high == -low) & (high != 0)
    if bool(tie.any()):
        index = blocks.abs().max(dim=dim, keepdim=True).indices  # the first maximum, as argmax, but faster on CPU
        result = torch.where(tie, blocks.gather(dim, index).squeeze(dim), result)
    return torch.where(result == 0, torch.zeros_like(result), result)


@dataclass(frozen=True, kw_only=True)
class GgmlLegacyGrid(QuantGrid):
    """One of ggml's block-32 formats (see the module docstring for the formulas).

    Attributes:
        ggml_type: the ggml type name, e.g. ``Q4_0``.
    """

    ggml_type: str
    group_size: int = GGML_BLOCK
    row_multiple: int = GGML_BLOCK

    def _quantize_blocks(
        self, blocks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
        """(step, float codes, zero point, minimum or None) of float32 ``[out, n_blocks, 32]`` blocks."""
        if self.ggml_type == "Q8_0":
            return _quantize_q8_0(blocks)
        if self.symmetric:
            return _quantize_centred(blocks, self.bits)
        return _quantize_min_offset(blocks, self.bits)

    def fake_quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """``quantize(...).dequantize()`` without the integer codes: the same float32 operations in the same
        order (so bit-identical) and fewer temporaries; AWQ's searches call it once per candidate."""
        prepared = self._prepare(weight, clip_ratio)
        blocks = prepared.reshape(weight.shape[0], -1, GGML_BLOCK)
        step, codes, zero, minimum = self._quantize_blocks(blocks)
        values = codes.sub_(zero).mul_(step.to(torch.float16).to(torch.float32).unsqueeze(-1))  # codes: a temporary
        if minimum is not None:
            values.add_(minimum.to(torch.float16).to(torch.float32).unsqueeze(-1))
        return values.reshape(weight.shape).to(weight.dtype)

    def _quantize_float32(self, weight: torch.Tensor, in_features: int) -> QuantizedWeight:
        out_features = weight.shape[0]
        blocks = weight.reshape(out_features, -1, GGML_BLOCK)
        step, codes, zero, minimum = self._quantize_blocks(blocks)
        step_stored = step.to(torch.float16)
        fields = {"d": step_stored}
        offsets = None
        if minimum is not None:
            minimum_stored = minimum.to(torch.float16)
            fields["m"] = minimum_stored
            offsets = minimum_stored.to(torch.float32)
        return QuantizedWeight(
            codes=codes.reshape(out_features, in_features).to(torch.int16),
            steps=step_stored.to(torch.float32),
            zero_points=zero,
            offsets=offsets,
            group_size=GGML_BLOCK,
            fields=fields,
        )


def _quantize_q8_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, None]:
    step = blocks.abs().amax(dim=-1) / float32_scalar(127.0, blocks)
    inverse = _reciprocal_or_zero(step)
    codes = round_half_away_from_zero(blocks * inverse.unsqueeze(-1))
    return step, codes, 0, None


def _quantize_centred(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, int, None]:
    """Q4_0 / Q5_0: ``d = M / -2^(bits-1)``, ``q = min(2^bits - 1, trunc(x/d + 2^(bits-1) + 0.5))``."""
    half = 1 << (bits - 1)
    step = signed_absmax(blocks) / float32_scalar(-float(half), blocks)
    inverse = _reciprocal_or_zero(step)
    scaled = blocks * inverse.unsqueeze(-1)  # a fresh temporary: the rest in place (same values, fewer page faults)
    codes = scaled.add_(float32_scalar(half + 0.5, blocks)).trunc_().clamp_(0, (1 << bits) - 1)
    return step, codes, half, None


def _quantize_min_offset(
    blocks: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Q4_1 / Q5_1: ``d = (max - min) / (2^bits - 1)``, ``q = trunc((x - min)/d + 0.5)``."""
    levels = (1 << bits) - 1
    minimum = blocks.amin(dim=-1)
    maximum = blocks.amax(dim=-1)
    step = (maximum - minimum) / float32_scalar(float(levels), blocks)
    inverse = _reciprocal_or_zero(step)
    scaled = (blocks - minimum.unsqueeze(-1)).mul_(inverse.unsqueeze(-1))
    codes = scaled.add_(float32_scalar(0.5, blocks)).trunc_().clamp_(0, levels)
    return step, codes, 0, minimum


Q8_0 = GgmlLegacyGrid(name="Q8_0", ggml_type="Q8_0", bits=8, symmetric=True, bits_per_weight=34 * 8 / 32)
Q4_0 = GgmlLegacyGrid(name="Q4_0", ggml_type="Q4_0", bits=4, symmetric=True, bits_per_weight=18 * 8 / 32)
Q4_1 = GgmlLegacyGrid(name="Q4_1", ggml_type="Q4_1", bits=4, symmetric=False, bits_per_weight=20 * 8 / 32)
Q5_0 = GgmlLegacyGrid(name="Q5_0", ggml_type="Q5_0", bits=5, symmetric=True, bits_per_weight=22 * 8 / 32)
Q5_1 = GgmlLegacyGrid(name="Q5_1", ggml_type="Q5_1", bits=5, symmetric=False, bits_per_weight=24 * 8 / 32)

LEGACY_GRIDS: tuple[GgmlLegacyGrid, ...] = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
