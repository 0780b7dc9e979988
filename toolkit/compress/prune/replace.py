"""Linear replacement of removed decoder spans (ReplaceMe, Shopkhoev et al. 2025), folded into the weights.

Why: removing decoder layers s..e hands layer e+1 the stream h_s where it was trained on h_{e+1}.
A linear map fitted on calibration activations bridges that gap, and folded into a weight that
stays, it costs no parameter: the exported model has exactly the parameters plain removal leaves.

Notation (one row vector per token; an HF linear computes y = x W^T). Decoder block j of a
Llama/Mistral/Qwen2 model:

    a_j     = h_j + Attn_j(norm(h_j))                 stream after the attention residual
    m_j     = u_j W_j^T (+ b_j)                       MLP output; W_j = mlp.down_proj.weight
    h_{j+1} = a_j + m_j

A span S = s..e (a maximal run of removed layers) maps its input h_s to its output h_{e+1}.
Plain removal feeds h_s on, an error of h_s - h_{e+1}.

What ReplaceMe folds, and why it is exact. Let p = s - 1 be the block before the span. Replacing
W_p by W_p' = T^T W_p (and b_p' = b_p T) makes block p add m_p T instead of m_p, so the stream that
reaches the first kept block after the span becomes

    h^ = a_p + m_p T = h_s - m_p + m_p T

EXACTLY: it is the same matmul with another weight. A map on the whole stream, h_s (I + T), cannot
be folded this way: the residual a_p flows around the MLP and no weight of block p multiplies it
(and folding into the next block's input projections is not exact either: its RMSNorm sits in
between). ReplaceMe therefore fits the map it can fold: the residual passes unchanged and the map
acts on the MLP output only. The fit is where the approximation lies, and its loss is measured:

    T* = argmin_T ||M T - R||_F^2 + lam ||T - I||_F^2,   M = [m_p] (tokens x d),  R = [h_{e+1} - a_p]
       => (M^T M + lam I) T* = M^T R + lam I,          lam = ridge * tr(M^T M) / d

(ReplaceMe's least-squares variant; the ridge pulls T toward I, i.e. toward plain removal, which
keeps a poorly determined direction where it was. The paper's cosine-loss variant needs an
iterative solver and is not implemented.) Only two d x d sums are accumulated over the calibration
tokens, G = M^T M and C = M^T R, so the fit streams and its memory does not grow with the tokens.

A span starting at layer 0 has no block before it. Its input is the token embedding, h_0 = E[x],
so the map can act on the whole stream there: A* = argmin ||H_0 A - H_{e+1}||^2 + lam ||A - I||^2,
folded into the embedding rows, E' = E A, exact because an embedding is a row lookup
(row x of E A = E[x] A). That fold is refused where it is not exact: an embedding tied to the output
head (E' would change the logits too), and a vision-language wrapper (image features enter the
stream without passing through E).

Families. The fold needs the MLP output added to the stream as is: Llama, Mistral, Qwen2 (and a
LLaVA over them). Gemma 2/3 normalise the MLP output (post_feedforward_layernorm) before adding it,
and that RMSNorm would undo any scaling of W_p: refused.

Several spans: each maximal run of removed layers gets its own map, all fitted from ONE pass of
the original model (the forward stops at the last boundary needed). Span k's map is fitted on what
the ORIGINAL model feeds span k, not on what an earlier replaced span now feeds it: an
approximation that costs one calibration pass instead of one per span.

Loss recorded per span (relative residual error of the span's output, on the calibration tokens
and, when given, on held-apart tokens):

    before = ||h_s - h_{e+1}||_F / ||h_{e+1}||_F        (plain removal)
    after  = ||h^  - h_{e+1}||_F / ||h_{e+1}||_F        (with the folded map)

On calibration, after^2 ||h_{e+1}||^2 = tr(T^T G T) - 2 tr(T^T C) + ||R||_F^2 comes from the sums
already held; on held-apart tokens a second pass applies the fitted T.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from toolkit.compress.prune.stack import (
    calibration_batches,
    check_calibration_ids,
    check_layer_indices,
    find_decoder_stack,
    model_device,
    watch_layer_boundaries,
)
from toolkit.core.errors import BedsideError
from toolkit.model.architectures import multimodal_wrapper_for

REPLACE_MODES: tuple[str, ...] = ("linear", "none")
DEFAULT_RIDGE = 1e-2


@dataclass(frozen=True)
class Span:
    """A maximal run of removed layers s..e (original indices, inclusive)."""

    start: int
    end: int

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end + 1))

    @property
    def output_boundary(self) -> int:
        """The layer boundary holding the span's output h_{e+1} (L: the last layer's output, pre-norm)."""
        return self.end + 1


def spans_of(layers: Sequence[int]) -> list[Span]:
    """Split sorted removed-layer indices into maximal contiguous spans: [3, 4, 7] -> (3..4), (7..7)."""
    spans: list[Span] = []
    for index in sorted(layers):
        if spans and index == spans[-1].end + 1:
            spans[-1] = Span(spans[-1].start, index)
        else:
            spans.append(Span(index, index))
    return spans


def check_replace_mode(mode: str) -> str:
    """`linear` or `none`; a one-line BedsideError naming the choices otherwise."""
    if mode not in REPLACE_MODES:
        raise BedsideError(f"unknown --replace {mode!r}: choose one of {', '.join(REPLACE_MODES)}")
    return mode


# ---------------------------------------------------------------------------------------------
# Where a span's map can be folded
# ---------------------------------------------------------------------------------------------


def _down_projection(layer: nn.Module) -> nn.Linear | None:
    """The MLP down-projection whose output is added to the stream as is, or None (e.g. Gemma)."""
    if hasattr(layer, "post_feedforward_layernorm"):
        return None  # Gemma 2/3: an RMSNorm between the MLP output and the residual addition
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    return down if isinstance(down, nn.Linear) else None


def _tied_embeddings(model: nn.Module) -> bool:
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    flags = [getattr(c, "tie_word_embeddings", False) for c in (config, text_config) if c is not None]
    return any(flags) or (head is not None and head.weight is embeddings.weight)


def fold_target(model: nn.Module, span: Span) -> tuple[str, nn.Module] | str:
    """Where the map of `span` folds: ("down_proj", linear of block s-1) or ("embedding", the
    embedding), or a string saying why it cannot be folded exactly."""
    stack = find_decoder_stack(model)
    if span.start > 0:
        down = _down_projection(stack.layers[span.start - 1])
        if down is None:
            return (
                f"layer {span.start - 1}'s MLP output is not added to the stream as is (a norm follows it, "
                "as in Gemma): the map cannot be folded into its down-projection"
            )
        return ("down_proj", down)
    config = getattr(model, "config", None)
    if multimodal_wrapper_for(type(model).__name__, getattr(config, "model_type", None)) is not None:
        return "the span starts at layer 0 of a vision-language model: image features bypass the embedding"
    if _tied_embeddings(model):
        return (
            "the span starts at layer 0 and the embedding is tied to the output head: "
            "folding the map into it would change the logits"
        )
    return ("embedding", model.get_input_embeddings())


# ---------------------------------------------------------------------------------------------
# Statistics and the fit
# ---------------------------------------------------------------------------------------------


@dataclass
class SpanStatistics:
    """Sums over tokens for one span: G = X^T X, C = X^T R (float64), and the squared norms.

    X is the regressor (m_p, or h_0 for an embedding fold), R = h_{e+1} - base with base = a_p
    (or 0). `before_sq` = ||h_s - h_{e+1}||^2, `output_sq` = ||h_{e+1}||^2, `target_sq` = ||R||^2.
    """

    hidden: int
    gram: torch.Tensor = field(init=False)
    cross: torch.Tensor = field(init=False)
    target_sq: float = 0.0
    before_sq: float = 0.0
    output_sq: float = 0.0
    tokens: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.hidden, self.hidden, dtype=torch.float64)
        self.cross = torch.zeros(self.hidden, self.hidden, dtype=torch.float64)

    def add(
        self, regressor: torch.Tensor, target: torch.Tensor, span_input: torch.Tensor, output: torch.Tensor
    ) -> None:
        """Accumulate one batch (rows = tokens, float32 matmuls, float64 sums)."""
        self.gram += (regressor.T @ regressor).double().cpu()
        self.cross += (regressor.T @ target).double().cpu()
        self.target_sq += float(target.double().square().sum())
        self.before_sq += float((span_input - output).double().square().sum())
        self.output_sq += float(output.double().square().sum())
        self.tokens += int(regressor.shape[0])

    def solve(self, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """T* = (G + lam I)^-1 (C + lam I), lam = ridge * tr(G) / d (float64)."""
        if self.tokens == 0:
            raise BedsideError("linear replacement: no calibration token reached the span")
        eye = torch.eye(self.hidden, dtype=torch.float64)
        lam = ridge * float(torch.trace(self.gram)) / self.hidden
        lam = max(lam, 1e-12)
        return torch.linalg.solve(self.gram + lam * eye, self.cross + lam * eye)

    def relative_errors(self, transform: torch.Tensor) -> tuple[float, float]:
        """(before, after) relative errors of the span output on the accumulated tokens."""
        residual_sq = (
            float(torch.sum(transform * (self.gram @ transform)))
            - 2.0 * float(torch.sum(transform * self.cross))
            + self.target_sq
        )
        denominator = max(self.output_sq, 1e-30)
        return (self.before_sq / denominator) ** 0.5, max(residual_sq, 0.0) ** 0.5 / denominator**0.5


class _StopForward(Exception):
    """Raised by a hook once every boundary a pass needs has been seen: the rest of the forward is skipped."""


@contextlib.contextmanager
def _hooks(modules: dict[int, nn.Module], store: dict[tuple[str, int], torch.Tensor]) -> Iterator[None]:
    """Record the output of each module (down-projections by block index) into store[("m", p)]."""
    handles = []

    def make(index: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            store[("m", index)] = output.detach()

        return hook

    try:
        for index, module in modules.items():
            handles.append(module.register_forward_hook(make(index)))
        yield
    finally:
        for handle in handles:
            handle.remove()


SpanCallback = Callable[[Span, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def stream_spans(
    model: nn.Module,
    spans: Sequence[Span],
    input_ids: torch.Tensor,
    callback: SpanCallback,
    *,
    batch_size: int = 4,
) -> None:
    """One pass over `input_ids`; per batch and span, callback(span, x, base, h_s, h_{e+1}) with rows
    = tokens in float32: x the regressor (m_p, or h_0 for a span at layer 0), base = h_s - m_p (or 0).

    The forward stops after the deepest boundary any span needs (no logits are computed).
    """
    stack = find_decoder_stack(model)
    decoder = stack.owner
    device = model_device(model)
    wanted_boundaries = {span.start for span in spans} | {span.output_boundary for span in spans}
    last_needed = max(wanted_boundaries)
    down_projections = {
        span.start - 1: _down_projection(stack.layers[span.start - 1]) for span in spans if span.start > 0
    }
    store: dict[tuple[str, int], torch.Tensor] = {}
    hidden = int(stack.config.hidden_size)

    def on_boundary(boundary: int, state: torch.Tensor) -> None:
        if boundary not in wanted_boundaries:
            return
        store[("h", boundary)] = state.detach()
        for span in spans:
            if span.output_boundary != boundary:
                continue
            span_input = store[("h", span.start)].reshape(-1, hidden).float()
            output = state.detach().reshape(-1, hidden).float()
            if span.start > 0:
                regressor = store[("m", span.start - 1)].reshape(-1, hidden).float()
                base = span_input - regressor
            else:
                regressor = span_input
                base = torch.zeros_like(span_input)
            callback(span, regressor, base, span_input, output)
        if boundary == last_needed:
            raise _StopForward

    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            watch_layer_boundaries(model, on_boundary),
            _hooks(
                {index: module for index, module in down_projections.items() if module is not None}, store
            ),
        ):
            for batch in calibration_batches(input_ids, batch_size):
                store.clear()
                with contextlib.suppress(_StopForward):
                    decoder(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)


def gather_statistics(
    model: nn.Module, spans: Sequence[Span], input_ids: torch.Tensor, *, batch_size: int = 4
) -> dict[Span, SpanStatistics]:
    """G, C and the norms of every span from one pass of `model` over `input_ids`."""
    hidden = int(find_decoder_stack(model).config.hidden_size)
    statistics = {span: SpanStatistics(hidden) for span in spans}

    def accumulate(
        span: Span, x: torch.Tensor, base: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor
    ) -> None:
        statistics[span].add(x, h_out - base, h_in, h_out)

    stream_spans(model, spans, input_ids, accumulate, batch_size=batch_size)
    return statistics


def held_apart_errors(
    model: nn.Module, maps: dict[Span, torch.Tensor], input_ids: torch.Tensor, *, batch_size: int = 4
) -> dict[Span, tuple[float, float, int]]:
    """(before, after, tokens) on held-apart ids: the fitted maps applied to the unreplaced model's states."""
    measure = HeldApartErrors(maps)
    stream_spans(model, list(maps), input_ids, measure, batch_size=batch_size)
    return measure.result()


class HeldApartErrors:
    """A span callback summing ||h_s - h_out||^2, ||h^ - h_out||^2 (h^ = base + x T), ||h_out||^2 and tokens."""

    def __init__(self, maps: dict[Span, torch.Tensor]) -> None:
        self.maps = maps
        self.sums = {span: [0.0, 0.0, 0.0, 0] for span in maps}

    def __call__(self, span: Span, x: torch.Tensor, base: torch.Tensor, h_in: torch.Tensor, h_out: torch.Tensor) -> None:
        replaced = base + x @ self.maps[span].to(x.dtype)
        entry = self.sums[span]
        entry[0] += float((h_in - h_out).double().square().sum())
        entry[1] += float((replaced - h_out).double().square().sum())
        entry[2] += float(h_out.double().square().sum())
        entry[3] += int(x.shape[0])

    def result(self) -> dict[Span, tuple[float, float, int]]:
        """(before, after, tokens) per span: relative errors of the span output."""
        return {
            span: ((b / max(o, 1e-30)) ** 0.5, (a / max(o, 1e-30)) ** 0.5, int(n))
            for span, (b, a, o, n) in self.sums.items()
        }


# ---------------------------------------------------------------------------------------------
# Folding
# ---------------------------------------------------------------------------------------------


def fold_map(target: tuple[str, nn.Module], transform: torch.Tensor) -> Callable[[], None]:
    """Fold T into the target in place (down_proj: W' = T^T W, b' = b T; embedding: E' = E T).

    Returns a function that puts the original weights back (used by the selection search).
    """
    kind, module = target
    weight = module.weight
    original_weight = weight.data.clone()
    original_bias = module.bias.data.clone() if getattr(module, "bias", None) is not None else None
    t = transform.to(torch.float64)
    if kind == "down_proj":
        weight.data = (t.T @ weight.data.double()).to(weight.dtype)
        if original_bias is not None:
            module.bias.data = (module.bias.data.double() @ t).to(original_bias.dtype)
    elif kind == "embedding":
        weight.data = (weight.data.double() @ t).to(weight.dtype)
    else:  # pragma: no cover - fold_target only returns the two kinds
        raise AssertionError(f"unknown fold target {kind!r}")

    def undo() -> None:
        weight.data = original_weight
        if original_bias is not None:
            module.bias.data = original_bias

    return undo


# ---------------------------------------------------------------------------------------------
# The whole replacement, as the pipeline runs it
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replacement:
    """What `replace_removed_layers` did: the maps (by span) and compression.json's record."""

    maps: dict[Span, torch.Tensor]
    record: dict[str, Any]


def replace_removed_layers(
    model: nn.Module,
    layers: Sequence[int],
    calib_input_ids: torch.Tensor | None,
    *,
    eval_input_ids: torch.Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 4,
    strict: bool = True,
) -> Replacement:
    """Fit one map per span of `layers` (still in `model`) and fold it in place; the caller then
    removes the layers (`remove_layers`). Formula and fold: the module docstring.

    With strict=False a span whose map cannot be folded exactly is left as plain removal and the
    record says why; with strict=True it raises.

    Raises:
        BedsideError: no/invalid calibration ids, bad layer indices, a negative ridge, or (strict)
            a span that cannot be folded exactly.
    """
    calib_input_ids = check_calibration_ids(calib_input_ids)
    if ridge < 0:
        raise BedsideError(f"linear replacement: the ridge must be >= 0, got {ridge}")
    stack = find_decoder_stack(model)
    removed = check_layer_indices(list(layers), stack.num_layers)
    spans = spans_of(removed)
    targets: dict[Span, tuple[str, nn.Module]] = {}
    skipped: list[dict[str, Any]] = []
    for span in spans:
        target = fold_target(model, span)
        if isinstance(target, str):
            if strict:
                raise BedsideError(f"linear replacement of layers {span.start}-{span.end}: {target}")
            skipped.append({"layers": span.layers, "reason": target})
        else:
            targets[span] = target
    maps: dict[Span, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    if targets:
        statistics = gather_statistics(model, list(targets), calib_input_ids, batch_size=batch_size)
        for span, stats in statistics.items():
            maps[span] = stats.solve(ridge)
        held = (
            held_apart_errors(model, maps, eval_input_ids, batch_size=batch_size)
            if eval_input_ids is not None and eval_input_ids.numel() > 0
            else {}
        )
        for span in targets:
            entries.append(span_entry(span, targets[span][0], statistics[span], maps[span], held.get(span)))
        for span, target in targets.items():  # fold only after every pass ran on the original weights
            fold_map(target, maps[span])
    return Replacement(maps=maps, record=replacement_record(ridge, entries, skipped))


def span_entry(
    span: Span,
    kind: str,
    statistics: SpanStatistics,
    transform: torch.Tensor,
    held: tuple[float, float, int] | None,
) -> dict[str, Any]:
    """compression.json's record of one span: fold, tokens, relative errors before/after (and held apart)."""
    before, after = statistics.relative_errors(transform)
    entry: dict[str, Any] = {
        "layers": span.layers,
        "fold": "embedding" if kind == "embedding" else f"layer {span.start - 1} mlp.down_proj",
        "calibration_tokens": statistics.tokens,
        "relative_error_before": before,
        "relative_error_after": after,
    }
    if held is not None:
        entry.update(
            held_apart_tokens=held[2],
            held_apart_relative_error_before=held[0],
            held_apart_relative_error_after=held[1],
        )
    return entry


def replacement_record(ridge: float, entries: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> dict[str, Any]:
    """compression.json `replacement` for mode linear."""
    return {
        "mode": "linear",
        "method": "ReplaceMe least squares, folded (toolkit.compress.prune.replace)",
        "ridge": ridge,
        "loss": "relative residual error of the span output ||h^ - h_out|| / ||h_out||",
        "spans": entries,
        "skipped": skipped,
    }
