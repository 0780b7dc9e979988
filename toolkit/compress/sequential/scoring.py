"""Statistics that need the model's forward, computed block by block: perplexity, the importance matrix,
and the layer-selection scores (activation, block-influence, angular).

Each function takes a `LazyModel` and the same token ids its in-memory counterpart takes, cuts them
into the same batches, and runs every batch through one loaded block at a time (the block is loaded,
run on each batch's cached input, freed). The numbers are the in-memory function's: the same layer
code on the same inputs, sums in the same order (tests/test_sequential.py holds them to it).

Activation selection (formula: `toolkit.compress.prune.methods.activation`) needs the model run
with layers skipped. Block by block that is one *stream* of hidden states per candidate: candidate
c forks from its base stream at boundary c (the state entering layer c) and skips c (and the layers
removed in earlier rounds) from there on, exactly the computation the in-memory search resumes at
`start_at_layer`. Round 0 (every layer alone), the reference model and the quantized full model run
in ONE pass; each later greedy round is one more pass. Memory: one block in float32 plus
(candidates + 2) x tokens x hidden float32 states (1024 tokens: 8 MB each for hidden 2048) and the
reference distribution (tokens x vocab float32), never the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.compress.prune.methods.activation import (
    ReferenceDistribution,
    check_activation_knobs,
    fake_quantize_linears,
    resolve_quantizer,
)
from toolkit.compress.prune.methods.angular import angular_selection
from toolkit.compress.prune.methods.block_influence import BlockInfluenceMeter
from toolkit.compress.prune.registry import LayerSelection
from toolkit.compress.prune.stack import calibration_batches
from toolkit.compress.quant.imatrix import ImatrixStats
from toolkit.compress.sequential.model import LazyModel, first_output
from toolkit.core.errors import BedsideError
from toolkit.core.metrics import perplexity as perplexity_from_nll

LayerTransform = Callable[[int, nn.Module], None]  # (layer index, loaded layer) -> None, in place
LayerHook = Callable[[int, float], None]  # (layer index, seconds) after each block


def _timed_layers(lazy: LazyModel, on_layer: LayerHook | None) -> Any:
    import time

    for index in range(lazy.num_layers):
        start = time.perf_counter()
        layer = lazy.load_layer(index)
        try:
            yield index, layer
        finally:
            lazy.release_layer(index)
        if on_layer is not None:
            on_layer(index, time.perf_counter() - start)


@torch.no_grad()
def sequential_perplexity(
    lazy: LazyModel,
    blocks: torch.Tensor,
    *,
    batch_size: int = 4,
    transform: LayerTransform | None = None,
    on_layer: LayerHook | None = None,
) -> float:
    """Token-level perplexity of the checkpoint on `blocks` (formula: `toolkit.compress.stages`), block by block.

    `transform(index, layer)` changes each loaded block first (fake quantization for the `quantized` figure).
    """
    batches = [blocks[start : start + batch_size] for start in range(0, blocks.shape[0], batch_size)]
    captured = lazy.capture(batches)
    hidden = [state for state, _ in captured]
    kwargs = [extra for _, extra in captured]
    for index, layer in _timed_layers(lazy, on_layer):
        if transform is not None:
            transform(index, layer)
        hidden = [first_output(layer(state, **extra)).detach() for state, extra in zip(hidden, kwargs, strict=True)]
    total = 0.0
    count = 0
    with lazy.head() as logits_of:
        for ids, state in zip(batches, hidden, strict=True):
            logits = logits_of(state)[:, :-1].to(torch.float32)
            targets = ids[:, 1:]
            scored = targets < logits.shape[-1]
            nll = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="sum")
            total += float(nll)
            count += int(scored.sum())
    return perplexity_from_nll(total, max(count, 1))


@torch.no_grad()
def sequential_imatrix(
    lazy: LazyModel, calib_ids: torch.Tensor, *, batch_size: int = 8, on_layer: LayerHook | None = None
) -> ImatrixStats:
    """llama.cpp's importance matrix (definition: `toolkit.compress.quant.imatrix`), block by block."""
    import time

    if calib_ids.ndim != 2 or calib_ids.shape[0] < 1:
        raise BedsideError(f"calibration ids must be [n_sequences, seq_len], got {tuple(calib_ids.shape)}")
    start = time.perf_counter()
    size = max(1, batch_size)
    batches = [calib_ids[first : first + size] for first in range(0, calib_ids.shape[0], size)]
    captured = lazy.capture(batches)
    hidden = [state for state, _ in captured]
    kwargs = [extra for _, extra in captured]
    sums: dict[str, torch.Tensor] = {}
    for index, layer in _timed_layers(lazy, on_layer):
        handles = []
        for name, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            full = f"{lazy.layer_path(index)}.{name}.weight"

            def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any, full: str = full) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                total = x.pow(2).sum(0, dtype=torch.float64)
                sums[full] = sums[full] + total if full in sums else total

            handles.append(module.register_forward_hook(hook))
        try:
            hidden = [first_output(layer(state, **extra)).detach() for state, extra in zip(hidden, kwargs, strict=True)]
        finally:
            for handle in handles:
                handle.remove()
    return ImatrixStats.from_sums(sums, calib_ids, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# Layer selection
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _boundaries(
    lazy: LazyModel, batches: Sequence[torch.Tensor], on_boundary: Callable[[int, int, torch.Tensor], None]
) -> None:
    """Run every batch block by block, calling on_boundary(boundary, batch, hidden) for boundaries 0..L."""
    captured = lazy.capture(batches)
    hidden = [state for state, _ in captured]
    kwargs = [extra for _, extra in captured]
    for batch, state in enumerate(hidden):
        on_boundary(0, batch, state)
    for index, layer in _timed_layers(lazy, None):
        hidden = [first_output(layer(state, **extra)).detach() for state, extra in zip(hidden, kwargs, strict=True)]
        for batch, state in enumerate(hidden):
            on_boundary(index + 1, batch, state)


@torch.no_grad()
def sequential_block_influence(
    lazy: LazyModel, calib_ids: torch.Tensor, n_remove: int, *, batch_size: int = 4
) -> LayerSelection:
    """`block-influence` (BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)], ShortGPT) block by block."""
    meter = BlockInfluenceMeter(lazy.num_layers)
    previous: dict[int, torch.Tensor] = {}

    def on_boundary(boundary: int, batch: int, hidden: torch.Tensor) -> None:
        if boundary > 0:
            meter.add(boundary - 1, previous[batch], hidden)
        previous[batch] = hidden.detach().float()

    _boundaries(lazy, calibration_batches(calib_ids, batch_size), on_boundary)
    scores = meter.scores()
    ranked = sorted(range(len(scores)), key=lambda index: (scores[index], index))
    return LayerSelection("block-influence", sorted(ranked[:n_remove]), scores, 1, 0.0)


@torch.no_grad()
def sequential_angular(lazy: LazyModel, calib_ids: torch.Tensor, n_remove: int, *, batch_size: int = 4) -> LayerSelection:
    """`angular` (Gromov et al.: the n contiguous layers minimising arccos(cos(x_l, x_{l+n}))/pi) block by block."""
    collected: list[list[torch.Tensor]] = [[] for _ in range(lazy.num_layers + 1)]

    def on_boundary(boundary: int, _batch: int, hidden: torch.Tensor) -> None:
        collected[boundary].append(hidden[:, -1, :].detach().float().cpu())

    _boundaries(lazy, calibration_batches(calib_ids, batch_size), on_boundary)
    return angular_selection(torch.stack([torch.cat(per_batch, dim=0) for per_batch in collected]), n_remove)


@dataclass
class _Stream:
    """Hidden states of one variant of the model, per batch: which layers it skips, whether quantized."""

    skipped: frozenset[int]
    quantized: bool
    parent: str | None = None  # forks from this stream ...
    fork_at: int = 0  # ... at the state entering this layer (None parent: the embeddings)
    states: list[torch.Tensor] | None = None


@torch.no_grad()
def _run_streams(
    lazy: LazyModel,
    captured: list[tuple[torch.Tensor, dict[str, Any]]],
    streams: dict[str, _Stream],
    grid: Any,
    meter: BlockInfluenceMeter | None,
    quant_record: dict[str, Any] | None,
    on_layer: LayerHook | None,
) -> int:
    """One block-by-block pass of every stream; returns decoder-layer forwards run per batch."""
    kwargs = [extra for _, extra in captured]
    for stream in streams.values():
        if stream.parent is None:
            stream.states = [state for state, _ in captured]
    forwards = 0
    for index, layer in _timed_layers(lazy, on_layer):
        for stream in streams.values():
            if stream.parent is not None and stream.fork_at == index:
                parent = streams[stream.parent]
                assert parent.states is not None, "a stream forks from one that has not started"
                stream.states = list(parent.states)
        quantized_phase = [False, True] if grid is not None else [False]
        for phase in quantized_phase:
            if phase:
                fake_quantize_linears(layer, grid, quant_record if quant_record is not None else _scratch())
            for stream in streams.values():
                active = stream.states is not None and (stream.parent is None or stream.fork_at <= index)
                if not active or index in stream.skipped or (grid is not None and stream.quantized != phase):
                    continue
                before = stream.states
                assert before is not None
                stream.states = [
                    first_output(layer(state, **extra)).detach() for state, extra in zip(before, kwargs, strict=True)
                ]
                forwards += 1
                if meter is not None and stream.parent is None and not stream.quantized and not stream.skipped:
                    for entering, leaving in zip(before, stream.states, strict=True):
                        meter.add(index, entering, leaving)
    return forwards


def _scratch() -> dict[str, Any]:
    return {"grids": {}, "linears": 0}


@torch.no_grad()
def sequential_activation(
    lazy: LazyModel,
    calib_input_ids: torch.Tensor,
    n_remove: int,
    *,
    quant_scheme: str | None = None,
    top_k_candidates: int | None = None,
    max_sequences: int = 8,
    max_tokens: int = 128,
    batch_size: int = 4,
    reuse_prefix: bool = True,
    on_layer: LayerHook | None = None,
) -> LayerSelection:
    """`activation` (greedy mean_t KL(p_orig || q_pruned,quantized); formula and knobs in its module)
    block by block: round 0, the reference and the quantized full model in one pass, one pass per
    later round (module docstring). `reuse_prefix` is accepted for the knob set; forks always reuse."""
    del reuse_prefix
    check_activation_knobs(max_sequences, max_tokens, top_k_candidates)
    grid = resolve_quantizer(quant_scheme)
    num_layers = lazy.num_layers
    ids = calib_input_ids[:max_sequences, :max_tokens]
    batches = calibration_batches(ids, batch_size)
    captured = lazy.capture(batches)
    quantized = grid is not None

    meter = BlockInfluenceMeter(num_layers)
    quant_record: dict[str, Any] = {"scheme": None if grid is None else grid.name, "linears": 0, "grids": {}}
    streams: dict[str, _Stream] = {"reference": _Stream(frozenset(), False)}
    base = "reference"
    if quantized:
        streams["quantized"] = _Stream(frozenset(), True)
        base = "quantized"
    for candidate in range(num_layers):
        streams[f"skip-{candidate}"] = _Stream(frozenset({candidate}), quantized, base, candidate)
    layers_run = _run_streams(lazy, captured, streams, grid, meter, quant_record if quantized else None, on_layer)
    block_influence = meter.scores()
    passes = 1

    with lazy.head() as logits_of:
        reference_states = streams["reference"].states
        assert reference_states is not None
        reference = [ReferenceDistribution.from_logits(logits_of(state)) for state in reference_states]

        def divergence(states: list[torch.Tensor]) -> float:
            total, count = 0.0, 0
            for state, distribution in zip(states, reference, strict=True):
                kl = distribution.kl_from(logits_of(state))
                total += float(kl.double().sum())
                count += kl.numel()
            return total / count

        details: dict[str, Any] = {
            "calibration_sequences": int(ids.shape[0]),
            "calibration_tokens": int(ids.numel()),
            "top_k_candidates": top_k_candidates,
            "block_influence": block_influence,
            "sequential": True,
        }
        if quantized:
            quant_record["full_model_kl"] = divergence(streams["quantized"].states or [])
            passes += 1
        details["quant"] = quant_record
        rounds: list[dict[str, float]] = [
            {str(c): divergence(streams[f"skip-{c}"].states or []) for c in range(num_layers)}
        ]
        passes += num_layers
    del streams

    removed: list[int] = []
    for step in range(max(n_remove, 1)):
        if step > 0:
            remaining = [index for index in range(num_layers) if index not in removed]
            candidates = remaining
            if top_k_candidates is not None:
                by_influence = sorted(remaining, key=lambda index: (block_influence[index], index))
                candidates = sorted(by_influence[:top_k_candidates])
            streams = {"base": _Stream(frozenset(removed), quantized)}
            for candidate in candidates:
                streams[f"skip-{candidate}"] = _Stream(frozenset({*removed, candidate}), quantized, "base", candidate)
            layers_run += _run_streams(lazy, captured, streams, grid, None, None, on_layer)
            with lazy.head() as logits_of:
                reference_kl = {}
                for candidate in candidates:
                    total, count = 0.0, 0
                    for state, distribution in zip(streams[f"skip-{candidate}"].states or [], reference, strict=True):
                        kl = distribution.kl_from(logits_of(state))
                        total += float(kl.double().sum())
                        count += kl.numel()
                    reference_kl[candidate] = total / count
            rounds.append({str(index): kl for index, kl in reference_kl.items()})
            passes += len(candidates)
            del streams
        if step < n_remove:
            divergences = {int(index): kl for index, kl in rounds[step].items()}
            removed.append(min(divergences, key=lambda index: (divergences[index], index)))

    details["removal_order"] = list(removed)
    details["kl_after_each_removal"] = [rounds[k][str(index)] for k, index in enumerate(removed)]
    details["rounds"] = rounds
    details["decoder_layer_forwards"] = layers_run
    first_round = rounds[0]
    return LayerSelection(
        method="activation",
        layers_to_remove=sorted(removed),
        scores=[first_round[str(index)] for index in range(num_layers)],
        forward_passes=passes,
        seconds=0.0,
        details=details,
    )


SEQUENTIAL_SELECTION: dict[str, Callable[..., LayerSelection]] = {
    "activation": sequential_activation,
    "block-influence": sequential_block_influence,
    "angular": sequential_angular,
}


def sequential_select(
    method: str,
    lazy: LazyModel,
    calib_ids: torch.Tensor,
    n_remove: int,
    *,
    on_layer: LayerHook | None = None,
    **knobs: Any,
) -> LayerSelection:
    """The registered method `method` block by block (`last` needs no forward and runs on the skeleton)."""
    import time
    from dataclasses import replace

    from toolkit.compress.prune import select_layers

    if method not in SEQUENTIAL_SELECTION:
        return select_layers(method, lazy.model, calib_ids, n_remove, **knobs)
    start = time.perf_counter()
    if method == "activation":
        knobs["on_layer"] = on_layer
    selection = SEQUENTIAL_SELECTION[method](lazy, calib_ids, n_remove, **knobs)
    return replace(
        selection,
        layers_to_remove=sorted(selection.layers_to_remove),
        scores=[float(score) for score in selection.scores],
        seconds=time.perf_counter() - start,
    )
