"""What every quantization grid shares: the contract, the result record, block reshaping and clipping.

A grid is the set of values a weight can take once an exporter or runtime has stored it. Each grid
here reproduces the rounding of one real implementation (ggml, ONNX Runtime MatMulNBits) so that a
search over scales or clipping in torch sees exactly the weights the exported file will hold.

Weights are torch ``[out_features, in_features]`` matrices, quantized in blocks that run along
``in_features`` (the reduction dimension of the matmul; ggml rows and ONNX MatMulNBits K-blocks both
run that way). Arithmetic is done in float32 whatever the input dtype, in the order the reference C
code uses, and the result is cast back to the input dtype.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from toolkit.core.errors import BedsideError


class BlockShapeError(BedsideError):
    """A weight's shape does not fit a grid's blocks (e.g. a ggml row not a multiple of 32 or 256)."""


@dataclass(frozen=True)
class QuantizedWeight:
    """Integer codes and the per-group numbers that map them back to floats.

    For every group of ``group_size`` consecutive inputs of one output row::

        value = steps * (codes - zero_points) + offsets        (float32, in this order)

    which is the dequantization formula of every grid here (ggml: ``d * (q - 8)``, ``d * q + m``,
    ``(d * sc) * q - dmin * m``; ONNX Runtime: ``(q - zp) * scale``).

    Attributes:
        codes: ``[out, in]`` int16, the stored integers before subtracting zero points (unsigned,
            except Q8_0's signed int8 codes).
        steps: ``[out, n_groups]`` float32, value of one code step in each group.
        zero_points: ``[out, n_groups]`` int16 tensor, or one int shared by all groups.
        offsets: ``[out, n_groups]`` float32 added after scaling, or None.
        group_size: inputs per group (the last group may be partial where the grid pads).
        fields: what the format stores besides the codes, by the format's own names
            (e.g. ``d`` as float16 for ggml, ``sub_scales`` for k-quants); for tests and exporters.
    """

    codes: torch.Tensor
    steps: torch.Tensor
    zero_points: torch.Tensor | int
    offsets: torch.Tensor | None
    group_size: int
    fields: dict[str, torch.Tensor] = field(default_factory=dict)

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the runtime reconstructs from this record."""
        out_features, in_features = self.codes.shape
        n_groups = self.steps.shape[1]
        padded = n_groups * self.group_size
        codes = self.codes
        if padded != in_features:
            codes = torch.nn.functional.pad(codes, (0, padded - in_features))
        codes = codes.reshape(out_features, n_groups, self.group_size)
        zero = self.zero_points
        if isinstance(zero, torch.Tensor):
            zero = zero.unsqueeze(-1)
        values = self.steps.unsqueeze(-1) * (codes - zero).to(torch.float32)
        if self.offsets is not None:
            values = values + self.offsets.unsqueeze(-1)
        return values.reshape(out_features, padded)[:, :in_features].contiguous()


@dataclass(frozen=True, kw_only=True)
class QuantGrid(ABC):
    """One storage format's rounding, emulated in torch.

    Attributes:
        name: registry name (a ggml type such as ``Q4_K``, or an ONNX scheme such as ``int4_b32_asym``).
        bits: bits of each integer code (16 or 32 for float formats).
        group_size: consecutive inputs that share one scale (and min/zero point): the clipping group.
        symmetric: True where the grid has no per-group offset (codes are centred on a fixed zero).
        bits_per_weight: storage cost per weight including scales, mins and zero points.
        row_multiple: in_features must be a multiple of this (ggml rows of whole blocks); 1 where
            the format pads a partial last block (ONNX Runtime pads K with zeros).
    """

    name: str
    bits: int
    group_size: int
    symmetric: bool
    bits_per_weight: float
    row_multiple: int = 1

    def quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> QuantizedWeight:
        """Quantize a ``[out, in]`` weight; ``clip_ratio`` is applied first (see ``clip``)."""
        prepared = self._prepare(weight, clip_ratio)
        return self._quantize_float32(prepared, weight.shape[1])

    def fake_quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
        """Quantize then dequantize: the weight the runtime will compute with, in the input's dtype.

        ``clip_ratio`` (optional, broadcastable to ``[out, n_groups]`` with
        ``n_groups = ceil(in / group_size)``) clamps each group to ``±ratio * max|w|`` of that group
        before quantizing, as AWQ's clipping search does; ratio 1 changes nothing. The result
        carries no gradient (the weight is detached).
        """
        return self.quantize(weight, clip_ratio).dequantize().to(weight.dtype)

    def n_groups(self, in_features: int) -> int:
        """Number of scale groups along a row of ``in_features`` inputs."""
        return -(-in_features // self.group_size)

    def check_shape(self, shape: tuple[int, ...] | torch.Size) -> None:
        """Raise BlockShapeError where a weight of this shape cannot be stored on this grid."""
        if len(shape) != 2:
            raise BlockShapeError(
                f"grid {self.name} quantizes 2-D [out, in] weights, got shape {tuple(shape)}"
            )
        if shape[1] % self.row_multiple:
            raise BlockShapeError(
                f"grid {self.name} needs in_features divisible by {self.row_multiple}, got {shape[1]} "
                f"(llama.cpp falls back to another type for such rows: quantize them with that type's grid)"
            )

    def clip(self, weight: torch.Tensor, clip_ratio: torch.Tensor) -> torch.Tensor:
        """Clamp each group of a float32 ``[out, padded_in]`` weight to ``±clip_ratio * max|w|``."""
        out_features, padded = weight.shape
        n_groups = padded // self.group_size
        groups = weight.reshape(out_features, n_groups, self.group_size)
        ratio = torch.as_tensor(clip_ratio, dtype=torch.float32, device=weight.device)
        try:
            ratio = torch.broadcast_to(ratio, (out_features, n_groups))
        except RuntimeError as error:
            raise ValueError(
                f"clip_ratio of shape {tuple(ratio.shape)} does not broadcast to [out, n_groups] = "
                f"[{out_features}, {n_groups}] for grid {self.name}"
            ) from error
        bound = (groups.abs().amax(dim=-1) * ratio).unsqueeze(-1)
        return torch.clamp(groups, -bound, bound).reshape(out_features, padded)

    def _prepare(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None) -> torch.Tensor:
        """Check the shape, convert to float32, pad to whole groups, clip."""
        self.check_shape(weight.shape)
        prepared = weight.detach().to(torch.float32)
        padded = self.n_groups(weight.shape[1]) * self.group_size
        if padded != weight.shape[1]:
            prepared = torch.nn.functional.pad(prepared, (0, padded - weight.shape[1]))
        if clip_ratio is not None:
            prepared = self.clip(prepared, clip_ratio)
        return prepared.contiguous()

    @abstractmethod
    def _quantize_float32(self, weight: torch.Tensor, in_features: int) -> QuantizedWeight:
        """Quantize a float32 weight already padded to whole groups; codes cropped to in_features."""


def round_half_away_from_zero(values: torch.Tensor) -> torch.Tensor:
    """C ``roundf``: nearest integer, ties away from zero, exact for every float32 input."""
    truncated = torch.trunc(values)
    fraction = values - truncated  # exact: removing the integer part of a float is exact
    return truncated + torch.sign(values) * (fraction.abs() >= 0.5).to(values.dtype)


def float32_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor on ``like``'s device.

    Binary ops with it round like C float arithmetic; a Python number on the left of ``/`` does
    not (torch computes ``number / tensor`` as ``tensor.reciprocal() * number``).
    """
    return torch.tensor(value, dtype=torch.float32, device=like.device)
