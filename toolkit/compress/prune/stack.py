"""The decoder stack of a loaded model: where its layers live, skipping layers, watching their inputs.

Every selection method and the surgery need the same three things from a live transformers 4.57
model, whatever its family:

- `find_decoder_stack(model)`: the `nn.ModuleList` of decoder layers and the config that decoder
  reads (`model.model.layers` + `model.config` for Llama/Mistral/Qwen2/Gemma,
  `model.model.language_model.layers` + `model.config.text_config` for a LLaVA), looked up in the
  architecture tables of `toolkit.model.architectures`.
- `skip_layers(model, layers)`: a context manager that makes the named layers identities by
  replacing their `forward` on the instance (no copy of the model; the skipped layers cost
  nothing), returning the hidden states in the form the family's layer returns (a tensor for
  Llama/Mistral/Qwen2, a tuple for Gemma 2/3).
- `watch_layer_boundaries(model, callback)`: hooks that hand the hidden states at every layer
  boundary to a callback as the forward pass produces them: boundary i < L is the input of layer
  i, boundary L the output of the last layer (before the final norm, unlike
  `output_hidden_states`, whose last entry is normalised). A callback can reduce them on the fly,
  so peak memory grows with one boundary, not with depth.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from toolkit.core.errors import BedsideError
from toolkit.model.architectures import (
    multimodal_wrapper_for,
    supported_architectures,
    text_family_by_model_type,
    text_family_for,
)

BoundaryCallback = Callable[[int, torch.Tensor], None]


@dataclass(frozen=True)
class DecoderStack:
    """The decoder layers of a model and the config they were built from.

    Attributes:
        owner: the module holding the layer list as an attribute (e.g. `LlamaModel`).
        attribute: the attribute's name on `owner` (`layers`).
        path: module path of the list from the model root (`model.layers`,
            `model.language_model.layers`).
        config: the text config the decoder reads (`num_hidden_layers`, `layer_types`, ...).
    """

    owner: nn.Module
    attribute: str
    path: str
    config: Any

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.owner, self.attribute)

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    """Locate the decoder layers of a transformers model by its class (or model_type) in the tables.

    Raises:
        BedsideError: the model's family is not in `toolkit.model.architectures`.
    """
    class_name = type(model).__name__
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    wrapper = multimodal_wrapper_for(class_name, model_type) or multimodal_wrapper_for(None, model_type)
    if wrapper is not None:
        text_config = config.get_text_config(decoder=True)
        family = text_family_by_model_type(getattr(text_config, "model_type", ""))
        layers_name = family.layers_name if family is not None else "layers"
        base_path = wrapper.text_model_path
    else:
        family = text_family_for(class_name, model_type) or text_family_for(None, model_type)
        if family is None:
            raise BedsideError(
                f"cannot find the decoder layers of a {class_name} (model_type {model_type!r}): "
                f"supported architectures are {', '.join(supported_architectures())}"
            )
        layers_name = family.layers_name
        base_path = family.base_model_path
    try:
        owner = model.get_submodule(base_path)
    except AttributeError as error:
        raise BedsideError(
            f"{class_name} has no module {base_path!r} where its decoder layers should be"
        ) from error
    layers = getattr(owner, layers_name, None)
    if not isinstance(layers, nn.ModuleList):
        raise BedsideError(f"{class_name}: {base_path}.{layers_name} is not a list of decoder layers")
    stack_config = getattr(owner, "config", None) or config.get_text_config(decoder=True)
    return DecoderStack(
        owner=owner, attribute=layers_name, path=f"{base_path}.{layers_name}", config=stack_config
    )


def check_layer_indices(layers: Iterable[int], num_layers: int, *, action: str = "remove") -> list[int]:
    """Validate a request to remove (or skip) decoder layers; return the indices sorted.

    Raises:
        BedsideError: more indices than layers, a duplicate, an index that is not an int or out of
            range, or every layer named (a model needs at least one).
    """
    requested = list(layers)
    for index in requested:
        if isinstance(index, bool) or not isinstance(index, int):
            raise BedsideError(f"layer indices must be integers, got {index!r}")
    last = num_layers - 1
    if len(requested) > num_layers:
        raise BedsideError(
            f"cannot {action} {len(requested)} layers: the model has only {num_layers} decoder layers"
        )
    seen: set[int] = set()
    for index in requested:
        if index in seen:
            raise BedsideError(f"layer {index} is listed twice in the layers to {action}")
        seen.add(index)
    out_of_range = [index for index in requested if not 0 <= index <= last]
    if out_of_range:
        raise BedsideError(
            f"layer {out_of_range[0]} does not exist: the model has {num_layers} decoder layers "
            f"(indices 0-{last})"
        )
    if len(seen) == num_layers:
        raise BedsideError(f"cannot {action} all {num_layers} decoder layers: at least one must remain")
    return sorted(seen)


def _returns_tuple(layer: nn.Module) -> bool:
    """Whether this decoder layer class returns `(hidden_states, ...)` rather than a tensor.

    transformers 4.57 annotates it: Llama/Mistral/Qwen2 layers `-> torch.Tensor`, Gemma 2/3
    `-> tuple[torch.FloatTensor, ...]`, and the model reads `layer_outputs[0]`.
    """
    annotation = inspect.signature(type(layer).forward).return_annotation
    if isinstance(annotation, str):
        return annotation.replace(" ", "").lower().startswith(("tuple", "typing.tuple"))
    return typing.get_origin(annotation) is tuple


def _identity_forward(returns_tuple: bool) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        # (hidden, None): a model that asked for attentions reads index 1 and gets None.
        return (hidden_states, None) if returns_tuple else hidden_states

    return forward


@contextmanager
def _identity_layers(layers: Iterable[nn.Module]) -> Iterator[None]:
    """Swap each layer's forward for the identity on the instance; restore on exit (no checks).

    A forward already set on the instance (accelerate's offload hooks wrap it that way) is put
    back as it was, not deleted.
    """
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for layer in layers:
            previous = layer.__dict__.get("forward")
            layer.forward = _identity_forward(_returns_tuple(layer))
            patched.append((layer, previous))
        yield
    finally:
        for layer, previous in reversed(patched):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


@contextmanager
def skip_layers(model: nn.Module, layers: Iterable[int]) -> Iterator[None]:
    """Run the model with the given decoder layers replaced by the identity, then restore them.

    The skipped layer's `forward` is swapped on the instance only, so the weights stay where they
    are and nothing is copied. Meant for scoring forwards with `use_cache=False`: a skipped layer
    writes nothing into a KV cache, and a cache's length is read from layer 0, so generation with
    a cache needs `remove_layers` instead.
    """
    stack = find_decoder_stack(model)
    indices = check_layer_indices(layers, stack.num_layers, action="skip")
    with _identity_layers(stack.layers[index] for index in indices):
        yield


@contextmanager
def start_at_layer(model: nn.Module, start: int, layer_input: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Resume a forward at layer `start`: layers 0..start-1 become identities, and layer `start`
    receives `layer_input()` (called once per forward) instead of what reaches it.

    With `layer_input` returning the hidden state a previous forward of the same model produced
    at that boundary for the same batch, the result is the full forward's, computed without the
    prefix (embedding, rotary tables and masks still run: they are cheap). Composes with
    `skip_layers` on layers >= start, `start` included (hooks run before a swapped forward).
    """
    stack = find_decoder_stack(model)
    if not 0 <= start < stack.num_layers:
        raise ValueError(f"start layer {start} out of range 0-{stack.num_layers - 1}")

    def replace_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = layer_input()
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = stack.layers[start].register_forward_pre_hook(replace_input, with_kwargs=True)
    try:
        with _identity_layers(stack.layers[index] for index in range(start)):
            yield
    finally:
        handle.remove()


@contextmanager
def watch_layer_boundaries(model: nn.Module, callback: BoundaryCallback) -> Iterator[None]:
    """Call `callback(i, hidden)` at each layer boundary i = 0..L during forwards inside the block.

    Boundary i < L is the hidden state entering decoder layer i; boundary L is the last layer's
    output, before the final norm. Boundaries arrive in order within one forward.
    """
    stack = find_decoder_stack(model)
    num_layers = stack.num_layers
    handles = []

    def on_input(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            callback(index, args[0] if args else kwargs["hidden_states"])

        return hook

    def on_last_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        callback(num_layers, output[0] if isinstance(output, tuple) else output)

    try:
        for index, layer in enumerate(stack.layers):
            handles.append(layer.register_forward_pre_hook(on_input(index), with_kwargs=True))
        handles.append(stack.layers[num_layers - 1].register_forward_hook(on_last_output))
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's input embeddings live (the device input ids must be sent to)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def check_calibration_ids(calib_input_ids: Any, *, min_length: int = 2) -> torch.Tensor:
    """Validate calibration token ids: a 2-D integer tensor (sequences, tokens) with data in it."""
    if not isinstance(calib_input_ids, torch.Tensor):
        raise BedsideError(
            f"calibration input ids must be a torch tensor of shape (sequences, tokens), "
            f"got {type(calib_input_ids).__name__}"
        )
    if calib_input_ids.dim() != 2:
        raise BedsideError(
            f"calibration input ids must have shape (sequences, tokens), got {tuple(calib_input_ids.shape)}"
        )
    if calib_input_ids.dtype.is_floating_point or calib_input_ids.dtype == torch.bool:
        raise BedsideError(f"calibration input ids must be integer token ids, got {calib_input_ids.dtype}")
    sequences, tokens = calib_input_ids.shape
    if sequences < 1 or tokens < min_length:
        raise BedsideError(
            f"calibration data too small: {sequences} sequences of {tokens} tokens "
            f"(need at least 1 sequence of {min_length} tokens)"
        )
    return calib_input_ids


def calibration_batches(calib_input_ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split (sequences, tokens) ids into batches of at most `batch_size` sequences."""
    if batch_size < 1:
        raise BedsideError(f"batch_size must be at least 1, got {batch_size}")
    return list(torch.split(calib_input_ids, batch_size, dim=0))


def forward_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of one batch, (batch, tokens, vocab), without a KV cache, on the model's device."""
    output = model(input_ids=input_ids.to(model_device(model)), use_cache=False)
    return output.logits


def run_decoder(model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
    """One forward pass of the decoder over every batch, for hooks that watch its layers.

    Runs the module that owns the layers (e.g. `LlamaModel`), not the whole model: the vocabulary
    projection, a large part of a small model's compute, is not needed to watch hidden states.
    """
    decoder = find_decoder_stack(model).owner
    device = model_device(model)
    for batch in batches:
        decoder(input_ids=batch.to(device), use_cache=False)
