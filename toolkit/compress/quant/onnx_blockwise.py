"""ONNX Runtime MatMulNBits block quantization (int4 / int8, symmetric or with zero points).

Emulates ``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer`` in its default
(QOperator, RTN) mode, which calls MLAS ``BlockwiseQuantizer::quantizeAndTranspose`` through
``quantize_matmul_4bits`` / ``quantize_matmul_8bits``. The ONNX weight is ``[K, N] = [in, out]``;
its blocks run along K, i.e. along a torch row. Per block ``x`` of ``block`` inputs, ``b`` bits,
float32 arithmetic, ``roundf`` = round half away from zero, ``S()`` the scale as stored (the
graph's float type, float32 by default):

- asymmetric: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = (hi - lo) / (2^b - 1)``,
  ``zp = clamp(roundf(-lo / s), 0, 2^b - 1)`` (``zp = 0`` where ``s = 0``);
- symmetric: ``M = max x`` if ``|max x| > |min x|`` else ``min x``, ``s = -M / 2^(b-1)``,
  ``zp = 2^(b-1)``;
- codes ``q = clamp(roundf(x * (1/S(s)) + zp), 0, 2^b - 1)`` (``1/S(s)`` taken as 0 where ``S(s)`` is 0);
  value ``(q - zp) * S(s)``.

A K that is not a multiple of the block is padded with zeros, as the quantizer does; zeros never
change a block's range on these grids. Storage: ``b`` bits per code, one scale per block, and with
zero points ``b`` more bits per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.compress.quant.base import QuantGrid, QuantizedWeight, float32_scalar, round_half_away_from_zero


@dataclass(frozen=True, kw_only=True)
class OnnxBlockwiseGrid(QuantGrid):
    """MatMulNBits RTN grid; configure the exporter from its fields so both agree.

    ``MatMulNBitsQuantizer(block_size=grid.group_size, is_symmetric=grid.symmetric, bits=grid.bits)``
    on a graph whose float type is ``scale_dtype`` writes exactly ``grid.fake_quantize(weight)``.

    Attributes:
        scale_dtype: dtype of the stored scales (the graph's float type; float32 for fp32 graphs).
    """

    scale_dtype: torch.dtype = torch.float32

    def _quantize_float32(self, weight: torch.Tensor, in_features: int) -> QuantizedWeight:
        out_features = weight.shape[0]
        blocks = weight.reshape(out_features, -1, self.group_size)
        top = (1 << self.bits) - 1
        half = 1 << (self.bits - 1)
        minimum = blocks.amin(dim=-1)
        maximum = blocks.amax(dim=-1)
        if self.symmetric:
            signed_max = torch.where(maximum.abs() > minimum.abs(), maximum, minimum)
            scale = -signed_max / float32_scalar(float(half), weight)
            zero_points = torch.full_like(scale, float(half))
        else:
            low = torch.clamp(minimum, max=0.0)
            high = torch.clamp(maximum, min=0.0)
            scale = (high - low) / float32_scalar(float(top), weight)
            safe = torch.where(scale == 0, torch.ones_like(scale), scale)
            zero_float = torch.where(scale == 0, low, float32_scalar(0.0, weight) - low / safe)
            zero_points = round_half_away_from_zero(zero_float).clamp(0, top)
        stored_scale = scale.to(self.scale_dtype)
        scale_used = stored_scale.to(torch.float32)
        safe_used = torch.where(scale_used == 0, torch.ones_like(scale_used), scale_used)
        inverse = torch.where(
            scale_used == 0, torch.zeros_like(scale_used), float32_scalar(1.0, weight) / safe_used
        )
        codes = round_half_away_from_zero(blocks * inverse.unsqueeze(-1) + zero_points.unsqueeze(-1)).clamp(
            0, top
        )
        codes = codes.reshape(out_features, -1)[:, :in_features]
        fields = {"scales": stored_scale}
        if not self.symmetric:
            fields["zero_points"] = zero_points.to(torch.uint8)
        return QuantizedWeight(
            codes=codes.to(torch.int16),
            steps=scale_used,
            zero_points=zero_points.to(torch.int16),
            offsets=None,
            group_size=self.group_size,
            fields=fields,
        )


def onnx_grid(
    bits: int,
    block_size: int,
    symmetric: bool,
    name: str | None = None,
    scale_dtype: torch.dtype = torch.float32,
) -> OnnxBlockwiseGrid:
    """A MatMulNBits grid; named ``int{bits}_b{block}_{sym|asym}`` unless ``name`` is given."""
    scale_bits = torch.finfo(scale_dtype).bits
    overhead = (scale_bits + (0 if symmetric else bits)) / block_size
    return OnnxBlockwiseGrid(
        name=name or f"int{bits}_b{block_size}_{'sym' if symmetric else 'asym'}",
        bits=bits,
        group_size=block_size,
        symmetric=symmetric,
        bits_per_weight=bits + overhead,
        scale_dtype=scale_dtype,
    )
