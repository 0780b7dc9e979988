"""Round-to-nearest (RTN): the no-search baseline, and fake quantization of a whole model.

RTN stores every decoder linear as the export grid rounds it, with no scales and no clipping:
``W_q = Q(W)`` where ``Q = get_grid(scheme).fake_quantize`` (bit-exact emulation of the exporter).
``fake_quantize_model`` applies the same ``Q`` in place to any model, e.g. one AWQ has already
scaled and clipped, to see its quality before export. Embeddings, the final norm and ``lm_head``
are left in float: only the decoder layers' ``nn.Linear`` weights are touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.compress.quant.base import QuantGrid
from toolkit.compress.quant.grids import get_grid, grid_for_row
from toolkit.core.errors import BedsideError
from toolkit.model.architectures import TextFamily, text_family_in


def resolve_text_family(model: nn.Module) -> TextFamily:
    """The architecture table entry of a causal LM, or of a LLaVA's language model re-rooted where it nests."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    family = text_family_in(
        type(model).__name__, getattr(config, "model_type", None), getattr(text_config, "model_type", None)
    )
    if family is None:
        raise BedsideError(
            f"no architecture table entry for {type(model).__name__} "
            f"(model_type {getattr(config, 'model_type', None)!r}): quantization supports "
            "Llama/Mistral/Qwen2/Qwen3/Gemma-style decoders"
        )
    return family


def decoder_layers(model: nn.Module, family: TextFamily | None = None) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.layers`` for Llama-style models)."""
    family = family or resolve_text_family(model)
    layers = model.get_submodule(family.layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise BedsideError(f"{family.layers_path} of {type(model).__name__} is not a list of layers")
    return layers


def decoder_linears(model: nn.Module, family: TextFamily | None = None) -> list[tuple[str, nn.Linear]]:
    """(full module name, module) of every ``nn.Linear`` inside the decoder layers, in order."""
    family = family or resolve_text_family(model)
    prefix = family.layers_path
    layers = decoder_layers(model, family)
    return [
        (f"{prefix}.{name}", module)
        for name, module in layers.named_modules()
        if isinstance(module, nn.Linear)
    ]


@torch.no_grad()
def fake_quantize_linear(linear: nn.Linear, grid: QuantGrid) -> None:
    """Overwrite ``linear.weight`` in place with ``Q(W)`` on ``grid`` (float storage, values on the grid)."""
    weight = linear.weight.data
    weight.copy_(grid.fake_quantize(weight.to(torch.float32)))  # in place: no second copy of the model


@torch.no_grad()
def fake_quantize_model(
    model: nn.Module, scheme: str, imatrix: Mapping[str, np.ndarray] | None = None
) -> nn.Module:
    """Fake-quantize every decoder linear of ``model`` in place with ``scheme``'s grid; returns it.

    Each linear uses ``grid_for_row(scheme, in_features)``: the type llama.cpp falls back to where
    the scheme's block does not divide the row. Raises ``BlockShapeError`` (a BedsideError) where a
    weight fits no grid.

    ``imatrix`` (weight name -> ``in_sum2 / counts``, as ``exporters.gguf_imatrix.read_imatrix`` gives it): the
    GGUF export passes this matrix, so each linear is rounded as llama.cpp stores it instead
    (``export_rounding.export_round``: its per-tensor type, ``f16`` first, libggml with the matrix).
    """
    quantize = linear_quantizer(model, scheme, imatrix)
    for name, linear in decoder_linears(model):
        quantize(name, linear)
    return model


def linear_quantizer(
    model: nn.Module, scheme: str, imatrix: Mapping[str, np.ndarray] | None = None
) -> Callable[[str, nn.Linear], None]:
    """``quantize(full module name, linear)``: what ``fake_quantize_model`` does to one decoder linear.

    Needs only the model's structure (a meta-device skeleton will do), so the block-by-block path
    applies it to each block as it is loaded.
    """
    if imatrix is None:
        return lambda _name, linear: fake_quantize_linear(linear, grid_for_row(scheme, linear.in_features))
    from toolkit.compress.quant.export_rounding import export_round, linear_roundings

    linears = decoder_linears(model)
    roundings = linear_roundings(model, scheme, {name: m.in_features for name, m in linears}, True)

    @torch.no_grad()
    def quantize(name: str, linear: nn.Linear) -> None:
        rounding = roundings[name]
        if not rounding.quantized:
            return
        weight = linear.weight.data
        matrix = imatrix.get(f"{name}.weight")
        weight.copy_(export_round(weight, rounding, matrix))  # in place: no second copy of the model

    return quantize


@dataclass
class RtnResult:
    """The fake-quantized model and what was done (``method``, ``scheme``, ``grid``, ``tensors``, ``seconds``)."""

    model: nn.Module
    record: dict[str, Any]


def rtn(model: nn.Module, scheme: str) -> RtnResult:
    """Round-to-nearest baseline: ``W <- Q(W)`` for every decoder linear, in place."""
    start = time.perf_counter()
    grid = get_grid(scheme)
    linears = decoder_linears(model)
    fake_quantize_model(model, scheme)
    record = {
        "method": "rtn",
        "scheme": scheme,
        "grid": grid.name,
        "group_size": grid.group_size,
        "grids": sorted({grid_for_row(scheme, linear.in_features).name for _name, linear in linears}),
        "tensors": len(linears),
        "seconds": round(time.perf_counter() - start, 3),
    }
    return RtnResult(model=model, record=record)
