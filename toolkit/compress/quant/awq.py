"""Activation-aware weight quantization (AWQ, Lin et al. 2024), block by block, on CPU.

Follows mit-han-lab/llm-awq (``auto_scale`` / ``auto_clip``) and mlx-lm's ``mlx_lm/quant/awq.py``.
The output is a float model whose weights are *scaled and clipped* so that the exporter's
round-to-nearest ``Q`` (``get_grid(scheme).fake_quantize``, bit-exact with the export format) loses
less; the exporter does the rounding.

Per decoder layer ``l`` (inputs ``X_l`` = outputs of layer ``l-1`` of the float model):

1. **Statistics.** One forward pass of the layer over all calibration tokens, with hooks on each
   scale group's linears: ``m_j = mean_t |x_tj|`` per input channel ``j`` (all tokens), the sums
   ``sum_t x_tj^2`` for the importance matrix, and, for a subset of whole sequences
   (``search_tokens``), the call of the group's ``inspect`` module and its float output ``y``. The
   sequences outside that subset pass in bfloat16 where the CPU multiplies it natively (``propagation``);
   the subset, the loss's reference, always in float32.
2. **Scale search** per group of the architecture table (``norm -> q,k,v``; ``v -> o`` only when
   ``v.out == o.in``, i.e. not under grouped-query attention; ``norm -> gate,up``; ``up -> down``):
   for ``alpha in {0, 1/n_grid, ..., 1}``::

       s = max(m, 1e-4) ** alpha ;  s = s / sqrt(max(s) * min(s))
       W_k <- Q(W_k diag(s)) diag(s)^-1          for each linear k of the group
       loss(alpha) = mean (inspect(x) - y)^2

   The loss is measured on the ``inspect`` module's output as the spec asks: the whole attention
   block (q, k, v, softmax, o) for ``norm -> q,k,v``; the whole MLP for ``norm -> gate,up``; the
   linear itself for ``v -> o`` and ``up -> down``. ``alpha = 0`` is plain RTN (``s = 1``), so the
   chosen scale never does worse than RTN on the search tokens. Groups are searched on the
   original weights and folded afterwards, as llm-awq does. Not every alpha is evaluated (``alpha_search``,
   default ``climb``: a coarse third, then neighbours down to a local minimum), and the candidates' passes run
   in bfloat16 where that measures fine for the group (``search_precision``, against float32 references).
3. **Fold** (exact in float): the linears' input columns are multiplied by ``s``
   (``W <- W diag(s)``) and the producer of their input divided by it: a norm's weight
   ``g <- g / s`` (Gemma's ``(1 + g)``: ``g <- (1 + g) / s - 1``), or a preceding linear's output
   rows (``W_prev <- diag(s)^-1 W_prev``, bias too). The float model's function is unchanged.
4. **Clipping search** per linear except q and k (llm-awq skips them: their error is amplified
   through the softmax and clipping hurts them), per output row ``o`` and group ``g`` of the grid::

       err_r[o, g] = mean_t ( sum_{i in g} x'_ti (W'_oi - Q_r(W')_oi) )^2,   x' = x / s
       Q_r = Q(clamp(W', -r max|W'_og|, r max|W'_og|)),   r in {1.0, 0.95, ..., 0.5}

   (ratios below ``0.7`` only for the groups whose best is one of the last two tried) on every calibration token,
   computed as ``d^T H_g d`` with ``d = W'_og - Q_r(W')_og`` and the group's
   input Gram matrix ``H_g = X'_g^T X'_g / T`` (accumulated block by block in pass 1, so the cost does not grow
   with the tokens); the best ``r`` per ``(o, g)`` is applied by clamping ``W'`` (weights stay float; exporting
   with the same grid then stores exactly ``Q_r``). Every token matters here: the attention-sink position (the
   first of each sequence) can feed some ``down_proj`` inputs far above all others, and a search on a token
   sample that missed it clipped the weights reading it (docs/BENCHMARKS.md).
5. **Importance matrix** (llama.cpp ``imatrix``) from the same pass, for every linear of the layer
   (o_proj too where no group scales it): the inputs of a linear after folding are ``x / s``, so
   ``in_sum2_j = sum_t x_tj^2 / s_j^2`` and ``counts = tokens``; the export passes this file to llama.cpp.
5b. **GPTQ** (``gptq=True``, toolkit/compress/quant/gptq.py): each linear the GGUF export stores as ``Q4_0`` /
   ``Q5_0`` is rounded by GPTQ with ``H = X'^T X'`` over ``gptq_tokens`` tokens onto the export's exact grid
   (not clipped); the checkpoint then holds the codes the export writes.
6. The next layer's inputs are this layer's float outputs from pass 1 (as llm-awq does; folding is
   exact, so they equal the scaled float model's outputs up to the clipping).

**The rounding searched is the rounding exported.** Each linear is stored in the type llama.cpp's
per-tensor rules give it (``export_rounding.linear_roundings``: ``Q4_K_M`` writes some ``attn_v`` /
``ffn_down`` as ``Q6_K``, short rows fall back to ``Q5_0`` / ``Q8_0``), and a GGUF export with a matrix rounds
``Q(W') = libggml_T(f16(W'), imatrix')`` with ``imatrix'_j = mean_t x_tj^2 / s_j^2``, the matrix of the
*scaled* model that step 5 writes (so each alpha candidate is rounded with its own matrix). No torch grid
emulates that weighted rounding, so with ``search_rounding="rerank"`` (default) every alpha is first scored
on the torch emulation (``SEARCH_STAND_INS`` for k-quants, which are slow to emulate: Q4_K -> asym4_g32,
Q5_K -> Q5_1, Q6_K -> sym6_g16), then the ``rerank`` best alphas and alpha 0 are scored again with libggml + matrix and the
best of those by that exact loss is kept; clipping likewise re-ranks ``{r*, r* +- 0.05, 1}`` per group
with the exact rounding around the emulated best ``r*``. ``"exact"`` scores every candidate with libggml;
types libggml alone rounds (Q2_K, IQ types, including those llama.cpp writes only with a matrix: IQ3_XXS,
IQ2_S...) are always searched that way. Without a matrix (ONNX schemes, or no ``imatrix_path``) the torch
grids are bit-exact and the search is exact as it is. The record says which (``search_rounding``,
``export_rounding``, per group ``rounding``). Memory: one layer's inputs and outputs over all calibration
tokens, plus the search subset.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from toolkit.compress.quant.base import QuantGrid
from toolkit.compress.quant.export_rounding import LinearRounding, clip_groups, export_round, linear_roundings
from toolkit.compress.quant.ggml_lib import LibggmlGrid
from toolkit.compress.quant.gptq import GPTQ_TYPES, gptq_round, output_error
from toolkit.compress.quant.grids import get_grid, grid_for_row
from toolkit.compress.quant.rtn import decoder_layers, resolve_text_family
from toolkit.core.errors import BedsideError
from toolkit.core.heap import release_free_heap
from toolkit.model.architectures import ScaleGroup, TextFamily

# Export grid -> the grid the search quantizes with (same bits, cheap emulation).
SEARCH_STAND_INS: dict[str, str] = {"Q4_K": "asym4_g32", "Q5_K": "Q5_1", "Q6_K": "sym6_g16"}
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5
NO_CLIP_LINEARS: tuple[str, ...] = ("q_proj", "k_proj")
SEARCH_ROUNDINGS: tuple[str, ...] = ("rerank", "exact", "emulated")
PROPAGATIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
ALPHA_SEARCHES: tuple[str, ...] = ("climb", "refine", "grid")
SEARCH_PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
BF16_SEARCH_MAX_BITS = 6  # bfloat16 keeps 8 significant bits: it cannot resolve an 8-bit grid
BF16_NOISE_SHARE = 0.01  # auto: bfloat16 where its own error on the group's output is <= 1 % of the RTN loss
CLIP_RERANK_STEPS: tuple[float, ...] = (0.0, 0.05, -0.05)  # around the emulated best ratio, plus ratio 1
CLIP_OUT_ROWS = 256  # output rows per clip-error product (memory: 256 x in float32 differences)
CLIP_DENSE_DOWN_TO = 0.7  # every group tries the ratios down to this; below, only groups still improving
CLIP_FRONTIER_WINDOW = 2  # below CLIP_DENSE_DOWN_TO: groups whose best is one of the last this many ratios
CLIP_FRONTIER_CHUNK = 4096  # groups per gathered Gram product below CLIP_DENSE_DOWN_TO (memory: 4096 x gs^2)


@dataclass
class AwqResult:
    """The model with AWQ scales folded and clipping applied (float weights), and the record.

    ``record``: ``method``, ``scheme``, ``export_grid``, ``search_grid``, ``n_grid``, ``alphas``,
    ``clip``, ``calibration`` (sequences, tokens, search tokens), ``layers`` (per layer: per group
    ``alpha``, ``loss``, ``loss_rtn`` (alpha 0), or ``skipped``; per clipped linear the mean and min
    ratio and the fraction of groups clipped), ``clip_summary``, ``seconds``, ``imatrix``.
    """

    model: nn.Module
    record: dict[str, Any]


class _StopForward(Exception):
    """Raised by the hook on layer 0 once its inputs are captured."""


def search_grid_for(scheme: str, ncols: int | None = None) -> QuantGrid:
    """The grid the AWQ search quantizes with for ``scheme`` on rows of ``ncols`` inputs.

    First the grid the exporter stores such rows in (``grid_for_row``: llama.cpp demotes k-quants
    whose 256-block does not divide the row), then a fast stand-in for a remaining k-quant.
    """
    grid = get_grid(scheme) if ncols is None else grid_for_row(scheme, ncols)
    return get_grid(SEARCH_STAND_INS.get(grid.name, grid.name))


def _search_grid(rounding: LinearRounding) -> QuantGrid | None:
    """The torch grid the search emulates ``rounding`` with (stand-in for k-quants); None where only libggml
    rounds that type (Q2_K, IQ types): every candidate is then rounded exactly."""
    grid = rounding.grid
    if isinstance(grid, LibggmlGrid):
        return None
    return get_grid(SEARCH_STAND_INS.get(grid.name, grid.name))


def _search_is_exact(rounding: LinearRounding) -> bool:
    """Whether the torch grid the search uses is the export's rounding itself (no stand-in, no matrix)."""
    grid = _search_grid(rounding)
    return rounding.emulation_is_exact and grid is not None and grid.name == rounding.grid.name


def fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 / AMX via oneDNN): autocast is then ~3x faster
    than float32 here; without it, bfloat16 is emulated and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _bfloat16_is_fast(device: torch.device) -> bool:
    """What ``auto`` precisions go by: a CPU that multiplies bfloat16 natively (``fast_bfloat16``)."""
    return device.type == "cpu" and fast_bfloat16()


def resolve_search_precision(precision: str, device: torch.device) -> str:
    """``auto`` stays ``auto`` (bfloat16 per group where it measures fine, ``_search_scale``) on a CPU with native
    bfloat16, else becomes ``float32``; explicit names pass through."""
    if precision not in SEARCH_PRECISIONS:
        raise BedsideError(f"search_precision must be one of {', '.join(SEARCH_PRECISIONS)}, got {precision!r}")
    if precision == "auto" and not _bfloat16_is_fast(device):
        return "float32"
    return precision


def resolve_propagation(propagation: str, device: torch.device) -> str:
    """``auto`` -> ``bfloat16`` on a CPU with native bfloat16, else ``float32``; explicit names pass through."""
    if propagation not in PROPAGATIONS:
        raise BedsideError(f"propagation must be one of {', '.join(PROPAGATIONS)}, got {propagation!r}")
    if propagation != "auto":
        return propagation
    return "bfloat16" if _bfloat16_is_fast(device) else "float32"


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@torch.no_grad()
def _capture_layer0_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(hidden states, other kwargs) entering decoder layer 0, one entry per mini-batch.

    The forward gets an all-ones ``attention_mask``: without one, transformers checks ``position_ids`` for packed
    sequences and materialises a ``[batch, 1, T, T]`` causal mask; with it, SDPA models pass no mask and attend with
    ``is_causal`` (the same numbers; the kernel skips the masked half and grouped-query heads are not copied).
    Eager attention still builds its mask.
    """
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for key in ("hidden_states", "past_key_values", "past_key_value"):
            kwargs.pop(key, None)
        kwargs["use_cache"] = False
        captured.append((hidden.detach(), kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        handle.remove()
    return captured


def _scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max(m, 1e-4)^alpha / sqrt(max * min)`` (llm-awq's normalisation)."""
    s = mean_abs.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def _fold(layer: nn.Module, group: ScaleGroup, s: torch.Tensor, norm_offset: float) -> None:
    """Fold ``s`` into the group: linears' columns times s, the producer of their input divided by s.

    Written in place (``copy_``): a checkpoint loaded by memory map keeps its pages mapped while any of its
    tensors lives, so a replaced tensor would hold the file's pages and the new copy's at once.
    """
    prev = layer.get_submodule(group.prev_op)
    weight = prev.weight.data
    if isinstance(prev, nn.Linear):
        weight.copy_(weight.to(torch.float32) / s[:, None])
    else:
        weight.copy_((weight.to(torch.float32) + norm_offset) / s - norm_offset)
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.data.copy_(bias.data.to(torch.float32) / s)
    for name in group.linears:
        weight = layer.get_submodule(name).weight.data
        weight.copy_(weight.to(torch.float32) * s[None, :])


def _group_applies(layer: nn.Module, group: ScaleGroup) -> bool:
    """False for v -> o under grouped-query attention (v's outputs are fewer than o's inputs)."""
    if not group.only_if_same_shape:
        return True
    prev = layer.get_submodule(group.prev_op)
    first = layer.get_submodule(group.linears[0])
    return isinstance(prev, nn.Linear) and prev.out_features == first.in_features


Quantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (weight, clip ratio [out, G]) -> Q(weight)


@torch.no_grad()
def group_grams(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """``X_g^T X_g`` of each group of ``size`` consecutive inputs of ``inputs [T, in]`` (zero-padded): ``[G, size, size]``
    in float64 (the sum over tokens, not the mean)."""
    n_groups = -(-inputs.shape[1] // size)
    pad = n_groups * size - inputs.shape[1]
    x = torch.nn.functional.pad(inputs, (0, pad)) if pad else inputs
    x = x.to(torch.float32).reshape(-1, n_groups, size).permute(1, 0, 2)  # [G, T, gs]
    return torch.bmm(x.transpose(1, 2), x).to(torch.float64)


def sub_grams(grams: torch.Tensor, size: int) -> torch.Tensor:
    """The ``[G * B / size, size, size]`` diagonal sub-blocks of block Grams ``[G, B, B]`` (``size`` divides ``B``)."""
    blocks, big, _ = grams.shape
    if size == big:
        return grams
    parts = [grams[:, i : i + size, i : i + size] for i in range(0, big, size)]
    return torch.stack(parts, dim=1).reshape(blocks * (big // size), size, size)


def _scaled_grams(grams: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Block Grams of the scaled inputs ``x / s`` from those of ``x``: ``H_g / (s_g s_g^T)``."""
    blocks, size, _ = grams.shape
    inverse = torch.nn.functional.pad(1.0 / s.to(torch.float64), (0, blocks * size - s.shape[0]), value=1.0)
    inverse = inverse.reshape(blocks, size)
    return grams * inverse[:, :, None] * inverse[:, None, :]


def _search_clip(
    weight: torch.Tensor,
    grams: torch.Tensor,
    quantize: Quantizer,
    group_size: int,
    candidates: Sequence[float | torch.Tensor],
    dense_down_to: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best clip ratio per [out, group] and its error: minimises ``sum_t (x_g . (W_g - Q_r(W)_g))^2``.

    The error is a quadratic form in the group's weight difference ``d = W_g - Q_r(W)_g`` with the group's
    input Gram matrix: ``sum_t (x_g . d)^2 = d^T H_g d``, ``H_g = X_g^T X_g`` (``grams``: ``[G, gs, gs]``,
    ``group_grams``; the products in float32, as ``group_grams`` sums each batch), so each candidate costs
    ``out x in x gs`` multiply-adds instead of ``out x in x T`` (llm-awq's direct product over the tokens; the
    same numbers up to rounding). ``candidates``: uniform ratios, or ``[out, n_groups]`` ratio tensors (one ratio
    per group). ``dense_down_to`` (uniform ratios in descending order, a quantizer that rounds each group on its
    own): every group tries the ratios down to it; each ratio below is tried only by the groups whose best so
    far is one of the last ``CLIP_FRONTIER_WINDOW`` ratios tried (still improving), gathered as
    ``[n, group_size]`` blocks, until none is left.
    """
    out_features, in_features = weight.shape
    size = group_size
    n_groups = -(-in_features // size)
    pad = n_groups * size - in_features
    gram = grams[:n_groups].to(torch.float32)  # Grams of larger blocks may end in sub-blocks of padding only
    w = torch.nn.functional.pad(weight, (0, pad)) if pad else weight
    best_err = torch.full((out_features, n_groups), math.inf)
    best_ratio = torch.ones((out_features, n_groups))
    tried: list[float] = []  # uniform ratios tried so far, descending
    frontier = dense_down_to is not None and not pad  # (a padded last group would be quantized with its zeros)
    for candidate in candidates:
        if frontier and len(tried) >= CLIP_FRONTIER_WINDOW and float(candidate) < dense_down_to:
            # [n, 2]: (row, group) whose best is one of the last CLIP_FRONTIER_WINDOW ratios (still improving)
            active = (best_ratio <= tried[-CLIP_FRONTIER_WINDOW]).nonzero()
            if active.shape[0] == 0:
                break
            blocks = w.reshape(out_features, n_groups, size)
            for first in range(0, active.shape[0], CLIP_FRONTIER_CHUNK):
                rows, groups = active[first : first + CLIP_FRONTIER_CHUNK].unbind(1)
                block = blocks[rows, groups]  # [n, size]
                ratio = torch.full((block.shape[0], 1), float(candidate))
                diff = block - quantize(block, ratio).to(torch.float32)
                err = torch.einsum("ni,nij,nj->n", diff, gram[groups], diff)
                better = err < best_err[rows, groups]
                best_err[rows[better], groups[better]] = err[better]
                best_ratio[rows[better], groups[better]] = float(candidate)
            tried.append(float(candidate))
            continue
        if isinstance(candidate, float | int):
            tried.append(float(candidate))
        ratio = torch.broadcast_to(torch.as_tensor(candidate, dtype=torch.float32), (out_features, n_groups))
        quantized = quantize(weight, ratio).to(torch.float32)
        if pad:
            quantized = torch.nn.functional.pad(quantized, (0, pad))
        err = torch.empty((out_features, n_groups))
        for first in range(0, out_features, CLIP_OUT_ROWS):  # CLIP_OUT_ROWS rows of differences at a time
            last = min(first + CLIP_OUT_ROWS, out_features)
            diff = (w[first:last] - quantized[first:last]).reshape(-1, n_groups, size)
            diff = diff.permute(1, 0, 2)  # [G, rows, gs]
            err[first:last] = (torch.bmm(diff, gram) * diff).sum(-1).transpose(0, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratio, best_ratio)
    return best_ratio, best_err


@torch.no_grad()
def _apply_clip(weight: torch.Tensor, grid: QuantGrid, ratio: torch.Tensor) -> torch.Tensor:
    """Clamp each [out, group] of ``weight`` to ``±ratio * max|w|`` (float; the exporter rounds)."""
    return clip_groups(weight, grid.group_size, ratio)


def _emulated(grid: QuantGrid) -> Quantizer:
    return lambda weight, ratio: grid.fake_quantize(weight, clip_ratio=ratio)


def _exact(rounding: LinearRounding, imatrix: torch.Tensor) -> Quantizer:
    return lambda weight, ratio: export_round(weight, rounding, imatrix, clip_ratio=ratio)


@torch.no_grad()
def _clip_linear(
    weight: torch.Tensor,
    grams: torch.Tensor,
    rounding: LinearRounding,
    imatrix: torch.Tensor,
    mode: str,
    ratios: Sequence[float],
    dense_down_to: float | None = None,
) -> tuple[torch.Tensor, int, str]:
    """Clip ratios of one scaled linear: (ratio [out, G], group size, how candidates were rounded).

    ``grams``: the scaled inputs' block Grams ``[G, B, B]`` (``group_grams``), ``B`` a multiple of every group size.

    ``emulated``: every ratio on the torch grid (exact where that grid is bit-exact with the export; below
    ``dense_down_to`` only for the groups still improving, ``_search_clip``);
    ``exact``: every ratio with the export's rounding (libggml + matrix); ``rerank``: the emulated best
    ratio ``r*`` per group, then per group the best by the export's rounding of ``{r*, r* +- 0.05, 1}``.
    """
    grid = _search_grid(rounding)
    exact_size = rounding.exact_grid(imatrix).group_size
    if grid is None or mode == "exact" or (mode == "rerank" and grid.group_size != exact_size):
        ratio, _ = _search_clip(weight, sub_grams(grams, exact_size), _exact(rounding, imatrix), exact_size, ratios)
        return ratio, exact_size, "exact"
    ratio, _ = _search_clip(
        weight, sub_grams(grams, grid.group_size), _emulated(grid), grid.group_size, ratios, dense_down_to
    )
    if mode != "rerank" or _search_is_exact(rounding):
        return ratio, grid.group_size, "exact" if _search_is_exact(rounding) else "emulated"
    low, high = min(ratios), max(ratios)
    candidates = [(ratio + step).clamp(low, high) for step in CLIP_RERANK_STEPS] + [torch.tensor(high)]
    ratio, _ = _search_clip(weight, sub_grams(grams, exact_size), _exact(rounding, imatrix), exact_size, candidates)
    return ratio, exact_size, "rerank"


class _LayerStats:
    """Per-linear input statistics of one layer, gathered by forward hooks."""

    def __init__(
        self,
        layer: nn.Module,
        groups: Sequence[ScaleGroup],
        search_batches: set[int],
        extra: Sequence[str] = (),
        gram_batches: set[int] = frozenset(),
        block: int = 0,
        block_for: set[str] = frozenset(),  # linears the clipping search runs on: their inputs' block Grams
        gram_for: set[str] = frozenset(),  # linears GPTQ rounds: their inputs' X^T X is gathered
    ) -> None:
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}  # X^T X per input, over the gram batches (GPTQ's Hessian)
        self.gram_tokens: dict[str, int] = {}
        self._gram_batches = gram_batches
        self.tokens = 0
        self.block_grams: dict[str, torch.Tensor] = {}  # per input, X^T X of each block of `block` inputs
        self._block = block
        self.inspect_calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]]] = {}
        self.batch = 0
        self._search_batches = search_batches
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # The linears of a scale group read one input (the group's producer): hook the first, share its sums.
        self.source: dict[str, str] = {name: name for name in extra}
        for group in groups:
            self.source.update({name: group.linears[0] for name in group.linears})
        self._gram_for = {self.source[name] for name in gram_for}  # the inputs whose X^T X GPTQ needs
        self._block_for = {self.source[name] for name in block_for}  # the inputs the clipping search reads
        for name in sorted(set(self.source.values())):
            self._handles.append(layer.get_submodule(name).register_forward_hook(self._linear_hook(name)))
        for inspect in sorted({group.inspect for group in groups}):
            module = layer.get_submodule(inspect)
            self._handles.append(module.register_forward_hook(self._inspect_hook(inspect), with_kwargs=True))

    def _linear_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            # the pass may run under bfloat16 autocast (propagation): the sums and Grams stay float32 (autocast
            # would round bmm's Grams to bfloat16, and run several times slower)
            with torch.autocast(args[0].device.type, enabled=False):
                self._gather(name, args[0].detach().reshape(-1, args[0].shape[-1]))

        return hook

    def _gather(self, name: str, x: torch.Tensor) -> None:
        """Add one batch of input ``x [T, in]`` of linear ``name`` to its sums and Grams."""
        if name not in self.abs_sum:
            self.abs_sum[name] = torch.zeros(x.shape[1], dtype=torch.float64)
            self.sq_sum[name] = torch.zeros(x.shape[1], dtype=torch.float64)
        if self._block and name in self._block_for:
            grams = group_grams(x, self._block)
            if name in self.block_grams:
                self.block_grams[name] += grams
            else:
                self.block_grams[name] = grams
        if self.batch in self._gram_batches and name in self._gram_for:
            x32 = x.to(torch.float32)
            if name not in self.gram:
                self.gram[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32)
                self.gram_tokens[name] = 0
            self.gram[name].addmm_(x32.T, x32)
            self.gram_tokens[name] += x32.shape[0]
        # float32 within a batch (torch's cascade sum), float64 across batches: 3x faster than float64 sums;
        # one float32 copy worked in place (|x|, then x^2): fresh temporaries cost more than the sums
        work = x.to(torch.float32, copy=True).abs_()
        self.abs_sum[name] += work.sum(0).to(torch.float64)
        self.sq_sum[name] += work.mul_(work).sum(0).to(torch.float64)

    def _inspect_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self.batch in self._search_batches:
                call = (args, dict(kwargs), _first_output(output).detach())
                self.inspect_calls.setdefault(name, []).append(call)

        return hook

    def remove(self) -> None:
        """Drop the hooks; every linear then has its sums (those of its group's first linear)."""
        for handle in self._handles:
            handle.remove()
        for name, source in self.source.items():
            if source in self.abs_sum:
                self.abs_sum[name] = self.abs_sum[source]
                self.sq_sum[name] = self.sq_sum[source]
            if source in self.block_grams:
                self.block_grams[name] = self.block_grams[source]


@dataclass
class _ScaleChoice:
    """One group's scale search: chosen alpha, its loss (export rounding where evaluated), RTN's, scales."""

    alpha: float
    loss: float
    loss_rtn: float
    scales: torch.Tensor
    rounding: str  # "exact" (every candidate rounded as the export), "rerank", "emulated"
    loss_emulated: float | None = None  # the chosen alpha's loss on the emulation (rerank only)
    reranked: tuple[float, ...] = ()
    evaluated: int = 0  # alphas whose loss was computed (on the emulation under rerank)
    precision: str = "float32"  # of the candidates' forward passes (the reference is always float32)
    bf16_noise: float | None = None  # auto: bfloat16's own loss over the RTN loss (measured where <= 6 bits)


def _group_mode(roundings: Sequence[LinearRounding], mode: str) -> str:
    """How a group's candidates are rounded: ``exact`` when the emulation is the export's rounding or none
    exists, else the requested mode (``rerank`` / ``exact`` / ``emulated``)."""
    if all(_search_is_exact(rounding) or not rounding.quantized for rounding in roundings):
        return "exact"
    if any(rounding.quantized and _search_grid(rounding) is None for rounding in roundings):
        return "exact"
    return mode


def _alpha_order(alphas: Sequence[float], alpha_search: str, losses: dict[float, float]) -> Any:
    """The alphas to evaluate, given the losses found so far (a generator, read as ``losses`` fills; alphas
    already in ``losses`` are not yielded again).

    ``grid``: every alpha. ``refine``: every second alpha (both ends included), then the two grid neighbours of
    the best of those: on a loss that is unimodal in alpha this finds the grid's minimum with
    ``n_grid // 2 + 3`` evaluations (one more for odd ``n_grid``) instead of ``n_grid + 1`` (8 of 11 at the default).
    ``climb``: every third alpha below the last two, and the last (``0, 0.3, 0.6, 1`` at the default), then
    the best one's unevaluated neighbours, again until the best has both neighbours evaluated (a local minimum
    of the grid): the grid's minimum on a unimodal loss, with 6-7 evaluations at the default.
    """
    if alpha_search == "grid" or len(alphas) <= 3:
        yield from (alpha for alpha in alphas if alpha not in losses)
        return
    if alpha_search == "climb":
        yield from (alphas[i] for i in [*range(0, len(alphas) - 2, 3), len(alphas) - 1] if alphas[i] not in losses)
        while True:
            best = alphas.index(min(losses, key=lambda a: (losses[a], a)))
            new = [alphas[i] for i in (best - 1, best + 1) if 0 <= i < len(alphas) and alphas[i] not in losses]
            if not new:
                return
            yield from new
    coarse = list(alphas[::2]) if (len(alphas) - 1) % 2 == 0 else [*alphas[::2], alphas[-1]]
    yield from (alpha for alpha in coarse if alpha not in losses)
    best = alphas.index(min(coarse, key=lambda a: (losses[a], a)))
    for neighbour in (best - 1, best + 1):
        if 0 <= neighbour < len(alphas) and alphas[neighbour] not in losses:
            yield alphas[neighbour]


@torch.no_grad()
def _search_scale(
    layer: nn.Module,
    group: ScaleGroup,
    mean_abs: torch.Tensor,
    mean_sq: torch.Tensor,
    calls: list[tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]],
    roundings: Sequence[LinearRounding],
    alphas: Sequence[float],
    mode: str = "rerank",
    rerank: int = 3,
    alpha_search: str = "climb",
    precision: str = "float32",
) -> _ScaleChoice:
    """Search alpha for one group (module docstring, step 2), over ``alphas`` or, with ``climb`` / ``refine``, a
    coarse subset and the neighbours of the best (``_alpha_order``).

    Candidate ``alpha`` rounds each linear ``W_k`` as ``Q_k(W_k diag(s)) diag(s)^-1`` where ``Q_k`` is the
    export's rounding of ``W_k`` with the matrix the export will pass for the scaled model,
    ``imatrix = mean_t x_t^2 / s^2`` (exact, libggml), or its torch emulation. ``rerank``: all alphas on the
    emulation, then the ``rerank`` best and ``alpha = 0`` (RTN) again with exact rounding, the best of those
    by exact loss chosen.

    ``precision`` (``resolve_search_precision``): the candidates' forward passes in ``float32``, in ``bfloat16``
    (autocast; the reference outputs stay float32), or ``auto``: bfloat16 for a group whose grids have at most
    ``BF16_SEARCH_MAX_BITS`` bits and where bfloat16's own error, ``noise = loss_bf16(W) / loss_bf16(alpha = 0)``
    (``loss_bf16(W)``: the float weights through the bfloat16 pass), is at most ``BF16_NOISE_SHARE``; float32
    otherwise (the massive activations of an attention sink make bfloat16's error on them comparable to the
    rounding's: docs/BENCHMARKS.md).
    """
    inspect = layer.get_submodule(group.inspect)
    linears = [layer.get_submodule(name) for name in group.linears]
    originals = [linear.weight.data for linear in linears]
    mode = _group_mode(roundings, mode)

    def output_loss(low: bool) -> float:
        """Mean squared difference of the inspect module's output from the float32 reference."""
        total, count = 0.0, 0
        for args, kwargs, reference in calls:
            with torch.autocast(reference.device.type, dtype=torch.bfloat16, enabled=low):
                out = _first_output(inspect(*args, **kwargs)).to(torch.float32)
            total += float((out - reference.to(torch.float32)).pow(2).sum())
            count += reference.numel()
        return total / max(count, 1)

    def loss_of(alpha: float, exact: bool, low: bool) -> float:
        s = _scales(mean_abs, alpha)
        matrix = mean_sq / s.pow(2)
        for linear, weight, rounding in zip(linears, originals, roundings, strict=True):
            scaled = weight.to(torch.float32) * s[None, :]
            if not rounding.quantized:
                continue
            if exact:
                quantized = export_round(scaled, rounding, matrix)
            else:
                grid = _search_grid(rounding)
                assert grid is not None  # _group_mode chose exact otherwise
                quantized = grid.fake_quantize(scaled)
            linear.weight.data = (quantized / s[None, :]).to(weight.dtype)
        return output_loss(low)

    try:
        first: dict[float, float] = {}
        low, noise = precision == "bfloat16", None
        coarse_bits = max((rounding.grid.bits for rounding in roundings if rounding.quantized), default=16)
        if precision == "auto" and coarse_bits <= BF16_SEARCH_MAX_BITS:
            low = True  # measure bfloat16's own error (float weights) against the RTN loss, both in bfloat16
            floor = output_loss(low)
            first[alphas[0]] = loss_of(alphas[0], exact=mode == "exact", low=True)
            noise = floor / first[alphas[0]] if first[alphas[0]] > 0 else math.inf
            if noise > BF16_NOISE_SHARE:
                low, first = False, {}
        for alpha in _alpha_order(alphas, alpha_search, first):
            first[alpha] = loss_of(alpha, exact=mode == "exact", low=low)
        how = {"precision": "bfloat16" if low else "float32", "bf16_noise": noise}
        if mode != "rerank":
            alpha = min(first, key=lambda a: (first[a], a))
            return _ScaleChoice(
                alpha, first[alpha], first[alphas[0]], _scales(mean_abs, alpha), mode, evaluated=len(first), **how
            )
        ranked = sorted(first, key=lambda a: (first[a], a))[: max(1, rerank)]
        finalists = tuple(sorted({alphas[0], *ranked}))
        exact = {alpha: loss_of(alpha, exact=True, low=low) for alpha in finalists}
        alpha = min(exact, key=lambda a: (exact[a], a))
        return _ScaleChoice(
            alpha,
            exact[alpha],
            exact[alphas[0]],
            _scales(mean_abs, alpha),
            "rerank",
            first[alpha],
            finalists,
            len(first),
            **how,
        )
    finally:
        for linear, weight in zip(linears, originals, strict=True):
            linear.weight.data = weight


def _check_shapes(layers: nn.ModuleList, family: TextFamily, scheme: str) -> None:
    for group in family.awq_groups:
        for name in group.linears:
            module = layers[0].get_submodule(name)
            grid_for_row(scheme, module.in_features).check_shape(tuple(module.weight.shape))


def _progress(enabled: bool) -> Any:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=False,
    )


@torch.no_grad()
def awq(
    model: nn.Module, calib_ids: torch.Tensor, scheme: str, *, progress: bool = True, **knobs: Any
) -> AwqResult:
    """Run AWQ on ``model`` in place (see the module docstring for the formulas), layer by layer with a progress bar.

    ``knobs`` are AwqSearch's keyword arguments (n_grid, clip, imatrix_path, search_tokens, ...), documented
    there. Returns AwqResult with the same model object (weights scaled, folded, clipped; still float).
    """
    search = AwqSearch(model, calib_ids, scheme, **knobs)
    layers = decoder_layers(model, search.family)
    was_training = model.training
    model.eval()
    inputs = _capture_layer0_inputs(model, layers, search.batches)
    with _progress(progress) as bar:
        task = bar.add_task(f"AWQ {scheme} (search {search.grid.name})", total=len(layers))
        for index, layer in enumerate(layers):
            inputs = search.layer(index, layer, inputs)
            bar.update(task, advance=1, description=f"AWQ {scheme} layer {index + 1}/{len(layers)}")
    if was_training:
        model.train()
    return AwqResult(model=model, record=search.finish())


class AwqSearch:
    """One AWQ run, layer by layer: what every layer shares (roundings, batches, alphas) and what the
    layers add up to (importance matrix, records). ``awq`` drives it over a model in memory;
    ``toolkit.compress.sequential`` drives it over one loaded block at a time.

    Args:
        calib_ids: ``[n_sequences, seq_len]`` token ids (e.g. ``toolkit.data.make_blocks(...).input_ids``).
        scheme: export scheme or grid name (``Q4_0``, ``Q4_K_M``, ``int4_b32``, ``asym4_g64``...).
        n_grid: alphas ``0, 1/n_grid, ..., 1`` (n_grid + 1 values). llm-awq uses 20 on a GPU; the
            search costs n_grid x search_tokens forward passes of each group's block per layer (the
            largest term on a CPU), so the defaults (10, 1024 tokens) halve each; docs/BENCHMARKS.md
            shows AWQ still beating RTN with them.
        clip: run the clipping search after scaling.
        clip_ratios: the clipping search's ratios (tried from the largest down).
        clip_dense_down_to: every group tries the ratios down to this one; below it, on the torch grids, only
            the groups whose best is one of the last two ratios tried (``_search_clip``); None: every ratio
            for every group.
        imatrix_path: where to write the llama.cpp importance matrix (GGUF) of the scaled model. Given, the
            export is assumed to pass it to llama.cpp's quantizer, so the search rounds as libggml does with
            that matrix (``search_rounding``); without it, as the export without a matrix does.
        search_tokens: tokens (whole sequences, evenly spread) on which the alpha loss is measured;
            ``mean|x|`` and the importance matrix always use every calibration token.
        batch_size: sequences per forward pass (4: half the transient activations of 8, no slower: docs/BENCHMARKS.md).
        search_rounding: where the export's rounding differs from every torch emulation (GGUF with a
            matrix): ``rerank`` (search on the emulation, then re-rank the ``rerank`` best alphas and
            alpha 0, and the clip ratios around the best, with libggml + matrix), ``exact`` (every
            candidate with libggml + matrix; slower), ``emulated`` (the emulation only). Types with no
            emulation (Q2_K, IQ types) are always searched exactly.
        rerank: alphas re-ranked with exact rounding under ``rerank``.
        alpha_search: ``climb`` (every third alpha and the last, then the best one's neighbours until the best
            is a local minimum of the grid: 6-7 of 11 evaluations), ``refine`` (every second alpha, then the best
            one's two neighbours: 8 of 11) or ``grid`` (every alpha). The first two find the grid's minimum
            wherever the loss is unimodal in alpha.
        search_precision: the precision of the scale search's candidate passes (``_search_scale``): ``auto``
            (bfloat16 per group where the CPU multiplies it natively, the group's grids have at most 6 bits and
            bfloat16's own error measures at most 1 % of the RTN loss; float32 otherwise), ``float32``,
            ``bfloat16``. The reference outputs are float32 in every case.
        propagation: the precision of the pass over the calibration sequences that are not searched (their
            statistics ``mean|x|``, ``mean x^2`` and the next layer's inputs): ``bfloat16`` (CPU autocast),
            ``float32``, or ``auto`` (bfloat16 where the CPU multiplies it natively). The search sequences,
            whose outputs are the loss's reference, always run in float32.
        gptq: after scaling and clipping, round each ``Q4_0`` / ``Q5_0`` linear of a GGUF export by GPTQ
            (toolkit/compress/quant/gptq.py) on the export's exact grid, so the saved weights *are* the codes
            the export writes; other types keep the float weights for the export to round.
        gptq_tokens: calibration tokens (whole batches, the search sequences first) in GPTQ's ``X^T X``.
        storage_dtype: the dtype the checkpoint is saved in (GPTQ's steps keep every value exact in it).
    """

    @torch.no_grad()
    def __init__(
        self,
        model: nn.Module,
        calib_ids: torch.Tensor,
        scheme: str,
        *,
        n_grid: int = 10,
        clip: bool = True,
        imatrix_path: str | Path | None = None,
        search_tokens: int = 1024,
        batch_size: int = 4,
        clip_ratios: Sequence[float] = CLIP_RATIOS,
        clip_dense_down_to: float | None = CLIP_DENSE_DOWN_TO,
        search_rounding: str = "rerank",
        rerank: int = 3,
        propagation: str = "auto",
        alpha_search: str = "climb",
        search_precision: str = "auto",
        gptq: bool = False,
        gptq_tokens: int = 8192,
        storage_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.start_time = time.perf_counter()
        if calib_ids.ndim != 2 or calib_ids.shape[0] < 1:
            raise BedsideError(f"calibration ids must be [n_sequences, seq_len], got {tuple(calib_ids.shape)}")
        if n_grid < 1:
            raise BedsideError(f"n_grid must be at least 1, got {n_grid}")
        if alpha_search not in ALPHA_SEARCHES:
            raise BedsideError(f"alpha_search must be one of {', '.join(ALPHA_SEARCHES)}, got {alpha_search!r}")
        if search_rounding not in SEARCH_ROUNDINGS:
            raise BedsideError(
                f"search_rounding must be one of {', '.join(SEARCH_ROUNDINGS)}, got {search_rounding!r}"
            )
        family = resolve_text_family(model)
        layers = decoder_layers(model, family)
        self.family = family
        self.scheme = scheme
        self.export_grid = get_grid(scheme)
        self.grid = search_grid_for(scheme)  # for the progress line and the record; linears pick theirs by type
        _check_shapes(layers, family, scheme)
        self.imatrix_path = imatrix_path
        self.with_imatrix = imatrix_path is not None
        widths = {
            f"{family.layers_path}.{index}.{name}": module.in_features
            for index, layer in enumerate(layers)
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear)
        }
        self.roundings = linear_roundings(model, scheme, widths, self.with_imatrix)
        self.search_grids: set[str] = set()
        self.export_types: set[str] = set()
        self.modes: dict[str, int] = {}
        device = next(model.parameters()).device
        device = torch.device("cpu") if device.type == "meta" else device
        self.propagation = resolve_propagation(propagation, device)
        self.search_precision = resolve_search_precision(search_precision, device)
        self.precisions: dict[str, int] = {}
        self.device_type = device.type
        calib_ids = calib_ids.to(device)
        self.n_seq, self.seq_len = n_seq, seq_len = calib_ids.shape
        batch_size = max(1, min(batch_size, n_seq))
        self.alphas = [i / n_grid for i in range(n_grid + 1)]
        self.n_grid = n_grid
        self.clip = clip
        self.clip_ratios = tuple(sorted(clip_ratios, reverse=True))
        self.clip_dense_down_to = clip_dense_down_to
        self.search_rounding = search_rounding
        self.rerank = rerank
        self.alpha_search = alpha_search
        self.alphas_evaluated = 0

        # Whole sequences for the search, evenly spread; they form the first mini-batches.
        n_search = max(1, min(n_seq, math.ceil(search_tokens / seq_len)))
        search_seqs = sorted({round(i * (n_seq - 1) / max(n_search - 1, 1)) for i in range(n_search)})
        rest = [i for i in range(n_seq) if i not in set(search_seqs)]
        batches = [calib_ids[search_seqs[i : i + batch_size]] for i in range(0, len(search_seqs), batch_size)]
        self.search_batches = set(range(len(batches)))
        batches += [calib_ids[rest[i : i + batch_size]] for i in range(0, len(rest), batch_size)]
        self.batches = batches
        self.search_token_count = len(search_seqs) * seq_len
        self.gptq = gptq
        self.storage_dtype = storage_dtype
        gram_count = max(1, math.ceil(gptq_tokens / seq_len))  # sequences, in batch order
        self.gram_batches: set[int] = set()
        if gptq:
            seen = 0
            for number, batch in enumerate(batches):
                if seen >= gram_count:
                    break
                self.gram_batches.add(number)
                seen += batch.shape[0]
        self.gram_token_count = 0
        self.gptq_totals = {
            "linears": 0, "kept_export_rounding": 0, "error_export": 0.0, "error_gptq": 0.0, "blocks": 0,
            "blocks_differing": 0,
        }  # fmt: skip
        self.in_sum2: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.layer_records: list[dict[str, Any]] = []
        # clip-ratio totals for the summary, not the ratios (one float per row and group of every linear)
        self.clip_groups, self.clip_ratio_sum, self.clip_groups_clipped = 0, 0.0, 0

    @torch.no_grad()
    def layer(
        self, index: int, layer: nn.Module, inputs: list[tuple[torch.Tensor, dict[str, Any]]]
    ) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """Steps 1-5 of the module docstring on decoder layer ``index`` (in place); its float outputs."""
        family = self.family
        roundings = self.roundings
        search_rounding = self.search_rounding
        prefix = f"{family.layers_path}.{index}"
        groups = [group for group in family.awq_groups if _group_applies(layer, group)]
        skipped = [group for group in family.awq_groups if group not in groups]
        linear_names = [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]
        clipped = [name for group in groups for name in group.linears if self._clips(f"{prefix}.{name}")]
        stats = _LayerStats(
            layer, groups, self.search_batches, extra=linear_names, gram_batches=self.gram_batches,
            block=self._clip_block([f"{prefix}.{name}" for name in clipped], layer, prefix),
            block_for=set(clipped),
            gram_for={name for name in linear_names if self._gptq_rounds(f"{prefix}.{name}")},
        )  # fmt: skip
        outputs: list[tuple[torch.Tensor, dict[str, Any]]] = []
        try:
            for batch, (hidden, kwargs) in enumerate(inputs):
                stats.batch = batch
                low = self.propagation == "bfloat16" and batch not in self.search_batches
                with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=low):
                    output = _first_output(layer(hidden, **kwargs)).detach()
                outputs.append((output.to(hidden.dtype), kwargs))
        finally:
            stats.remove()
        stats.tokens = self.n_seq * self.seq_len

        # 2. scale search per group, on the original weights
        record_groups: list[dict[str, Any]] = []
        chosen: list[tuple[ScaleGroup, torch.Tensor]] = []
        for group in groups:
            first = group.linears[0]
            group_roundings = [roundings[f"{prefix}.{name}"] for name in group.linears]
            types = sorted({rounding.type_name for rounding in group_roundings})
            names = sorted({(g.name if (g := _search_grid(r)) else r.type_name) for r in group_roundings})
            self.search_grids.update(names)
            self.export_types.update(types)
            mean_abs = (stats.abs_sum[first] / stats.tokens).to(torch.float32)
            mean_sq = (stats.sq_sum[first] / stats.tokens).to(torch.float32)
            choice = _search_scale(
                layer,
                group,
                mean_abs,
                mean_sq,
                stats.inspect_calls[group.inspect],
                group_roundings,
                self.alphas,
                search_rounding,
                self.rerank,
                self.alpha_search,
                self.search_precision,
            )
            self.alphas_evaluated += choice.evaluated
            self.precisions[choice.precision] = self.precisions.get(choice.precision, 0) + 1
            self.modes[choice.rounding] = self.modes.get(choice.rounding, 0) + 1
            chosen.append((group, choice.scales))
            entry: dict[str, Any] = {
                "prev_op": group.prev_op,
                "linears": list(group.linears),
                "grid": names[0] if len(names) == 1 else names,
                "export_types": types,
                "rounding": choice.rounding,
                "alpha": choice.alpha,
                "loss": choice.loss,
                "loss_rtn": choice.loss_rtn,
                "precision": choice.precision,
            }
            if choice.bf16_noise is not None:
                entry["bf16_noise"] = choice.bf16_noise
            if choice.rounding == "rerank":
                entry["loss_emulated"] = choice.loss_emulated
                entry["reranked_alphas"] = list(choice.reranked)
            record_groups.append(entry)
        for group in skipped:
            record_groups.append(
                {
                    "prev_op": group.prev_op,
                    "linears": list(group.linears),
                    "skipped": "shapes differ (grouped-query attention)",
                }
            )

        # 3. fold
        scale_of: dict[str, torch.Tensor] = {}
        for group, s in chosen:
            _fold(layer, group, s, family.norm_weight_offset)
            for name in group.linears:
                scale_of[name] = s

        # 4. clipping search on the scaled weights and scaled inputs, with the scaled model's matrix
        clip_record: dict[str, Any] = {}
        if self.clip:
            for group, s in chosen:
                first = group.linears[0]
                if not any(self._clips(f"{prefix}.{name}") for name in group.linears):
                    continue
                grams = _scaled_grams(stats.block_grams[first], s)
                matrix = (stats.sq_sum[first] / stats.tokens).to(torch.float32) / s.pow(2)
                for name in group.linears:
                    if not self._clips(f"{prefix}.{name}"):
                        continue
                    rounding = roundings[f"{prefix}.{name}"]
                    linear = layer.get_submodule(name)
                    weight32 = linear.weight.data.to(torch.float32)
                    ratio, size, how = _clip_linear(
                        weight32, grams, rounding, matrix, search_rounding, self.clip_ratios, self.clip_dense_down_to
                    )
                    linear.weight.data.copy_(clip_groups(weight32, size, ratio))  # in place: see _fold
                    self.clip_groups += ratio.numel()
                    self.clip_ratio_sum += float(ratio.sum(dtype=torch.float64))
                    self.clip_groups_clipped += int((ratio < 1).sum())
                    clip_record[name] = {
                        "mean_ratio": round(float(ratio.mean()), 4),
                        "min_ratio": float(ratio.min()),
                        "fraction_clipped": round(float((ratio < 1).float().mean()), 4),
                        "rounding": how,
                    }

        # 5. importance matrix of every linear: inputs after folding are x / s
        for name in stats.sq_sum:
            s = scale_of.get(name)
            sums = stats.sq_sum[name].to(torch.float32)
            if s is not None:
                sums = sums / s.pow(2)
            full = f"{prefix}.{name}.weight"
            self.in_sum2[full] = sums.cpu().numpy()
            self.counts[full] = stats.tokens

        # 5b. GPTQ onto the export's exact grid (Q4_0 / Q5_0 linears of a GGUF export)
        gptq_record = self._gptq_layer(layer, prefix, stats, scale_of) if self.gptq else {}

        order = {group.prev_op: position for position, group in enumerate(family.awq_groups)}
        record_groups.sort(key=lambda entry: order[entry["prev_op"]])  # table order
        entry = {"layer": index, "groups": record_groups, "clip": clip_record}
        if self.gptq:
            entry["gptq"] = gptq_record
        self.layer_records.append(entry)
        del stats
        release_free_heap()  # the layer's freed activations back to the OS, not left to fragment the heap
        return outputs  # 6. next layer's inputs

    def _gptq_rounds(self, full_name: str) -> bool:
        """Whether GPTQ rounds this linear: a GGUF export stores it in a type GPTQ writes exactly."""
        rounding = self.roundings[full_name]
        return self.gptq and rounding.gguf and rounding.type_name in GPTQ_TYPES

    def _clips(self, full_name: str) -> bool:
        """Whether the clipping search runs on this linear: quantized, not q / k (NO_CLIP_LINEARS), and not rounded
        by GPTQ (whose steps come from the block's largest weight: with AWQ's clipping ratios, chosen for plain
        rounding, GPTQ did far worse on the demo, docs/BENCHMARKS.md)."""
        return (
            self.clip
            and self.roundings[full_name].quantized
            and full_name.rsplit(".", 1)[-1] not in NO_CLIP_LINEARS
            and not self._gptq_rounds(full_name)
        )

    def _clip_block(self, names: Sequence[str], layer: nn.Module, prefix: str) -> int:
        """Inputs per block of the clipping search's Grams: the largest group size (emulated or exact) of the
        linears ``names``, a multiple of every other one; 0 when none is clipped."""
        sizes: set[int] = set()
        for full in names:
            rounding = self.roundings[full]
            width = layer.get_submodule(full.removeprefix(f"{prefix}.")).in_features
            sizes.add(rounding.exact_grid(np.ones(width, dtype=np.float32)).group_size)
            if (grid := _search_grid(rounding)) is not None:
                sizes.add(grid.group_size)
        block = max(sizes, default=0)
        if any(block % size for size in sizes):
            raise BedsideError(f"AWQ clipping: group sizes {sorted(sizes)} do not nest in blocks of {block}")
        return block

    def _gptq_layer(
        self, layer: nn.Module, prefix: str, stats: _LayerStats, scale_of: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """GPTQ on every linear stored as a GPTQ type (not clipped: ``_clips``), kept where its output error
        (``tr(D H D^T) / out``, H of the scaled inputs) is below the export's own rounding of the scaled weight
        (otherwise the float weight stays for the export to round, as AWQ alone); per linear both errors, the
        choice, and the blocks the export would round differently (0 when the codes survive it)."""
        by_source: dict[str, dict[str, list[str]]] = {}  # input -> type -> the linears reading it
        for name, source in sorted(stats.source.items()):
            rounding = self.roundings[f"{prefix}.{name}"]
            if self._gptq_rounds(f"{prefix}.{name}") and source in stats.gram:
                by_source.setdefault(source, {}).setdefault(rounding.type_name, []).append(name)
        record: dict[str, Any] = {}
        for source, by_type in by_source.items():
            tokens = stats.gram_tokens[source]
            self.gram_token_count = max(self.gram_token_count, tokens)
            gram = stats.gram.pop(source)  # scaled in place: x' = x / s, H' = H / (s s^T)
            s = scale_of.get(next(iter(by_type.values()))[0])  # the linears reading one input share its scales
            if s is not None:
                inverse = 1.0 / s.to(torch.float32)
                gram.mul_(inverse[:, None]).mul_(inverse[None, :])
            for type_name, names in by_type.items():
                record.update(self._gptq_linears(layer, prefix, names, type_name, gram, tokens))
        return record

    def _gptq_linears(
        self, layer: nn.Module, prefix: str, names: list[str], type_name: str, gram: torch.Tensor, tokens: int
    ) -> dict[str, Any]:
        """GPTQ of the linears ``names`` (one input, one type) stacked by rows; each kept where it beats the export's
        rounding on ``gram``; their records."""
        record: dict[str, Any] = {}
        linears = [layer.get_submodule(name) for name in names]
        before = [linear.weight.data.to(torch.float32) for linear in linears]
        rounded = gptq_round(torch.cat(before), gram, tokens, type_name, storage_dtype=self.storage_dtype)
        for name, linear, weight, after in zip(
            names, linears, before, rounded.split([w.shape[0] for w in before]), strict=True
        ):
            full = f"{prefix}.{name}.weight"
            rounding = self.roundings[f"{prefix}.{name}"]
            matrix = self.in_sum2[full] / self.counts[full] if self.with_imatrix else None
            exported = export_round(weight.to(self.storage_dtype), rounding, matrix)
            kept = export_round(after.to(self.storage_dtype), rounding, matrix)
            differing = (kept != after).reshape(after.shape[0], -1, 32).any(dim=-1)
            error_export = output_error(weight, exported, gram, tokens)
            error_gptq = output_error(weight, after, gram, tokens)
            use_gptq = error_gptq < error_export  # never worse than the export's own rounding on H
            if use_gptq:
                linear.weight.data.copy_(after)
            totals = self.gptq_totals
            totals["linears"] += 1
            totals["kept_export_rounding"] += int(not use_gptq)
            totals["error_export"] += error_export
            totals["error_gptq"] += min(error_gptq, error_export)
            totals["blocks"] += differing.numel()
            totals["blocks_differing"] += int(differing.sum()) if use_gptq else 0
            record[name] = {
                "type": type_name,
                "error_export_rounding": error_export,
                "error_gptq": error_gptq,
                "rounding": "gptq" if use_gptq else "export",
                "blocks_differing": int(differing.sum()),
            }
        return record

    def finish(self) -> dict[str, Any]:
        """Write the importance matrix (when asked) and return the run's record."""
        n_seq, seq_len = self.n_seq, self.seq_len
        imatrix_written = None
        if self.imatrix_path is not None:
            from exporters.gguf_imatrix import write_imatrix

            imatrix_written = str(
                write_imatrix(
                    self.imatrix_path,
                    self.in_sum2,
                    self.counts,
                    datasets=["bedside-awq-calibration"],
                    chunk_count=n_seq,
                    chunk_size=seq_len,
                )
            )
        count = self.clip_groups
        any_gguf = any(rounding.gguf for rounding in self.roundings.values())
        export_rounding = (
            "libggml with the importance matrix of the scaled model"
            if any_gguf and self.with_imatrix
            else "libggml (llama.cpp's reference rounding)"
            if any_gguf
            else "the grid's own arithmetic (bit-exact torch emulation)"
        )
        modes = self.modes
        # the least exact rounding any group was searched with (per group: search_rounding_groups)
        overall = next((mode for mode in ("emulated", "rerank", "exact") if mode in modes), "none")
        return {
            "method": "awq",
            "scheme": self.scheme,
            "export_grid": self.export_grid.name,
            "search_grid": self.grid.name,
            "search_grids": sorted(self.search_grids),  # per type: llama.cpp's per-tensor types and fallbacks
            "export_types": sorted(self.export_types),
            "search_grid_is_stand_in": self.grid.name != self.export_grid.name,
            "export_rounding": export_rounding,
            "search_rounding": overall,  # exact | rerank | emulated: the least exact of any group
            "search_rounding_groups": modes,
            "propagation": self.propagation,  # precision of the non-search sequences' pass
            "search_precision": self.search_precision,  # of the scale search's candidates (auto: per group)
            "search_precision_groups": self.precisions,
            "rerank": self.rerank if "rerank" in modes else 0,
            "group_size": self.grid.group_size,
            "n_grid": self.n_grid,
            "alphas": self.alphas,
            "alpha_search": self.alpha_search,  # refine: coarse half of the alphas, then the best one's neighbours
            "alphas_evaluated": self.alphas_evaluated,  # over all groups and layers
            "loss": "inspect-module output MSE (attention block for q,k,v; MLP for gate,up; linear otherwise)",
            "clip": self.clip,
            "clip_ratios": list(self.clip_ratios) if self.clip else [],
            "clip_dense_down_to": self.clip_dense_down_to if self.clip else None,  # below: groups still improving
            "calibration": {
                "sequences": n_seq,
                "seq_len": seq_len,
                "tokens": n_seq * seq_len,
                "search_tokens": self.search_token_count,
                "clip_tokens": n_seq * seq_len,  # every calibration token (the clipping search's block Grams)
            },
            "layers": self.layer_records,
            "clip_summary": {
                "groups": count,
                "mean_ratio": round(self.clip_ratio_sum / count, 4) if count else None,
                "fraction_clipped": round(self.clip_groups_clipped / count, 4) if count else None,
            },
            "imatrix": imatrix_written,
            "gptq": self._gptq_summary(),
            "seconds": round(time.perf_counter() - self.start_time, 3),
        }


    def _gptq_summary(self) -> dict[str, Any] | None:
        """The run's GPTQ totals for the record (None when GPTQ was off)."""
        if not self.gptq:
            return None
        totals = self.gptq_totals
        return {
            "types": sorted(GPTQ_TYPES),
            "tokens": self.gram_token_count,
            "storage_dtype": str(self.storage_dtype).removeprefix("torch."),
            "linears": totals["linears"],
            "kept_export_rounding": totals["kept_export_rounding"],  # GPTQ's error was not lower on H
            "output_error_ratio": totals["error_gptq"] / totals["error_export"] if totals["error_export"] else None,
            "blocks": totals["blocks"],
            "blocks_differing_in_export": totals["blocks_differing"],
        }
