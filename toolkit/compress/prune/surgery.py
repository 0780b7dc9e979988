"""Depth-pruning surgery: remove whole decoder blocks and leave a model transformers saves and reloads.

What has to change when blocks i in R leave a model of L layers (transformers 4.57):

- the layer list: `nn.ModuleList` of the kept layers, in their order (the removed ones are dropped,
  so their memory is freed; nothing is copied);
- `layer_idx` of every kept module that has one (the attention module, and the layer itself in
  Gemma 3): the KV cache is indexed by it, so it must run 0..L-|R|-1 again;
- the text config the decoder reads (`config`, or `config.text_config` in a LLaVA):
  `num_hidden_layers`, every per-layer list (any list attribute of length L, such as `layer_types`,
  which Gemma 2/3 and Qwen2 use to pick sliding or full attention per layer: the kept layers keep
  their own types), and Qwen2-style `max_window_layers` (the count of leading full-attention layers
  becomes the count of kept layers among them).

A kept layer keeps its attention type (`attention_type`, `sliding_window`) as module attributes,
so the pruned model computes exactly what the original computes with those blocks skipped
(`toolkit.compress.prune.stack.skip_layers`); the updated config makes a reload build the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from toolkit.compress.prune.stack import check_layer_indices, find_decoder_stack

# List-valued config attributes that are not per decoder layer even when their length happens to
# equal the number of layers (token ids, label maps, LLaVA's vision feature layers).
NOT_PER_LAYER = frozenset(
    {
        "architectures",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "suppress_tokens",
        "begin_suppress_tokens",
        "bad_words_ids",
        "forced_decoder_ids",
        "vision_feature_layer",
    }
)


def remove_layers(model: nn.Module, layers: Sequence[int]) -> nn.Module:
    """Remove the decoder blocks `layers` (original indices) from `model` in place and return it.

    Raises:
        BedsideError: removing all layers, more layers than exist, a duplicate or out-of-range
            index (the message names the numbers).
    """
    stack = find_decoder_stack(model)
    num_layers = stack.num_layers
    removed = set(check_layer_indices(layers, num_layers))
    if not removed:
        return model
    kept = [index for index in range(num_layers) if index not in removed]
    kept_layers = nn.ModuleList([stack.layers[index] for index in kept])
    for new_index, layer in enumerate(kept_layers):
        renumber_layer(layer, new_index)
    setattr(stack.owner, stack.attribute, kept_layers)

    configs = [stack.config]
    root_config = getattr(model, "config", None)
    if root_config is not None:
        text_config = root_config.get_text_config(decoder=True)
        if text_config is not stack.config:
            configs.append(text_config)
    for config in configs:
        prune_config(config, kept, num_layers)
    return model


def renumber_layer(layer: nn.Module, new_index: int) -> None:
    """Set `layer_idx` of the layer and of every submodule that has one (attention: KV-cache slot)."""
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = new_index


def prune_config(config: Any, kept: Sequence[int], num_layers: int) -> None:
    """Update a text config for a model that keeps only the layers `kept` of `num_layers`.

    num_hidden_layers <- len(kept); every list attribute of length num_layers (not in
    NOT_PER_LAYER) <- its entries at `kept`; max_window_layers <- |{i in kept : i < old value}|.
    """
    for name, value in list(vars(config).items()):
        if name in NOT_PER_LAYER or not isinstance(value, (list, tuple)) or len(value) != num_layers:
            continue
        setattr(config, name, type(value)(value[index] for index in kept))
    window = getattr(config, "max_window_layers", None)
    if isinstance(window, int) and not isinstance(window, bool):
        config.max_window_layers = sum(1 for index in kept if index < window)
    config.num_hidden_layers = len(kept)
