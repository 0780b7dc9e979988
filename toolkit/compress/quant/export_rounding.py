"""The rounding an export really performs on each decoder linear: its stored type, and libggml with the matrix.

A GGUF export (exporters/gguf_exporter.py) converts the checkpoint to F16, then ``llama_model_quantize`` stores
each tensor ``W`` of type ``T`` (llama.cpp's per-tensor choice: ``toolkit.model.storage_types.gguf_tensor_types``,
e.g. ``Q4_K_M`` writes some ``attn_v`` / ``ffn_down`` as ``Q6_K``; ``Q4_0`` with a matrix writes the first
eighth of ``ffn_down`` as ``Q4_1``; rows not a multiple of 256 fall back to ``Q5_0`` / ``Q8_0``) as::

    W_export = to_float_T( ggml_quantize_chunk(T, f16(W), imatrix_W) )

where ``imatrix_W[j] = in_sum2_j / counts`` is the mean squared input of column ``j`` (exporters/gguf_imatrix.py)
or absent. Without a matrix libggml's reference rounding equals the torch emulations (``get_grid(T)``,
bit-exact); with one, every type rounds by a weighted search (``make_qx_quants`` / ``make_qkx3_quants`` in
ggml-quants.c, weights ``imatrix_j * sqrt(sigma2 + w_j^2)`` for the legacy types), which no torch grid
emulates: ``export_round`` calls libggml itself (``ggml_lib.LibggmlGrid``). ONNX schemes have no matrix; their
torch grids are the export's rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from toolkit.compress.quant.base import QuantGrid
from toolkit.compress.quant.ggml_lib import QUANTIZABLE_TYPES, LibggmlGrid, requires_imatrix
from toolkit.compress.quant.grids import get_grid, grid_for_row
from toolkit.core.formats import format_of_scheme


@dataclass(frozen=True)
class LinearRounding:
    """How one decoder linear is stored by the export.

    Attributes:
        type_name: the grid / ggml type the export stores it in (after llama.cpp's per-tensor rules).
        gguf: the export is llama.cpp's quantizer (rounds ``f16(W)`` with libggml).
        with_imatrix: the export passes an importance matrix for it (so the rounding is libggml's weighted one).
    """

    type_name: str
    gguf: bool
    with_imatrix: bool

    @property
    def grid(self) -> QuantGrid:
        """The registered grid of the stored type (a torch emulation, or libggml without a matrix)."""
        return get_grid(self.type_name)

    @property
    def quantized(self) -> bool:
        """False for float storage (F16, F32, fp16...): nothing to search."""
        return self.grid.bits < 16

    @property
    def emulation_is_exact(self) -> bool:
        """Whether the torch grid rounds exactly as the export (no matrix and a torch emulation)."""
        return not self.with_imatrix and not isinstance(self.grid, LibggmlGrid)

    @property
    def needs_matrix(self) -> bool:
        """Whether llama.cpp refuses this type without an importance matrix (IQ3_XXS, IQ2_*, IQ1_*)."""
        return self.gguf and requires_imatrix(self.type_name)

    def exact_grid(self, imatrix: np.ndarray | torch.Tensor | None) -> QuantGrid:
        """The grid whose ``fake_quantize`` is the export's rounding (apply to ``f16(W)`` where ``gguf``)."""
        if self.gguf and self.type_name in QUANTIZABLE_TYPES and (self.with_imatrix or self.needs_matrix):
            return LibggmlGrid(self.type_name, imatrix, threads=torch.get_num_threads())
        return self.grid


def clip_groups(weight: torch.Tensor, group_size: int, ratio: torch.Tensor) -> torch.Tensor:
    """Clamp each ``[out, group]`` of a float ``[out, in]`` weight to ``±ratio * max|w|`` of that group.

    Groups are ``group_size`` consecutive inputs (the last one zero-padded); ``ratio`` broadcasts to
    ``[out, ceil(in / group_size)]``.
    """
    out_features, in_features = weight.shape
    n_groups = -(-in_features // group_size)
    pad = n_groups * group_size - in_features
    w = torch.nn.functional.pad(weight, (0, pad)) if pad else weight
    groups = w.reshape(out_features, n_groups, group_size)
    bound = (groups.abs().amax(dim=-1) * ratio).unsqueeze(-1)
    clipped = torch.clamp(groups, -bound, bound).reshape(out_features, n_groups * group_size)
    return clipped[:, :in_features].contiguous()


def export_round(
    weight: torch.Tensor,
    rounding: LinearRounding,
    imatrix: np.ndarray | torch.Tensor | None,
    clip_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float32 weight the exported file holds for ``weight`` (formula in the module docstring).

    ``clip_ratio`` (``[out, n_groups]`` of the exact grid's ``group_size``) clamps groups first, in float32,
    as AWQ's clipping is applied before the checkpoint is saved and converted to F16.
    """
    grid = rounding.exact_grid(imatrix)
    values = weight.detach().to(torch.float32)
    if clip_ratio is not None:
        values = clip_groups(values, grid.group_size, clip_ratio)
    if rounding.gguf and rounding.quantized:
        values = values.to(torch.float16).to(torch.float32)  # the exporter's F16 intermediate
    return grid.fake_quantize(values).to(torch.float32)


def _gguf_types(model: nn.Module, scheme: str, with_imatrix: bool) -> dict[str, str]:
    """Full module name of each decoder linear -> ggml type llama.cpp writes it in (empty when unknown)."""
    from toolkit.model.architectures import text_family_in
    from toolkit.model.facts import facts_from_config
    from toolkit.model.storage_types import GGUF_MIXES, gguf_tensor_types

    config = getattr(model, "config", None)
    if config is None or scheme not in GGUF_MIXES:
        return {}
    text_config = config.get_text_config(decoder=True) if config is not None else None
    family = text_family_in(
        type(model).__name__, getattr(config, "model_type", None), getattr(text_config, "model_type", None)
    )
    if family is None:
        return {}
    try:
        facts = facts_from_config(config.to_dict())
        stored = gguf_tensor_types(facts, scheme, imatrix=with_imatrix)
    except Exception:  # an architecture the type table does not describe: the scheme's default per width
        return {}
    roles = {rule.role: rule.name.removesuffix(".weight") for rule in family.layer_tensors}
    types: dict[str, str] = {}
    for tensor in stored:
        if tensor.layer is None or tensor.role not in roles:
            continue
        types[f"{family.layers_path}.{tensor.layer}.{roles[tensor.role]}"] = tensor.dtype
    return types


def linear_roundings(
    model: nn.Module, scheme: str, names: Mapping[str, int], with_imatrix: bool
) -> dict[str, LinearRounding]:
    """How the export of ``scheme`` stores each named linear (full module name -> in_features).

    GGUF schemes follow llama.cpp's per-tensor type table (``with_imatrix`` changes some choices, e.g.
    ``Q4_0``'s ``ffn_down``); a name the table does not cover gets ``grid_for_row(scheme, in_features)``.
    """
    gguf = format_of_scheme(scheme) == "gguf" or (
        format_of_scheme(scheme) is None and get_grid(scheme).name in QUANTIZABLE_TYPES and scheme.isupper()
    )
    table = _gguf_types(model, scheme, with_imatrix) if gguf else {}
    out: dict[str, LinearRounding] = {}
    for name, in_features in names.items():
        type_name = table.get(name) or grid_for_row(scheme, in_features).name
        out[name] = LinearRounding(type_name=type_name, gguf=gguf, with_imatrix=gguf and with_imatrix)
    return out
