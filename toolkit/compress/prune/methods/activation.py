"""`activation`: Bedside's quantizer-aware, greedy, output-divergence layer selection.

After the 2025 medical LLaVA compression study: choose layers by how removing them changes what
the model does on the user's domain data, measured on the model as it will be deployed (pruned
AND quantized), rather than by a proxy of one layer's own input/output geometry.

Formula. Let p(. | x_<t) be the original model's next-token distribution (full precision, all
layers) and q_S(. | x_<t) the distribution of the candidate model: layers in S skipped and, when a
quantization scheme is given, every remaining decoder linear fake-quantized on that scheme's grid.
Over calibration tokens t (every position of every calibration sequence):

    D(S) = mean_t KL( p(. | x_<t) || q_S(. | x_<t) )
         = mean_t sum_v p(v | x_<t) * (log p(v | x_<t) - log q_S(v | x_<t))      [nats]

Greedy removal: R_0 = {}; for k = 0..n-1, over the candidates C_k (every layer not in R_k),

    i_k = argmin_{i in C_k} D(R_k + {i}),    R_{k+1} = R_k + {i_k}

so each round is re-scored on the model the previous rounds left (a layer that was harmless alone
may not be once its neighbour is gone, and the other way round).

Scores (one per layer, higher = more important): s_i = D({i}), the first round's KL with layer i
alone removed from the (quantized) full model. Round 0 always measures every layer, because these
scores are the per-layer sensitivity the planner reads; a prefilter would leave holes in it.

Cost in forward passes over the calibration sequences (each one full model incl. logits):
    1 (reference distribution of the original model, block influence from the same pass)
  + 1 if a quantization scheme is given (D({}) of the quantized full model: the quantizer's share)
  + sum_{k=0}^{n-1} |C_k|,  |C_k| = L - k, or with top_k_candidates = K:  L + sum_{k=1}^{n-1} min(K, L - k)
e.g. L = 30, n = 6: 166 passes without prefilter, 71 with K = 8.

Affordability: the reference probabilities are computed once and cached, (sequences x tokens x vocab)
float32 on the model's device (8 x 128 x 49152 x 4 B = 201 MB for the demo defaults); layers are
skipped with `skip_layers` (the instance's forward swapped, no model copy); the fake-quantized
weights are computed once up front and swapped in place for the whole search (the originals are
held aside, so linear weights take twice their memory during selection, and restored after).
Prefix reuse: a candidate that skips S runs layers 0..min(S)-1 exactly as the (quantized) full
model does, so the inputs of every layer are recorded once (L x tokens x hidden in the model's
dtype: 70 MB for the demo defaults, 270 MB for a 7B in bf16) and each candidate forward resumes at
layer min(S) (`start_at_layer`). Round 0 then runs about L/2 layers per candidate instead of L;
the result is bit-identical. `details["decoder_layer_forwards"]` counts the layers really run.

Knobs:
    quant_scheme: a scheme or grid name of `toolkit.compress.quant.grids` (`Q4_K_M`, `Q4_0`, `int4_b32`,
        `asym4_g64`, ...) or an object with `name` and `fake_quantize(weight) -> weight`; None
        measures the pruned model in full precision. For ggml types whose block does not divide a
        row (Q4_K on 576 columns), the weight takes llama.cpp's fallback type's grid
        (`toolkit.model.storage_types.GGUF_FALLBACK`: Q4_K -> Q5_0, ...), or stays float where none fits;
        the K-mixes' per-layer Q6_K upgrades are not emulated. A k-quant row is scored on AWQ's
        stand-in of the same bits (`toolkit.compress.quant.awq.SEARCH_STAND_INS`: Q4_K -> asym4_g32,
        Q5_K -> Q5_1, Q6_K -> sym6_g16): the torch emulation of Q4_K takes about 80 s per 5632 x 2048 matrix on this
        host, the stand-in about 1 s, and selection only ranks layers.
    top_k_candidates: from round 1 on, try only the K remaining layers with the lowest block
        influence (ShortGPT's BI, measured in the reference pass). None tries every layer.
    max_sequences: calibration sequences used (the first ones given). Default 8.
    max_tokens: tokens used per sequence (the first ones). Default 128.
    batch_size: sequences per forward. Default 4.
    reuse_prefix: resume candidate forwards from recorded layer inputs (see above). Default True.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from toolkit.compress.prune.methods.block_influence import BlockInfluenceMeter
from toolkit.compress.prune.registry import LayerSelection, register_selection_method
from toolkit.compress.prune.stack import (
    calibration_batches,
    find_decoder_stack,
    forward_logits,
    skip_layers,
    start_at_layer,
    watch_layer_boundaries,
)
from toolkit.compress.quant.awq import SEARCH_STAND_INS
from toolkit.compress.quant.base import BlockShapeError
from toolkit.compress.quant.grids import get_grid
from toolkit.core.errors import BedsideError
from toolkit.model.storage_types import GGUF_FALLBACK


class FakeQuantizer(Protocol):
    """What the search needs of a quantization grid (toolkit.compress.quant.base.QuantGrid has it)."""

    name: str

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor: ...


def check_activation_knobs(max_sequences: int, max_tokens: int, top_k_candidates: int | None) -> None:
    """One-line errors for knobs the activation selection cannot run with (in memory and block by block)."""
    if max_sequences < 1 or max_tokens < 2:
        raise BedsideError(
            f"activation: max_sequences must be >= 1 and max_tokens >= 2 (got {max_sequences}, {max_tokens})"
        )
    if top_k_candidates is not None and top_k_candidates < 1:
        raise BedsideError(f"activation: top_k_candidates must be >= 1, got {top_k_candidates}")

def resolve_quantizer(quant_scheme: str | FakeQuantizer | None) -> FakeQuantizer | None:
    """A grid from a scheme name (toolkit.compress.quant.grids), or the given quantizer object, or None."""
    if quant_scheme is None or not isinstance(quant_scheme, str):
        return quant_scheme

    return get_grid(quant_scheme)


def _grid_for_shape(grid: FakeQuantizer, shape: torch.Size) -> FakeQuantizer | None:
    """The grid a weight of this shape is really stored on: the scheme's, llama.cpp's fallback, or None."""
    check_shape = getattr(grid, "check_shape", None)
    if check_shape is None:
        return grid

    candidate: FakeQuantizer | None = grid
    while candidate is not None:
        try:
            candidate.check_shape(shape)  # type: ignore[attr-defined]
            stand_in = SEARCH_STAND_INS.get(candidate.name)
            return get_grid(stand_in) if stand_in is not None else candidate
        except BlockShapeError:
            demoted = GGUF_FALLBACK.get(candidate.name)
            candidate = get_grid(demoted) if demoted and demoted != candidate.name else None
    return None


@contextmanager
def fake_quantized_decoder(model: nn.Module, grid: FakeQuantizer | None) -> Iterator[dict[str, Any]]:
    """Swap every decoder-layer linear weight for its fake-quantized copy; restore on exit.

    Yields a record: scheme, linears quantized, weights per grid used, weights left in float.
    Quantized once here, not per candidate; the originals are held aside (not copied).
    """
    record: dict[str, Any] = {"scheme": None if grid is None else grid.name, "linears": 0, "grids": {}}
    if grid is None:
        yield record
        return
    originals: list[tuple[nn.Linear, torch.Tensor]] = []
    try:
        originals = fake_quantize_linears(find_decoder_stack(model).layers, grid, record)
        yield record
    finally:
        for module, original in originals:
            module.weight.data = original


def fake_quantize_linears(
    modules: nn.Module, grid: FakeQuantizer, record: dict[str, Any]
) -> list[tuple[nn.Linear, torch.Tensor]]:
    """Fake-quantize every linear under `modules` in place (counted into `record`); (linear, original weight)."""
    originals: list[tuple[nn.Linear, torch.Tensor]] = []
    for module in modules.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight_grid = _grid_for_shape(grid, module.weight.shape)
        name = "float" if weight_grid is None else weight_grid.name
        record["grids"][name] = record["grids"].get(name, 0) + 1
        if weight_grid is None:
            continue
        originals.append((module, module.weight.data))
        module.weight.data = weight_grid.fake_quantize(module.weight.data)
        record["linears"] += 1
    return originals


@dataclass(frozen=True)
class ReferenceDistribution:
    """The original model's next-token distribution on one batch, cached for every candidate.

    KL(p || q) = sum_v p log p - sum_v p log q: the first term, `neg_entropy`, is per token and
    computed once; a candidate then costs one log_softmax and one dot product per token
    (`torch.linalg.vecdot`, no vocab-sized temporary), half the time of `kl_div(reduction="none")`
    at the same float32 accuracy (~1e-5 absolute per token against float64).
    """

    probs: torch.Tensor  # (batch, tokens, vocab) float32
    neg_entropy: torch.Tensor  # (batch, tokens): sum_v p log p

    @classmethod
    def from_logits(cls, logits: torch.Tensor) -> ReferenceDistribution:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        probs = log_probs.exp()
        return cls(probs=probs, neg_entropy=torch.linalg.vecdot(probs, log_probs))

    def kl_from(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(p || q) per token, q = softmax(logits), in nats."""
        return self.neg_entropy - torch.linalg.vecdot(self.probs, torch.log_softmax(logits.float(), dim=-1))


class LayerInputs:
    """Hidden states entering every decoder layer, per calibration batch, from one forward.

    Records through `watch_layer_boundaries` (`record`), then serves them to `start_at_layer`
    (`current`): inputs[batch][layer]. Memory: L x tokens x hidden in the model's dtype.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.inputs: list[list[torch.Tensor]] = []
        self.batch = 0
        self.layer = 0

    def record(self, boundary: int, hidden: torch.Tensor) -> None:
        if boundary == 0:
            self.inputs.append([])
        if boundary < self.num_layers:
            self.inputs[-1].append(hidden.detach())

    def current(self) -> torch.Tensor:
        return self.inputs[self.batch][self.layer]


def divergence(
    model: nn.Module,
    batches: list[torch.Tensor],
    reference: list[ReferenceDistribution],
    skipped: list[int],
    layer_inputs: LayerInputs | None = None,
) -> tuple[float, int]:
    """D(skipped) = mean_t KL(p_ref || q_model with `skipped` layers skipped), in nats.

    With `layer_inputs` (recorded on the same model, nothing skipped), the forward resumes at
    layer s = min(skipped) from the recorded input of layer s: layers before s would compute
    exactly that again. Returns (D, decoder layers actually run per batch).
    """
    start = min(skipped) if layer_inputs is not None and skipped else 0
    total = 0.0
    count = 0
    with skip_layers(model, skipped):
        if start > 0:
            layer_inputs.layer = start
            resume = start_at_layer(model, start, layer_inputs.current)
        else:
            resume = contextlib.nullcontext()
        with resume:
            for index, (batch, distribution) in enumerate(zip(batches, reference, strict=True)):
                if layer_inputs is not None:
                    layer_inputs.batch = index
                kl = distribution.kl_from(forward_logits(model, batch))
                total += float(kl.double().sum())
                count += kl.numel()
    num_layers = find_decoder_stack(model).num_layers
    layers_run = num_layers - start - sum(1 for index in skipped if index >= start)
    return total / count, layers_run


@register_selection_method("activation")
def select_activation(
    model: nn.Module,
    calib_input_ids: torch.Tensor,
    n_remove: int,
    *,
    quant_scheme: str | FakeQuantizer | None = None,
    top_k_candidates: int | None = None,
    max_sequences: int = 8,
    max_tokens: int = 128,
    batch_size: int = 4,
    reuse_prefix: bool = True,
) -> LayerSelection:
    """Greedy removal minimising mean_t KL(p_orig || q_pruned,quantized), re-scored every round.

    D(S) = mean_t sum_v p(v|x_<t) (log p(v|x_<t) - log q_S(v|x_<t)); remove argmin_i D(R + {i}),
    repeat n times. Scores s_i = D({i}) (higher = more important). Cost: 1 (+1 with a quant scheme)
    + sum_{k<n} |C_k| forward passes, |C_k| = L - k or min(K, L - k) after round 0 with
    top_k_candidates = K. Full description, knobs and memory: the module docstring.
    """
    check_activation_knobs(max_sequences, max_tokens, top_k_candidates)
    grid = resolve_quantizer(quant_scheme)
    num_layers = find_decoder_stack(model).num_layers
    ids = calib_input_ids[:max_sequences, :max_tokens]
    batches = calibration_batches(ids, batch_size)

    # Pass 1: the original model's distribution (cached), block influence, and, without a
    # quantizer, the layer inputs every candidate forward resumes from.
    meter = BlockInfluenceMeter(num_layers)
    layer_inputs = LayerInputs(num_layers) if reuse_prefix else None
    record_inputs_now = layer_inputs is not None and grid is None

    def watch(boundary: int, hidden: torch.Tensor) -> None:
        meter(boundary, hidden)
        if record_inputs_now:
            layer_inputs.record(boundary, hidden)

    with watch_layer_boundaries(model, watch):
        reference = [ReferenceDistribution.from_logits(forward_logits(model, batch)) for batch in batches]
    block_influence = meter.scores()
    passes = 1
    layers_run = num_layers

    details: dict[str, Any] = {
        "calibration_sequences": int(ids.shape[0]),
        "calibration_tokens": int(ids.numel()),
        "top_k_candidates": top_k_candidates,
        "block_influence": block_influence,
    }
    removed: list[int] = []
    rounds: list[dict[str, float]] = []
    with fake_quantized_decoder(model, grid) as quant_record:
        details["quant"] = quant_record
        if grid is not None:
            # Pass 2: D({}) of the quantized full model; the quantized layer inputs to resume from.
            with contextlib.ExitStack() as recording:
                if layer_inputs is not None:
                    recording.enter_context(watch_layer_boundaries(model, layer_inputs.record))
                details["quant"]["full_model_kl"], _ = divergence(model, batches, reference, [])
            passes += 1
            layers_run += num_layers
        for step in range(max(n_remove, 1)):  # round 0 runs even for n = 0: it yields the scores
            remaining = [index for index in range(num_layers) if index not in removed]
            candidates = remaining
            if step > 0 and top_k_candidates is not None:
                by_influence = sorted(remaining, key=lambda index: (block_influence[index], index))
                candidates = sorted(by_influence[:top_k_candidates])
            divergences: dict[int, float] = {}
            for candidate in candidates:
                divergences[candidate], run = divergence(
                    model, batches, reference, [*removed, candidate], layer_inputs
                )
                passes += 1
                layers_run += run
            rounds.append({str(index): kl for index, kl in divergences.items()})
            if step < n_remove:
                removed.append(min(divergences, key=lambda index: (divergences[index], index)))

    first_round = rounds[0]
    details["removal_order"] = list(removed)
    details["kl_after_each_removal"] = [rounds[k][str(index)] for k, index in enumerate(removed)]
    details["rounds"] = rounds
    details["decoder_layer_forwards"] = layers_run  # per batch; passes x L without prefix reuse
    return LayerSelection(
        method="activation",
        layers_to_remove=sorted(removed),
        scores=[first_round[str(index)] for index in range(num_layers)],
        forward_passes=passes,
        seconds=0.0,
        details=details,
    )
