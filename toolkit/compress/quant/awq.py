"""Activation-aware weight quantization (AWQ, Lin et al. 2024), block by block, on CPU.

Follows mit-han-lab/llm-awq (``auto_scale`` / ``auto_clip``) and mlx-lm's ``mlx_lm/quant/awq.py``.
The output is a float model whose weights are *scaled and clipped* so that the exporter's
round-to-nearest ``Q`` (``get_grid(scheme).fake_quantize``, bit-exact with the export format) loses
less; the exporter does the rounding.

Per decoder layer ``l`` (inputs ``X_l`` = outputs of layer ``l-1`` of the float model):

1. **Statistics.** One forward pass of the layer over all calibration tokens, with hooks on each
   scale group's linears: ``m_j = mean_t |x_tj|`` per input channel ``j`` (all tokens), the sums
   ``sum_t x_tj^2`` for the importance matrix, and, for a subset of whole sequences
   (``search_tokens``), the call of the group's ``inspect`` module and its float output ``y``.
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
   original weights and folded afterwards, as llm-awq does.
3. **Fold** (exact in float): the linears' input columns are multiplied by ``s``
   (``W <- W diag(s)``) and the producer of their input divided by it: a norm's weight
   ``g <- g / s`` (Gemma's ``(1 + g)``: ``g <- (1 + g) / s - 1``), or a preceding linear's output
   rows (``W_prev <- diag(s)^-1 W_prev``, bias too). The float model's function is unchanged.
4. **Clipping search** per linear except q and k (llm-awq skips them: their error is amplified
   through the softmax and clipping hurts them), per output row ``o`` and group ``g`` of the grid::

       err_r[o, g] = mean_t ( sum_{i in g} x'_ti (W'_oi - Q_r(W')_oi) )^2,   x' = x / s
       Q_r = Q(clamp(W', -r max|W'_og|, r max|W'_og|)),   r in {1.0, 0.95, ..., 0.5}

   on ``clip_tokens`` tokens; the best ``r`` per ``(o, g)`` is applied by clamping ``W'`` (weights
   stay float; exporting with the same grid then stores exactly ``Q_r``).
5. **Importance matrix** (llama.cpp ``imatrix``) from the same pass: the inputs of a linear after
   folding are ``x / s``, so ``in_sum2_j = sum_t x_tj^2 / s_j^2`` and ``counts = tokens``.
6. The next layer's inputs are this layer's float outputs from pass 1 (as llm-awq does; folding is
   exact, so they equal the scaled float model's outputs up to the clipping).

K-quant grids are slow to emulate (~0.4 s per 262k weights), so the search runs on a fast stand-in
with the same bits and similar groups (``SEARCH_STAND_INS``: Q4_K -> asym4_g32, Q5_K -> Q5_1); the
record says which grid the search used. Memory: one layer's inputs and outputs over all calibration
tokens, plus the search subset.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from toolkit.compress.quant.base import QuantGrid
from toolkit.compress.quant.grids import get_grid, grid_for_row
from toolkit.compress.quant.rtn import decoder_layers, resolve_text_family
from toolkit.core.errors import BedsideError
from toolkit.model.architectures import ScaleGroup, TextFamily

# Export grid -> the grid the search quantizes with (same bits, cheap emulation).
SEARCH_STAND_INS: dict[str, str] = {"Q4_K": "asym4_g32", "Q5_K": "Q5_1"}
CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0 .. 0.5
NO_CLIP_LINEARS: tuple[str, ...] = ("q_proj", "k_proj")


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


def _first_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@torch.no_grad()
def _capture_layer0_inputs(
    model: nn.Module, layers: nn.ModuleList, batches: Sequence[torch.Tensor]
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """(hidden states, other kwargs) entering decoder layer 0, one entry per mini-batch."""
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
                model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return captured


def _scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = max(m, 1e-4)^alpha / sqrt(max * min)`` (llm-awq's normalisation)."""
    s = mean_abs.clamp(min=1e-4).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def _fold(layer: nn.Module, group: ScaleGroup, s: torch.Tensor, norm_offset: float) -> None:
    """Fold ``s`` into the group: linears' columns times s, the producer of their input divided by s."""
    prev = layer.get_submodule(group.prev_op)
    if isinstance(prev, nn.Linear):
        weight = prev.weight.data
        prev.weight.data = (weight.to(torch.float32) / s[:, None]).to(weight.dtype)
    else:
        weight = prev.weight.data
        folded = (weight.to(torch.float32) + norm_offset) / s - norm_offset
        prev.weight.data = folded.to(weight.dtype)
    bias = getattr(prev, "bias", None)
    if bias is not None:
        bias.data = (bias.data.to(torch.float32) / s).to(bias.dtype)
    for name in group.linears:
        linear = layer.get_submodule(name)
        weight = linear.weight.data
        linear.weight.data = (weight.to(torch.float32) * s[None, :]).to(weight.dtype)


def _group_applies(layer: nn.Module, group: ScaleGroup) -> bool:
    """False for v -> o under grouped-query attention (v's outputs are fewer than o's inputs)."""
    if not group.only_if_same_shape:
        return True
    prev = layer.get_submodule(group.prev_op)
    first = layer.get_submodule(group.linears[0])
    return isinstance(prev, nn.Linear) and prev.out_features == first.in_features


@torch.no_grad()
def _search_clip(
    weight: torch.Tensor, inputs: torch.Tensor, grid: QuantGrid, ratios: Sequence[float]
) -> torch.Tensor:
    """Best clip ratio per [out, group]: minimises ``mean_t (x_g . (W_g - Q_r(W)_g))^2``."""
    out_features, in_features = weight.shape
    size = grid.group_size
    n_groups = grid.n_groups(in_features)
    pad = n_groups * size - in_features
    x = torch.nn.functional.pad(inputs, (0, pad)) if pad else inputs
    x = x.reshape(-1, n_groups, size).permute(1, 0, 2)  # [G, T, gs]
    w = torch.nn.functional.pad(weight, (0, pad)) if pad else weight
    best_err = torch.full((out_features, n_groups), math.inf)
    best_ratio = torch.ones((out_features, n_groups))
    for ratio in ratios:
        quantized = grid.fake_quantize(weight, clip_ratio=torch.tensor(ratio)).to(torch.float32)
        if pad:
            quantized = torch.nn.functional.pad(quantized, (0, pad))
        diff = (w - quantized).reshape(out_features, n_groups, size).permute(1, 2, 0)  # [G, gs, out]
        err = torch.bmm(x, diff).pow(2).mean(dim=1).transpose(0, 1)  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


@torch.no_grad()
def _apply_clip(weight: torch.Tensor, grid: QuantGrid, ratio: torch.Tensor) -> torch.Tensor:
    """Clamp each [out, group] of ``weight`` to ``±ratio * max|w|`` (float; the exporter rounds)."""
    out_features, in_features = weight.shape
    size = grid.group_size
    n_groups = grid.n_groups(in_features)
    pad = n_groups * size - in_features
    w = torch.nn.functional.pad(weight, (0, pad)) if pad else weight
    groups = w.reshape(out_features, n_groups, size)
    bound = (groups.abs().amax(dim=-1) * ratio).unsqueeze(-1)
    clipped = torch.clamp(groups, -bound, bound).reshape(out_features, n_groups * size)
    return clipped[:, :in_features].contiguous()


class _LayerStats:
    """Per-linear input statistics of one layer, gathered by forward hooks."""

    def __init__(self, layer: nn.Module, groups: Sequence[ScaleGroup], search_batches: set[int]) -> None:
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.sq_sum: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.search_inputs: dict[str, list[torch.Tensor]] = {}
        self.inspect_calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]]] = {}
        self.batch = 0
        self._search_batches = search_batches
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        names = sorted({name for group in groups for name in group.linears})
        for name in names:
            self._handles.append(layer.get_submodule(name).register_forward_hook(self._linear_hook(name)))
        for inspect in sorted({group.inspect for group in groups}):
            module = layer.get_submodule(inspect)
            self._handles.append(module.register_forward_hook(self._inspect_hook(inspect), with_kwargs=True))

    def _linear_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            if name not in self.abs_sum:
                self.abs_sum[name] = torch.zeros(x.shape[1], dtype=torch.float64)
                self.sq_sum[name] = torch.zeros(x.shape[1], dtype=torch.float64)
            self.abs_sum[name] += x.abs().sum(0, dtype=torch.float64)
            self.sq_sum[name] += x.pow(2).sum(0, dtype=torch.float64)
            if self.batch in self._search_batches:
                self.search_inputs.setdefault(name, []).append(x)

        return hook

    def _inspect_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if self.batch in self._search_batches:
                call = (args, dict(kwargs), _first_output(output).detach())
                self.inspect_calls.setdefault(name, []).append(call)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def _search_scale(
    layer: nn.Module,
    group: ScaleGroup,
    mean_abs: torch.Tensor,
    calls: list[tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]],
    grid: QuantGrid,
    alphas: Sequence[float],
) -> tuple[float, float, float, torch.Tensor]:
    """Grid-search alpha for one group: (best alpha, its loss, loss at alpha 0 = RTN, scales)."""
    inspect = layer.get_submodule(group.inspect)
    linears = [layer.get_submodule(name) for name in group.linears]
    originals = [linear.weight.data for linear in linears]
    stacked = torch.cat([weight.to(torch.float32) for weight in originals])
    rows = [weight.shape[0] for weight in originals]
    best = (math.inf, 0.0)
    loss_rtn = math.nan
    try:
        for alpha in alphas:
            s = _scales(mean_abs, alpha)
            # One call for the whole group: rows quantize independently, so stacking is exact.
            quantized = grid.fake_quantize(stacked * s[None, :]) / s[None, :]
            for linear, weight, part in zip(linears, originals, quantized.split(rows), strict=True):
                linear.weight.data = part.to(weight.dtype)
            total, count = 0.0, 0
            for args, kwargs, reference in calls:
                out = _first_output(inspect(*args, **kwargs)).to(torch.float32)
                total += float((out - reference.to(torch.float32)).pow(2).sum())
                count += reference.numel()
            loss = total / max(count, 1)
            if alpha == 0:
                loss_rtn = loss
            if loss < best[0]:
                best = (loss, alpha)
    finally:
        for linear, weight in zip(linears, originals, strict=True):
            linear.weight.data = weight
    return best[1], best[0], loss_rtn, _scales(mean_abs, best[1])


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
    model: nn.Module,
    calib_ids: torch.Tensor,
    scheme: str,
    *,
    n_grid: int = 10,
    clip: bool = True,
    progress: bool = True,
    imatrix_path: str | Path | None = None,
    search_tokens: int = 1024,
    clip_tokens: int = 512,
    batch_size: int = 8,
    clip_ratios: Sequence[float] = CLIP_RATIOS,
    seed: int = 0,
) -> AwqResult:
    """Run AWQ on ``model`` in place (see the module docstring for the formulas).

    Args:
        calib_ids: ``[n_sequences, seq_len]`` token ids (e.g. ``toolkit.data.make_blocks(...).input_ids``).
        scheme: export scheme or grid name (``Q4_0``, ``Q4_K_M``, ``int4_b32``, ``asym4_g64``...).
        n_grid: alphas ``0, 1/n_grid, ..., 1`` (n_grid + 1 values). llm-awq uses 20 on a GPU; the
            search costs n_grid x search_tokens forward passes of each group's block per layer (the
            largest term on a CPU), so the defaults (10, 1024 tokens) halve each; docs/BENCHMARKS.md
            shows AWQ still beating RTN with them.
        clip: run the clipping search after scaling.
        imatrix_path: where to write the llama.cpp importance matrix (GGUF) of the scaled model.
        search_tokens: tokens (whole sequences, evenly spread) on which the alpha loss is measured;
            ``mean|x|`` and the importance matrix always use every calibration token.
        clip_tokens: tokens sampled from the search sequences for the clipping search.
        batch_size: sequences per forward pass.

    Returns:
        AwqResult with the same model object (weights scaled, folded, clipped; still float).
    """
    start_time = time.perf_counter()
    if calib_ids.ndim != 2 or calib_ids.shape[0] < 1:
        raise BedsideError(f"calibration ids must be [n_sequences, seq_len], got {tuple(calib_ids.shape)}")
    if n_grid < 1:
        raise BedsideError(f"n_grid must be at least 1, got {n_grid}")
    family = resolve_text_family(model)
    layers = decoder_layers(model, family)
    export_grid = get_grid(scheme)
    grid = search_grid_for(scheme)  # for the progress line and the record; groups pick theirs by width
    _check_shapes(layers, family, scheme)
    search_grids: set[str] = set()
    device = next(model.parameters()).device
    calib_ids = calib_ids.to(device)
    n_seq, seq_len = calib_ids.shape
    batch_size = max(1, min(batch_size, n_seq))
    alphas = [i / n_grid for i in range(n_grid + 1)]

    # Whole sequences for the search, evenly spread; they form the first mini-batches.
    n_search = max(1, min(n_seq, math.ceil(search_tokens / seq_len)))
    search_seqs = sorted({round(i * (n_seq - 1) / max(n_search - 1, 1)) for i in range(n_search)})
    rest = [i for i in range(n_seq) if i not in set(search_seqs)]
    batches = [calib_ids[search_seqs[i : i + batch_size]] for i in range(0, len(search_seqs), batch_size)]
    search_batches = set(range(len(batches)))
    batches += [calib_ids[rest[i : i + batch_size]] for i in range(0, len(rest), batch_size)]
    search_token_count = len(search_seqs) * seq_len

    was_training = model.training
    model.eval()
    inputs = _capture_layer0_inputs(model, layers, batches)
    generator = torch.Generator().manual_seed(seed)

    in_sum2: dict[str, Any] = {}
    counts: dict[str, int] = {}
    layer_records: list[dict[str, Any]] = []
    all_ratios: list[torch.Tensor] = []
    with _progress(progress) as bar:
        task = bar.add_task(f"AWQ {scheme} (search {grid.name})", total=len(layers))
        for index, layer in enumerate(layers):
            groups = [group for group in family.awq_groups if _group_applies(layer, group)]
            skipped = [group for group in family.awq_groups if group not in groups]
            stats = _LayerStats(layer, groups, search_batches)
            outputs: list[tuple[torch.Tensor, dict[str, Any]]] = []
            try:
                for batch, (hidden, kwargs) in enumerate(inputs):
                    stats.batch = batch
                    outputs.append((_first_output(layer(hidden, **kwargs)).detach(), kwargs))
            finally:
                stats.remove()
            stats.tokens = n_seq * seq_len

            # 2. scale search per group, on the original weights
            record_groups: list[dict[str, Any]] = []
            chosen: list[tuple[ScaleGroup, torch.Tensor]] = []
            for group in groups:
                first = group.linears[0]
                group_grid = search_grid_for(scheme, layer.get_submodule(first).in_features)
                search_grids.add(group_grid.name)
                mean_abs = (stats.abs_sum[first] / stats.tokens).to(torch.float32)
                alpha, loss, loss_rtn, s = _search_scale(
                    layer, group, mean_abs, stats.inspect_calls[group.inspect], group_grid, alphas
                )
                chosen.append((group, s))
                record_groups.append(
                    {
                        "prev_op": group.prev_op,
                        "linears": list(group.linears),
                        "grid": group_grid.name,
                        "alpha": alpha,
                        "loss": loss,
                        "loss_rtn": loss_rtn,
                    }
                )
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

            # 4. clipping search on the scaled weights and scaled inputs
            clip_record: dict[str, Any] = {}
            if clip:
                for group, s in chosen:
                    x_all = torch.cat(stats.search_inputs[group.linears[0]]) / s[None, :]
                    if x_all.shape[0] > clip_tokens:
                        pick = torch.randperm(x_all.shape[0], generator=generator)[:clip_tokens]
                        x_all = x_all[pick]
                    for name in group.linears:
                        if name.rsplit(".", 1)[-1] in NO_CLIP_LINEARS:
                            continue
                        linear = layer.get_submodule(name)
                        weight32 = linear.weight.data.to(torch.float32)
                        group_grid = search_grid_for(scheme, linear.in_features)
                        ratio = _search_clip(weight32, x_all, group_grid, clip_ratios)
                        clipped = _apply_clip(weight32, group_grid, ratio)
                        linear.weight.data = clipped.to(linear.weight.dtype)
                        all_ratios.append(ratio.reshape(-1))
                        clip_record[name] = {
                            "mean_ratio": round(float(ratio.mean()), 4),
                            "min_ratio": float(ratio.min()),
                            "fraction_clipped": round(float((ratio < 1).float().mean()), 4),
                        }

            # 5. importance matrix: inputs after folding are x / s
            for name in stats.sq_sum:
                s = scale_of.get(name)
                sums = stats.sq_sum[name].to(torch.float32)
                if s is not None:
                    sums = sums / s.pow(2)
                full = f"{family.layers_path}.{index}.{name}.weight"
                in_sum2[full] = sums.cpu().numpy()
                counts[full] = stats.tokens

            order = {group.prev_op: position for position, group in enumerate(family.awq_groups)}
            record_groups.sort(key=lambda entry: order[entry["prev_op"]])  # table order
            layer_records.append({"layer": index, "groups": record_groups, "clip": clip_record})
            inputs = outputs  # 6. next layer's inputs
            del stats
            bar.update(task, advance=1, description=f"AWQ {scheme} layer {index + 1}/{len(layers)}")
    if was_training:
        model.train()

    imatrix_written = None
    if imatrix_path is not None:
        from exporters.gguf_imatrix import write_imatrix

        imatrix_written = str(
            write_imatrix(
                imatrix_path,
                in_sum2,
                counts,
                datasets=["bedside-awq-calibration"],
                chunk_count=n_seq,
                chunk_size=seq_len,
            )
        )
    ratios = torch.cat(all_ratios) if all_ratios else torch.ones(0)
    record = {
        "method": "awq",
        "scheme": scheme,
        "export_grid": export_grid.name,
        "search_grid": grid.name,
        "search_grids": sorted(search_grids),  # per width: llama.cpp demotes k-quants on short rows
        "search_grid_is_stand_in": grid.name != export_grid.name,
        "group_size": grid.group_size,
        "n_grid": n_grid,
        "alphas": alphas,
        "loss": "inspect-module output MSE (attention block for q,k,v; MLP for gate,up; linear otherwise)",
        "clip": clip,
        "clip_ratios": list(clip_ratios) if clip else [],
        "calibration": {
            "sequences": n_seq,
            "seq_len": seq_len,
            "tokens": n_seq * seq_len,
            "search_tokens": search_token_count,
            "clip_tokens": clip_tokens,
        },
        "layers": layer_records,
        "clip_summary": {
            "groups": int(ratios.numel()),
            "mean_ratio": round(float(ratios.mean()), 4) if ratios.numel() else None,
            "fraction_clipped": round(float((ratios < 1).float().mean()), 4) if ratios.numel() else None,
        },
        "imatrix": imatrix_written,
        "seconds": round(time.perf_counter() - start_time, 3),
    }
    return AwqResult(model=model, record=record)
