"""ggml's k-quants Q3_K, Q4_K, Q5_K, Q6_K, emulated bit-exactly (reference path, no importance matrix).

Super-blocks of 256 inputs; each holds sub-blocks with their own 6-bit (Q3_K: 6-bit signed,
Q6_K: 8-bit signed) scale, quantized against one float16 super-scale ``d``. These are the formulas
of ggml-quants.c ``quantize_row_q{3,4,5,6}_K_ref``, which is what llama.cpp's quantizer
(``llama_model_quantize`` -> ``ggml_quantize_chunk``) runs when no importance matrix is given.
float32 arithmetic in the C evaluation order, sums accumulated sequentially, ``nint`` = ggml's
``nearest_int`` (round half to even), ``fp16()`` the stored half value:

- Q4_K (Q5_K): 8 sub-blocks of 32. For each, weights ``w = sqrt(mean x^2) + |x|`` and
  ``make_qkx2_quants(nmax=15 (31), rmin=-1 (-0.5), rdelta=0.1, nstep=20 (15))``: start from
  ``min = min(min x, 0)``, ``scale = (max - min)/nmax``; for each ``iscale = (rmin + rdelta*i + nmax)
  / (max - min)`` quantize ``l = clamp(nint(iscale*(x - min)), 0, nmax)``, fit scale and min by
  weighted least squares (min forced <= 0) and keep the candidate with the lowest weighted squared
  error. Then ``d = fp16(max_scale / 63)``, ``dmin = fp16(max_min / 63)``, 6-bit
  ``sc = min(63, nint(63 * scale / max_scale))`` and ``m`` likewise, and final codes
  ``q = clamp(nint((x + dmin*m) / (d*sc)), 0, nmax)``; value ``(d*sc) * q - dmin*m``.
  4.5 (5.5) bits per weight.
- Q6_K: 16 sub-blocks of 16. ``make_qx_quants(nmax=32, rmse_type=1)``: ``iscale = -32 / M`` (M the
  signed largest-magnitude x), codes ``clamp(nint(iscale*x), -32, 31)``, weighted (``w = x^2``)
  least-squares scale, trying ``iscale = -(32 + 0.1*i) / M`` for i in -9..9. Then
  ``d = fp16(1 / (-128 / max_scale))``, int8 ``sc = min(127, nint(-128 * scale / max_scale))``,
  ``q = clamp(nint(x / (d*sc)), -32, 31) + 32``; value ``(d*sc) * (q - 32)``. 6.5625 bits per weight.
- Q3_K: 16 sub-blocks of 16. ``make_q3_quants(nmax=4, do_rmse)``: ``l = clamp(nint(-4 x / M), -4, 3)``
  then up to 5 passes of per-element coordinate descent on the ``w = x^2`` weighted fit. Then
  ``d = fp16(1 / (-32 / max_scale))``, 6-bit ``sc = clamp(nint(-32 * scale / max_scale), -32, 31)``,
  ``q = clamp(nint(x / (d*sc)), -4, 3) + 4``; value ``(d*sc) * (q - 4)``. 3.4375 bits per weight.

Where ``d*sc`` is 0 a sub-block keeps the codes of the first pass (as the C code does); its values
are ``-dmin*m`` (Q4_K/Q5_K) or 0. Rows must hold whole super-blocks of 256.

Cost: the C loops over elements are kept as loops over the 16 or 32 positions of a sub-block,
vectorised across all sub-blocks (float32 sums must be accumulated in the same order to be
bit-exact), so a k-quant costs a few hundred to a few thousand small tensor ops per matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.compress.quant.base import QuantGrid, QuantizedWeight, float32_scalar
from toolkit.compress.quant.ggml_legacy import signed_absmax

SUPER_BLOCK = 256
GROUP_MAX_EPS = float(np.float32(1e-15))


def _sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the first dim one term at a time, in order, as a C ``for`` loop accumulates floats."""
    total = terms[0].clone()
    for index in range(1, terms.shape[0]):
        total.add_(terms[index])
    return total


def _float32_constant(value: np.float32, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def _sqrt_float32(values: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf`` (torch's float32 CPU sqrt is not; float64 then round is)."""
    return values.to(torch.float64).sqrt().to(torch.float32)


def _safe_divisor(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values == 0, torch.ones_like(values), values)


def make_qkx2_quants(
    x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml ``make_qkx2_quants`` on ``[n, B]`` sub-blocks (element-major). Returns codes, scale, -min."""
    minimum = x.amin(dim=0)
    maximum = x.amax(dim=0)
    sum_w = _sequential_sum(weights)
    sum_x = _sequential_sum(weights * x)
    minimum = torch.clamp(minimum, max=0.0)
    flat = maximum == minimum  # C returns early here: codes 0, scale 0, min kept
    flat_minimum = minimum
    levels = float32_scalar(float(nmax), x)
    iscale = levels / _safe_divisor(maximum - minimum)
    scale = float32_scalar(1.0, x) / iscale
    codes = torch.round(iscale * (x - minimum)).clamp(0, nmax)
    diff = scale * codes + minimum - x
    best_error = _sequential_sum(weights * (diff * diff))
    for step in range(nstep + 1):
        numerator = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        # the C code moves `min` to each better fit, so later candidates span from the new min
        iscale = _float32_constant(numerator, x) / _safe_divisor(maximum - minimum)
        trial = torch.round(iscale * (x - minimum)).clamp(0, nmax)
        weighted = weights * trial
        sum_l, sum_l2, sum_xl = _sequential_sum(
            torch.stack((weighted, weighted * trial, weighted * x), dim=1)
        )
        determinant = sum_w * sum_l2 - sum_l * sum_l
        safe_determinant = _safe_divisor(determinant)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_determinant
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_determinant
        positive_min = this_min > 0
        this_min = torch.where(positive_min, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive_min, sum_xl / _safe_divisor(sum_l2), this_scale)
        diff = this_scale * trial + this_min - x
        error = _sequential_sum(weights * (diff * diff))
        better = (determinant > 0) & (error < best_error)
        codes = torch.where(better, trial, codes)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minimum = torch.where(flat, flat_minimum, minimum)
    return codes, scale, -minimum


def make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_qx_quants(rmse_type=1, qw=NULL)`` on ``[n, B]``. Returns codes (0..2*nmax-1), scale."""
    amax_value = signed_absmax(x, dim=0)
    all_zero = amax_value.abs() < GROUP_MAX_EPS
    safe_max = _safe_divisor(amax_value)
    weights = x * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        sum_lx = _sequential_sum(weights * x * levels)
        sum_l2 = _sequential_sum(weights * levels * levels)
        return levels, sum_lx, sum_l2

    levels, sum_lx, sum_l2 = fit(float32_scalar(float(-nmax), x) / safe_max)
    scale = torch.where(sum_l2 != 0, sum_lx / _safe_divisor(sum_l2), torch.zeros_like(sum_l2))
    best = scale * sum_lx
    for step in range(-9, 10):
        if step == 0:
            continue
        numerator = -(np.float32(nmax) + np.float32(0.1) * np.float32(step))
        trial, trial_lx, trial_l2 = fit(_float32_constant(numerator, x) / safe_max)
        better = (trial_l2 > 0) & (trial_lx * trial_lx > best * trial_l2)
        levels = torch.where(better, trial, levels)
        scale = torch.where(better, trial_lx / _safe_divisor(trial_l2), scale)
        best = torch.where(better, scale * trial_lx, best)
    codes = torch.where(all_zero, torch.zeros_like(levels), levels + nmax)
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    return codes, scale


def make_q3_quants_rmse(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_q3_quants(do_rmse=true)`` on ``[n, B]``. Returns codes (0..2*nmax-1), scale."""
    amax_value = signed_absmax(x, dim=0)
    all_zero = amax_value.abs() < GROUP_MAX_EPS
    iscale = float32_scalar(float(-nmax), x) / _safe_divisor(amax_value)
    levels = torch.round(iscale * x).clamp(-nmax, nmax - 1)
    weights = x * x
    weighted_x = weights * x
    sum_lx = _sequential_sum(weighted_x * levels)
    sum_l2 = _sequential_sum(weights * levels * levels)
    rows = [levels[index] for index in range(x.shape[0])]
    for _ in range(5):
        for index in range(x.shape[0]):
            w, wx, current = weights[index], weighted_x[index], rows[index]
            slx = sum_lx - wx * current
            positive = slx > 0
            sl2 = sum_l2 - w * current * current
            proposal = torch.round(x[index] * sl2 / _safe_divisor(slx)).clamp(-nmax, nmax - 1)
            changed = positive & (proposal != current)
            new_slx = slx + wx * proposal
            new_sl2 = sl2 + w * proposal * proposal
            accept = changed & (new_sl2 > 0) & (new_slx * new_slx * sum_l2 > sum_lx * sum_lx * new_sl2)
            rows[index] = torch.where(accept, proposal, current)
            sum_lx = torch.where(accept, new_slx, sum_lx)
            sum_l2 = torch.where(accept, new_sl2, sum_l2)
    levels = torch.stack(rows)
    scale = torch.where(sum_l2 > 0, sum_lx / _safe_divisor(sum_l2), torch.zeros_like(sum_l2))
    codes = torch.where(all_zero, torch.zeros_like(levels), levels + nmax)
    scale = torch.where(all_zero, torch.zeros_like(scale), scale)
    return codes, scale


@dataclass(frozen=True, kw_only=True)
class GgmlKQuantGrid(QuantGrid):
    """One of ggml's k-quants (see the module docstring). ``group_size`` is the sub-block.

    Attributes:
        ggml_type: the ggml type name, e.g. ``Q4_K``.
    """

    ggml_type: str
    row_multiple: int = SUPER_BLOCK

    def _quantize_float32(self, weight: torch.Tensor, in_features: int) -> QuantizedWeight:
        out_features = weight.shape[0]
        sub = self.group_size
        per_super = SUPER_BLOCK // sub
        # element-major sub-blocks: [sub, n_sub_blocks] so that each position is a contiguous slice
        x = weight.reshape(-1, sub).t().contiguous()
        if self.ggml_type in ("Q4_K", "Q5_K"):
            result = _quantize_scale_min(x, per_super, self.bits)
        else:
            result = _quantize_scale_only(x, per_super, self.ggml_type)
        codes, steps, offsets, zero, fields = result
        n_groups = in_features // sub
        fields = {key: value.reshape(out_features, -1, *value.shape[1:]) for key, value in fields.items()}
        return QuantizedWeight(
            codes=codes.t().reshape(out_features, in_features).to(torch.int16),
            steps=steps.reshape(out_features, n_groups),
            zero_points=zero,
            offsets=None if offsets is None else offsets.reshape(out_features, n_groups),
            group_size=sub,
            fields=fields,
        )


def _super_view(values: torch.Tensor, per_super: int) -> torch.Tensor:
    """``[n_sub_blocks]`` -> ``[n_super_blocks, per_super]``."""
    return values.reshape(-1, per_super)


def _quantize_scale_min(
    x: torch.Tensor, per_super: int, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, dict[str, torch.Tensor]]:
    """Q4_K / Q5_K (``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref``)."""
    nmax = (1 << bits) - 1
    rmin, nstep = (-1.0, 20) if bits == 4 else (-0.5, 15)
    sum_x2 = _sequential_sum(x * x)
    mean_magnitude = _sqrt_float32(sum_x2 / float32_scalar(float(x.shape[0]), x))
    weights = mean_magnitude + x.abs()
    codes, scales, mins = make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep)
    scales_sb = _super_view(scales, per_super)
    mins_sb = _super_view(mins, per_super)
    # `if (scale > max_scale) max_scale = scale` from +0: never -0.0, which would be stored as such
    max_scale = scales_sb.amax(dim=-1)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = mins_sb.amax(dim=-1)
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    sixty_three = float32_scalar(63.0, x)
    inv_scale = torch.where(
        max_scale > 0, sixty_three / _safe_divisor(max_scale), torch.zeros_like(max_scale)
    )
    inv_min = torch.where(max_min > 0, sixty_three / _safe_divisor(max_min), torch.zeros_like(max_min))
    # uint8_t ls = nearest_int(...); ls = MIN(63, ls): the uint8 conversion wraps negatives
    sub_scales = torch.clamp(torch.round(inv_scale.unsqueeze(-1) * scales_sb).to(torch.int64) & 0xFF, max=63)
    sub_mins = torch.clamp(torch.round(inv_min.unsqueeze(-1) * mins_sb).to(torch.int64) & 0xFF, max=63)
    d = (max_scale / sixty_three).to(torch.float16)
    dmin = (max_min / sixty_three).to(torch.float16)
    step = (d.to(torch.float32).unsqueeze(-1) * sub_scales.to(torch.float32)).reshape(-1)
    shift = (dmin.to(torch.float32).unsqueeze(-1) * sub_mins.to(torch.float32)).reshape(-1)
    final = torch.round((x + shift) / _safe_divisor(step)).clamp(0, nmax)
    codes = torch.where(step != 0, final, codes)
    fields = {
        "d": d,
        "dmin": dmin,
        "sub_scales": sub_scales.to(torch.uint8),
        "sub_mins": sub_mins.to(torch.uint8),
    }
    return codes, step, -shift, 0, fields


def _quantize_scale_only(
    x: torch.Tensor, per_super: int, ggml_type: str
) -> tuple[torch.Tensor, torch.Tensor, None, int, dict[str, torch.Tensor]]:
    """Q6_K / Q3_K (``quantize_row_q6_K_ref`` / ``quantize_row_q3_K_ref``)."""
    if ggml_type == "Q6_K":
        nmax, scale_levels = 32, 128
        codes, scales = make_qx_quants_rmse1(x, nmax)
    else:
        nmax, scale_levels = 4, 32
        codes, scales = make_q3_quants_rmse(x, nmax)
    scales_sb = _super_view(scales, per_super)
    max_scale = signed_absmax(scales_sb, dim=-1)
    # Q6_K skips super-blocks whose largest scale is below GROUP_MAX_EPS, Q3_K only exact zeros
    empty = max_scale.abs() < GROUP_MAX_EPS if ggml_type == "Q6_K" else max_scale == 0
    iscale = float32_scalar(float(-scale_levels), x) / _safe_divisor(max_scale)
    levels = torch.round(iscale.unsqueeze(-1) * scales_sb)
    # Q6_K stores int8 scales (MIN(127, l)), Q3_K 6-bit ones offset by 32
    sub_scales = levels.clamp(max=127) if ggml_type == "Q6_K" else levels.clamp(-32, 31)
    sub_scales = torch.where(empty.unsqueeze(-1), torch.zeros_like(sub_scales), sub_scales)
    if ggml_type == "Q3_K":
        # an all-zero super-block stores 6-bit scales of 0, which read back as 0 - 32
        sub_scales = torch.where(empty.unsqueeze(-1), torch.full_like(sub_scales, -32.0), sub_scales)
    d = torch.where(empty, torch.zeros_like(iscale), float32_scalar(1.0, x) / iscale).to(torch.float16)
    step = (d.to(torch.float32).unsqueeze(-1) * sub_scales).reshape(-1)
    final = torch.round(x / _safe_divisor(step)).clamp(-nmax, nmax - 1) + nmax
    codes = torch.where(step != 0, final, codes)
    if ggml_type == "Q6_K":
        # an all-zero super-block is written as zero bytes
        codes = torch.where(empty.repeat_interleave(per_super), torch.zeros_like(codes), codes)
    fields = {"d": d, "sub_scales": sub_scales.to(torch.int8)}
    return codes, step, None, nmax, fields


Q3_K = GgmlKQuantGrid(
    name="Q3_K", ggml_type="Q3_K", bits=3, group_size=16, symmetric=True, bits_per_weight=110 * 8 / 256
)
Q4_K = GgmlKQuantGrid(
    name="Q4_K", ggml_type="Q4_K", bits=4, group_size=32, symmetric=False, bits_per_weight=144 * 8 / 256
)
Q5_K = GgmlKQuantGrid(
    name="Q5_K", ggml_type="Q5_K", bits=5, group_size=32, symmetric=False, bits_per_weight=176 * 8 / 256
)
Q6_K = GgmlKQuantGrid(
    name="Q6_K", ggml_type="Q6_K", bits=6, group_size=16, symmetric=True, bits_per_weight=210 * 8 / 256
)

KQUANT_GRIDS: tuple[GgmlKQuantGrid, ...] = (Q3_K, Q4_K, Q5_K, Q6_K)
