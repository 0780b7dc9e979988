"""Depth pruning: choose decoder layers to remove (selection methods by name), then remove them.

    from toolkit.compress.prune import select_layers, remove_layers
    selection = select_layers("activation", model, calib_ids, n_remove=6, quant_scheme="Q4_K_M")
    remove_layers(model, selection.layers_to_remove)

- `registry`: `LayerSelection` (the record), `SELECTION_METHODS`, `register_selection_method`.
- `methods/`: one file per method: `last`, `block-influence`, `angular`, `activation`, `replace-aware`
  (the contiguous span with the smallest KL after linear replacement).
- `replace`: linear replacement of the removed spans (ReplaceMe): a least-squares map fitted on
  calibration activations and folded into the block before each span, exactly, with no extra parameter.
- `stack`: where a model's decoder layers live, `skip_layers` (identity layers without copying),
  layer-boundary hooks.
- `surgery`: `remove_layers`, which updates the config and KV-cache layer indices.

Score convention of every method: one score per original layer, higher = more important.
"""

from toolkit.compress.prune import methods as methods
from toolkit.compress.prune.registry import (
    SELECTION_METHODS,
    LayerSelection,
    SelectionMethod,
    get_selection_method,
    register_selection_method,
    select_layers,
)
from toolkit.compress.prune.stack import DecoderStack, check_layer_indices, find_decoder_stack, skip_layers
from toolkit.compress.prune.surgery import remove_layers

__all__ = [
    "SELECTION_METHODS",
    "DecoderStack",
    "LayerSelection",
    "SelectionMethod",
    "check_layer_indices",
    "find_decoder_stack",
    "get_selection_method",
    "register_selection_method",
    "remove_layers",
    "select_layers",
    "skip_layers",
]
