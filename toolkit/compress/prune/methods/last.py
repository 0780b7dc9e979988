"""`last`: remove the deepest layers but keep the final one (the classic depth-pruning baseline)."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.compress.prune.registry import LayerSelection, register_selection_method
from toolkit.compress.prune.stack import find_decoder_stack


@register_selection_method("last", needs_calibration=False)
def select_last(model: nn.Module, calib_input_ids: torch.Tensor | None, n_remove: int) -> LayerSelection:
    """Remove layers L-1-n .. L-2: the n deepest decoder layers before the final one.

    Rule: with L layers, remove {L-1-n, ..., L-2} and keep layer L-1, whose output feeds the final
    norm and the vocabulary projection directly.

    Scores (no measurement; higher = more important, as every method): the rule's own ranking,
    score_i = L - i for i < L-1 (earlier layers rank higher) and score_{L-1} = L + 1 (the final
    layer ranks highest), so the n lowest scores are exactly the layers removed.

    Cost: 0 forward passes; calibration data is not read.
    """
    num_layers = find_decoder_stack(model).num_layers
    final = num_layers - 1
    scores = [float(num_layers - index) for index in range(final)] + [float(num_layers + 1)]
    return LayerSelection(
        method="last",
        layers_to_remove=list(range(final - n_remove, final)),
        scores=scores,
        forward_passes=0,
        seconds=0.0,
    )
