"""`replace-aware`: choose the span of n layers whose loss is smallest AFTER linear replacement.

Plain selection (block influence, activation) scores a layer by what its removal costs; with
linear replacement (`toolkit.compress.prune.replace`) what matters is what is left once the fitted
map stands in for the span, and a span that changes the stream a lot but linearly is cheap to
replace. ReplaceMe removes one contiguous span; this method scores every contiguous span by its
loss after replacement, in two stages, keeping the cost at a few passes:

1. Fit error, all spans, one decoder pass. For every start s with a foldable span S = s..s+n-1
   (`replace.fold_target`), the sums G = M^T M and C = M^T R of the span's fit are accumulated in
   the same pass (the forward stops at the deepest boundary), the map T* is solved, and

       e(S) = ||a_p + m_p T* - h_{s+n}||_F / ||h_{s+n}||_F     (relative residual error after replacement)

   Memory: 2 d x d float64 per candidate span (the demo model: 25 spans x 2 x 2.7 MB = 133 MB).
2. Re-rank, top_k spans by e(S), one forward each: the map is folded in, the span skipped, and
   D(S) = mean_t KL(p_orig || q_S,replaced) over the calibration tokens (the `activation`
   method's divergence, nats), which sees what the hidden-state error does to the next-token
   distribution downstream. The span with the smallest D is removed (ties: the earlier span).

Why not re-fit inside `activation`'s greedy search: every candidate set there would need its own
fit pass; the contiguous family has L - n + 1 members, all fitted from one pass. The map fitted
here is fitted again by the pipeline on all calibration tokens (the same formula).

Scores (one per layer, higher = more important): score_i = min e(S) over the candidate spans S
containing layer i; a layer no foldable span covers (layer 0 with a tied embedding) gets the
largest score seen, so "lowest first" never picks it.

Cost in passes over the calibration sequences: 1 decoder pass (fit) + 1 reference pass + top_k
replaced passes (logits). Knobs: top_k (3), max_sequences (16) and max_tokens (256) of the fit
pass, kl_sequences (8) and kl_tokens (128) of the re-rank, batch_size (4), ridge (1e-2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from toolkit.compress.prune.methods.activation import ReferenceDistribution, divergence
from toolkit.compress.prune.registry import LayerSelection, register_selection_method
from toolkit.compress.prune.replace import DEFAULT_RIDGE, Span, fold_map, fold_target, gather_statistics
from toolkit.compress.prune.stack import calibration_batches, find_decoder_stack, forward_logits
from toolkit.core.errors import BedsideError


@register_selection_method("replace-aware")
def select_replace_aware(
    model: nn.Module,
    calib_input_ids: torch.Tensor,
    n_remove: int,
    *,
    top_k: int = 3,
    max_sequences: int = 16,
    max_tokens: int = 256,
    kl_sequences: int = 8,
    kl_tokens: int = 128,
    batch_size: int = 4,
    ridge: float = DEFAULT_RIDGE,
) -> LayerSelection:
    """Remove the n contiguous layers with the smallest KL after linear replacement (ReplaceMe fit).

    Stage 1: e(S) = ||a_p + m_p T* - h_out|| / ||h_out|| for every contiguous span, one pass.
    Stage 2: D(S) = mean_t KL(p_orig || q_S,replaced) for the top_k spans by e; remove argmin D.
    Scores: min e(S) over spans containing the layer (higher = more important). Details: module docstring.
    """
    if top_k < 1 or max_sequences < 1 or kl_sequences < 1 or max_tokens < 2 or kl_tokens < 2:
        raise BedsideError(
            "replace-aware: top_k, max_sequences and kl_sequences must be >= 1, max_tokens and kl_tokens >= 2"
        )
    num_layers = find_decoder_stack(model).num_layers
    length = max(n_remove, 1)  # n = 0 still measures single-layer spans: they give the scores
    candidates = [Span(start, start + length - 1) for start in range(num_layers - length + 1)]
    targets = {span: fold_target(model, span) for span in candidates}
    foldable = [span for span in candidates if not isinstance(targets[span], str)]
    if not foldable:
        reasons = sorted({str(target) for target in targets.values()})
        raise BedsideError(
            f"replace-aware: no span of {length} layers can be replaced exactly ({reasons[0]})"
        )

    fit_ids = calib_input_ids[:max_sequences, :max_tokens]
    statistics = gather_statistics(model, foldable, fit_ids, batch_size=batch_size)
    maps = {span: stats.solve(ridge) for span, stats in statistics.items()}
    errors = {span: statistics[span].relative_errors(maps[span]) for span in foldable}
    after = {span: errors[span][1] for span in foldable}

    ranked = sorted(foldable, key=lambda span: (after[span], span.start))
    shortlist = sorted(ranked[:top_k], key=lambda span: span.start)
    kl_batches = calibration_batches(calib_input_ids[:kl_sequences, :kl_tokens], batch_size)
    reference = [ReferenceDistribution.from_logits(forward_logits(model, batch)) for batch in kl_batches]
    kl: dict[Span, float] = {}
    for span in shortlist:
        undo = fold_map(targets[span], maps[span])  # type: ignore[arg-type]
        try:
            kl[span], _ = divergence(model, kl_batches, reference, span.layers)
        finally:
            undo()
    chosen = min(shortlist, key=lambda span: (kl[span], span.start))

    scores: list[float] = []
    worst = max(after.values())
    for index in range(num_layers):
        covering = [after[span] for span in foldable if span.start <= index <= span.end]
        scores.append(min(covering) if covering else worst)
    details: dict[str, Any] = {
        "span_length": length,
        "fit_tokens": int(fit_ids.numel()),
        "kl_tokens": sum(int(batch.numel()) for batch in kl_batches),
        "ridge": ridge,
        "relative_error_before": {str(span.start): errors[span][0] for span in foldable},
        "relative_error_after": {str(span.start): after[span] for span in foldable},
        "kl_after_replacement": {str(span.start): kl[span] for span in shortlist},
        "not_foldable": {
            str(span.start): targets[span] for span in candidates if isinstance(targets[span], str)
        },
        "block_start": chosen.start,
    }
    return LayerSelection(
        method="replace-aware",
        layers_to_remove=chosen.layers if n_remove > 0 else [],
        scores=scores,
        forward_passes=2 + len(shortlist),
        seconds=0.0,
        details=details,
    )
