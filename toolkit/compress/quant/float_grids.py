"""Float storage (fp32, fp16): no integer codes, only the rounding of the stored float type.

- fp32 / F32: value = x (identity; float32 inputs are stored as they are).
- fp16 / F16: value = fp16(x), round to nearest even; magnitudes above 65504 become inf, as when
  a checkpoint is written in half precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.compress.quant.base import QuantGrid, QuantizedWeight


@dataclass(frozen=True, kw_only=True)
class FloatGrid(QuantGrid):
    """Weights stored as floats of ``storage_dtype``: every weight its own group, no clipping.

    Attributes:
        storage_dtype: the float type the file stores.
    """

    storage_dtype: torch.dtype = torch.float32
    group_size: int = 1
    symmetric: bool = True

    def _prepare(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None) -> torch.Tensor:
        if clip_ratio is not None:
            raise ValueError(f"grid {self.name} stores floats: clip_ratio does not apply")
        self.check_shape(weight.shape)
        return weight.detach()

    def _quantize_float32(self, weight: torch.Tensor, in_features: int) -> QuantizedWeight:
        stored = weight.to(self.storage_dtype)
        out_features = weight.shape[0]
        # every weight is its own group: step 0, the stored value as offset, so dequantize() returns it
        return QuantizedWeight(
            codes=torch.zeros((out_features, in_features), dtype=torch.int16, device=weight.device),
            steps=torch.zeros((out_features, in_features), dtype=torch.float32, device=weight.device),
            zero_points=0,
            offsets=stored.to(torch.float32),
            group_size=1,
            fields={"values": stored},
        )

    def fake_quantize(self, weight: torch.Tensor, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
        return self._prepare(weight, clip_ratio).to(self.storage_dtype).to(weight.dtype)


F32 = FloatGrid(name="F32", bits=32, bits_per_weight=32.0, storage_dtype=torch.float32)
F16 = FloatGrid(name="F16", bits=16, bits_per_weight=16.0, storage_dtype=torch.float16)
