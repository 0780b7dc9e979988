"""`block-influence`: ShortGPT (Men et al. 2024), remove the layers that change their input least."""

from __future__ import annotations

import torch
from torch import nn

from toolkit.compress.prune.registry import LayerSelection, register_selection_method
from toolkit.compress.prune.stack import (
    calibration_batches,
    find_decoder_stack,
    run_decoder,
    watch_layer_boundaries,
)


class BlockInfluenceMeter:
    """Accumulates BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)] from layer-boundary callbacks.

    Pass it to `watch_layer_boundaries` and run forwards; x_i,t is the hidden state of token t
    entering layer i and x_{i+1},t the one leaving it (the last layer's output is taken before the
    final norm). The expectation runs over every token of every sequence seen. Only the previous
    boundary is held, so memory does not grow with depth.
    """

    def __init__(self, num_layers: int) -> None:
        self.cosine_sums = torch.zeros(num_layers, dtype=torch.float64)
        self.token_counts = torch.zeros(num_layers, dtype=torch.float64)
        self._previous: torch.Tensor | None = None

    def __call__(self, boundary: int, hidden: torch.Tensor) -> None:
        current = hidden.detach().float()
        if boundary > 0 and self._previous is not None:
            self.add(boundary - 1, self._previous, current)
        self._previous = current

    def add(self, layer: int, entering: torch.Tensor, leaving: torch.Tensor) -> None:
        """Add one batch's cos(x_i,t, x_{i+1},t) of layer i (the block-by-block path calls this directly)."""
        cosine = torch.nn.functional.cosine_similarity(entering.float(), leaving.float(), dim=-1)
        self.cosine_sums[layer] += cosine.sum().double().cpu()
        self.token_counts[layer] += cosine.numel()

    def scores(self) -> list[float]:
        """BI_i per layer (higher = the layer changes its input more = more important)."""
        if not bool((self.token_counts > 0).all()):
            raise RuntimeError("block influence: some layer saw no tokens (no forward ran under the meter)")
        return (1.0 - self.cosine_sums / self.token_counts).tolist()


def block_influence_scores(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """BI_i for every decoder layer from one decoder pass over `batches` (see BlockInfluenceMeter)."""
    meter = BlockInfluenceMeter(find_decoder_stack(model).num_layers)
    with watch_layer_boundaries(model, meter):
        run_decoder(model, batches)
    return meter.scores()


@register_selection_method("block-influence")
def select_block_influence(
    model: nn.Module, calib_input_ids: torch.Tensor, n_remove: int, *, batch_size: int = 4
) -> LayerSelection:
    """Remove the n layers with the lowest block influence BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)].

    ShortGPT's measure: a layer whose output points the same way as its input (cosine near 1)
    contributes little. Scores are BI_i (higher = more important); ties go to the earlier layer.

    Cost: 1 forward pass of the decoder over the calibration sequences (no vocabulary projection).
    Knobs: batch_size, sequences per forward.
    """
    scores = block_influence_scores(model, calibration_batches(calib_input_ids, batch_size))
    ranked = sorted(range(len(scores)), key=lambda index: (scores[index], index))
    return LayerSelection(
        method="block-influence",
        layers_to_remove=sorted(ranked[:n_remove]),
        scores=scores,
        forward_passes=1,
        seconds=0.0,
    )
