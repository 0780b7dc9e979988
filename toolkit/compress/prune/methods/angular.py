"""`angular`: Gromov et al. 2024, remove the contiguous block whose input and output are closest."""

from __future__ import annotations

import math

import torch
from torch import nn

from toolkit.compress.prune.registry import LayerSelection, register_selection_method
from toolkit.compress.prune.stack import (
    calibration_batches,
    find_decoder_stack,
    run_decoder,
    watch_layer_boundaries,
)


def last_token_boundaries(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """Hidden state of each sequence's last token at every layer boundary: (L + 1, sequences, hidden).

    Boundary i < L enters layer i; boundary L leaves the last layer (before the final norm).
    """
    num_layers = find_decoder_stack(model).num_layers
    collected: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]

    def keep_last_token(boundary: int, hidden: torch.Tensor) -> None:
        collected[boundary].append(hidden[:, -1, :].detach().float().cpu())

    with watch_layer_boundaries(model, keep_last_token):
        run_decoder(model, batches)
    return torch.stack([torch.cat(per_batch, dim=0) for per_batch in collected])


def angular_distance(first: torch.Tensor, second: torch.Tensor) -> float:
    """Mean over sequences of arccos(cos(first, second)) / pi, rows being sequences (in [0, 1])."""
    cosine = torch.nn.functional.cosine_similarity(first, second, dim=-1).clamp(-1.0, 1.0)
    return float((torch.arccos(cosine) / math.pi).mean())


@register_selection_method("angular")
def select_angular(
    model: nn.Module, calib_input_ids: torch.Tensor, n_remove: int, *, batch_size: int = 4
) -> LayerSelection:
    """Remove the block of n contiguous layers l..l+n-1 that minimises d(x_l, x_{l+n}).

    d(x_l, x_{l+n}) = (1/pi) * arccos( x_l . x_{l+n} / (|x_l| |x_{l+n}|) ), with x_l the hidden
    state of the LAST token of a sequence entering layer l (x_L: leaving the last layer, before the
    final norm), averaged over calibration sequences. As in the paper, every start l with
    l + n <= L is a candidate, the final layer included; ties go to the earlier block.

    Scores (one per layer, higher = more important): the single-layer distance d(x_i, x_{i+1}),
    the n = 1 case of the same measure. The block choice itself is in details["block_distances"]
    (start l -> distance).

    Cost: 1 forward pass of the decoder over the calibration sequences; all blocks come from the
    L + 1 boundary states kept for the last token only. Knobs: batch_size.
    """
    boundaries = last_token_boundaries(model, calibration_batches(calib_input_ids, batch_size))
    return angular_selection(boundaries, n_remove)


def angular_selection(boundaries: torch.Tensor, n_remove: int) -> LayerSelection:
    """The `angular` choice and scores from the last token's boundary states (L + 1, sequences, hidden)."""
    num_layers = boundaries.shape[0] - 1
    scores = [angular_distance(boundaries[i], boundaries[i + 1]) for i in range(num_layers)]
    details: dict[str, object] = {}
    layers: list[int] = []
    if n_remove > 0:
        distances = {
            start: angular_distance(boundaries[start], boundaries[start + n_remove])
            for start in range(num_layers - n_remove + 1)
        }
        best = min(distances, key=lambda start: (distances[start], start))
        layers = list(range(best, best + n_remove))
        details = {"block_distances": {str(start): d for start, d in distances.items()}, "block_start": best}
    return LayerSelection(
        method="angular",
        layers_to_remove=layers,
        scores=scores,
        forward_passes=1,
        seconds=0.0,
        details=details,
    )
