"""Stages that change weights, block by block: the linear replacement's fit, the pruned checkpoint, AWQ.

Each writes its output checkpoint shard by shard in the source's dtype (`ShardWriter`): only the
tensors a stage changes are computed and put, every other kept tensor is copied byte for byte, and a
shard with nothing renamed or changed is hard-linked. The values are the in-memory path's: the
in-memory path loads float32, changes, and saves in the storage dtype; here the changed tensors are
computed in float32 from the same widened values and cast to the same dtype on writing, and a tensor
that does not change is the same bytes either way.

- Linear replacement (ReplaceMe, formulas in `toolkit.compress.prune.replace`): one pass of the
  original model over the calibration blocks up to the deepest span output, holding per open span
  the span input h_s and the MLP output m_{s-1} of each batch; the sums G = X^T X and C = X^T R are
  added batch by batch in the in-memory order; a second pass over the held-apart blocks measures the
  fitted maps. The maps are folded when the pruned checkpoint is written (W' = T^T W in float64).
- Pruning: layers renamed to their new indices, removed layers dropped, the config's per-layer
  lists cut (`prune_config`).
- AWQ: `AwqSearch.layer` on each loaded block (the in-memory code itself), the block then written.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.compress.prune.replace import (
    DEFAULT_RIDGE,
    HeldApartErrors,
    Span,
    SpanStatistics,
    check_layer_indices,
    fold_target,
    replacement_record,
    span_entry,
    spans_of,
)
from toolkit.compress.prune.surgery import prune_config
from toolkit.compress.quant.awq import AwqSearch
from toolkit.compress.sequential.checkpoint import ShardWriter
from toolkit.compress.sequential.model import LazyModel, first_output
from toolkit.compress.sequential.scoring import LayerHook, _timed_layers
from toolkit.core.errors import BedsideError

# Checkpoint files a stage never rewrites, carried from the stage's input folder (weights and config aside).
WEIGHT_SUFFIXES = (".safetensors",)
REWRITTEN = ("config.json", "model.safetensors.index.json", "stage.json")


# ---------------------------------------------------------------------------------------------
# Linear replacement
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _span_pass(
    lazy: LazyModel,
    spans: Sequence[Span],
    input_ids: torch.Tensor,
    callback: Callable[[Span, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
    batch_size: int,
) -> None:
    """`toolkit.compress.prune.replace.stream_spans` block by block: callback(span, x, base, h_s, h_{e+1})."""
    hidden_size = int(lazy.config.get_text_config(decoder=True).hidden_size)
    batches = [input_ids[start : start + batch_size] for start in range(0, input_ids.shape[0], batch_size)]
    captured = lazy.capture(batches)
    states = [state for state, _ in captured]
    kwargs = [extra for _, extra in captured]
    starts = {span.start for span in spans}
    last_needed = max(span.output_boundary for span in spans)
    span_inputs: dict[int, list[torch.Tensor]] = {}
    mlp_outputs: dict[int, list[torch.Tensor]] = {}

    def deliver(boundary: int) -> None:
        if boundary in starts:
            span_inputs[boundary] = list(states)
        for span in spans:
            if span.output_boundary != boundary:
                continue
            for batch, output_state in enumerate(states):
                span_input = span_inputs[span.start][batch].reshape(-1, hidden_size).float()
                output = output_state.reshape(-1, hidden_size).float()
                if span.start > 0:
                    regressor = mlp_outputs[span.start - 1][batch].reshape(-1, hidden_size).float()
                    base = span_input - regressor
                else:
                    regressor = span_input
                    base = torch.zeros_like(span_input)
                callback(span, regressor, base, span_input, output)

    deliver(0)
    for index in range(last_needed):
        layer = lazy.load_layer(index)
        try:
            handle = None
            if index + 1 in starts:
                mlp_outputs[index] = []
                down = layer.get_submodule("mlp.down_proj")
                handle = down.register_forward_hook(
                    lambda _m, _a, output, index=index: mlp_outputs[index].append(output.detach())
                )
            try:
                states = [first_output(layer(state, **extra)).detach() for state, extra in zip(states, kwargs, strict=True)]
            finally:
                if handle is not None:
                    handle.remove()
        finally:
            lazy.release_layer(index)
        deliver(index + 1)


@torch.no_grad()
def sequential_replacement(
    lazy: LazyModel,
    layers: Sequence[int],
    calib_input_ids: torch.Tensor,
    *,
    eval_input_ids: torch.Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 4,
) -> tuple[dict[Span, tuple[str, torch.Tensor]], dict[str, Any]]:
    """Fit the maps of `toolkit.compress.prune.replace.replace_removed_layers` (strict=False) block by block.

    Returns ({span: (fold kind, T)}, the record compression.json keeps); nothing is folded yet.
    """
    if ridge < 0:
        raise BedsideError(f"linear replacement: the ridge must be >= 0, got {ridge}")
    removed = check_layer_indices(list(layers), lazy.num_layers)
    targets: dict[Span, str] = {}
    skipped: list[dict[str, Any]] = []
    for span in spans_of(removed):
        target = fold_target(lazy.model, span)
        if isinstance(target, str):
            skipped.append({"layers": span.layers, "reason": target})
        else:
            targets[span] = target[0]
    hidden_size = int(lazy.config.get_text_config(decoder=True).hidden_size)
    maps: dict[Span, torch.Tensor] = {}
    entries: list[dict[str, Any]] = []
    if targets:
        statistics = {span: SpanStatistics(hidden_size) for span in targets}
        _span_pass(
            lazy,
            list(targets),
            calib_input_ids,
            lambda span, x, base, h_in, h_out: statistics[span].add(x, h_out - base, h_in, h_out),
            batch_size,
        )
        for span, stats in statistics.items():
            maps[span] = stats.solve(ridge)
        held: dict[Span, tuple[float, float, int]] = {}
        if eval_input_ids is not None and eval_input_ids.numel() > 0:
            measure = HeldApartErrors(maps)
            _span_pass(lazy, list(maps), eval_input_ids, measure, batch_size)
            held = measure.result()
        for span, kind in targets.items():
            entries.append(span_entry(span, kind, statistics[span], maps[span], held.get(span)))
    record = replacement_record(ridge, entries, skipped)
    return {span: (targets[span], maps[span]) for span in maps}, record


# ---------------------------------------------------------------------------------------------
# Writing checkpoints
# ---------------------------------------------------------------------------------------------


def write_config_and_files(
    lazy: LazyModel,
    folder: Path,
    *,
    kept: Sequence[int] | None = None,
    extra_source: Path | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """config.json (per-layer lists cut to `kept`), and every non-weight file of the input folder carried over.

    `extra_source`: the original checkpoint, whose carried files (chat template, generation config)
    are copied when the input folder lacks them (as `save_checkpoint` does).
    """
    config = lazy.model.config.__class__.from_dict(lazy.model.config.to_dict())
    if kept is not None:
        text = config.get_text_config(decoder=True)
        prune_config(text, kept, lazy.num_layers)
        if text is not config:
            prune_config(config, kept, lazy.num_layers)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(folder)
    for source in (lazy.folder, extra_source):
        if source is None:
            continue
        for path in sorted(Path(source).iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and not path.name.endswith(WEIGHT_SUFFIXES)
                and path.name not in REWRITTEN
                and not (folder / path.name).exists()
            ):
                shutil.copy2(path, folder / path.name)


def _layer_renamer(lazy: LazyModel, kept: Sequence[int]) -> Callable[[str], str | None]:
    prefix = lazy.family.layers_path + "."
    short = prefix.removeprefix("model.")
    new_index = {old: new for new, old in enumerate(kept)}

    def rename(name: str) -> str | None:
        for lead in (prefix, short):
            if name.startswith(lead):
                index_text, _, rest = name[len(lead) :].partition(".")
                if not index_text.isdigit():
                    return name
                index = int(index_text)
                return f"{lead}{new_index[index]}.{rest}" if index in new_index else None
        return name

    return rename


@torch.no_grad()
def write_pruned(
    lazy: LazyModel,
    folder: Path,
    removed: Sequence[int],
    folds: dict[Span, tuple[str, torch.Tensor]],
    *,
    extra_source: Path | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """The checkpoint without the layers `removed`, each span's map folded (W' = T^T W, b' = b T, E' = E T)."""
    kept = [index for index in range(lazy.num_layers) if index not in set(removed)]
    rename = _layer_renamer(lazy, kept)
    updates: dict[str, torch.Tensor] = {}
    for span, (kind, transform) in folds.items():
        t = transform.to(torch.float64)
        if kind == "down_proj":
            path = f"{lazy.layer_path(span.start - 1)}.mlp.down_proj"
            weight = lazy.checkpoint.read(f"{path}.weight").to(torch.float32)
            updates[f"{path}.weight"] = (t.T @ weight.double()).to(torch.float32)
            if f"{path}.bias" in lazy.checkpoint:
                bias = lazy.checkpoint.read(f"{path}.bias").to(torch.float32)
                updates[f"{path}.bias"] = (bias.double() @ t).to(torch.float32)
        else:
            name = f"{lazy.family.base_model_path}.{lazy.family.embedding_name}"
            weight = lazy.checkpoint.read(name).to(torch.float32)
            updates[name] = (weight.double() @ t).to(torch.float32)
    stored = {lazy.checkpoint.resolve(name): value for name, value in updates.items()}
    changed = {rename(name): value for name, value in stored.items() if name is not None}
    writer = ShardWriter(lazy.checkpoint, folder, rename, {name for name in changed if name is not None})
    try:
        for name, value in changed.items():
            assert name is not None
            writer.put(name, value)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    write_config_and_files(lazy, folder, kept=kept, extra_source=extra_source, dtype=dtype)


def _layer_names(lazy: LazyModel, index: int, layer: nn.Module) -> dict[str, str]:
    """Module tensor name within the layer -> stored checkpoint name."""
    names = {}
    for name in layer.state_dict():
        stored = lazy.checkpoint.resolve(f"{lazy.layer_path(index)}.{name}")
        if stored is not None:
            names[name] = stored
    return names


@torch.no_grad()
def sequential_awq(
    lazy: LazyModel,
    folder: Path,
    calib_ids: torch.Tensor,
    scheme: str,
    *,
    imatrix_path: Path | None,
    extra_source: Path | None = None,
    dtype: torch.dtype | None = None,
    on_layer: LayerHook | None = None,
    **knobs: Any,
) -> dict[str, Any]:
    """AWQ (`toolkit.compress.quant.awq`) one block at a time into `folder`; the record `awq` returns."""
    search = AwqSearch(lazy.model, calib_ids, scheme, imatrix_path=imatrix_path, **knobs)
    inputs: list[tuple[torch.Tensor, dict[str, Any]]] = lazy.capture(search.batches)
    changed = {
        stored
        for index in range(lazy.num_layers)
        for stored in _layer_names(lazy, index, lazy.layers[index]).values()
    }
    writer = ShardWriter(lazy.checkpoint, folder, lambda name: name, changed)
    try:
        for index, layer in _timed_layers(lazy, on_layer):
            inputs = search.layer(index, layer, inputs)
            state = layer.state_dict()
            for name, stored in _layer_names(lazy, index, layer).items():
                writer.put(stored, state[name])
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    write_config_and_files(lazy, folder, extra_source=extra_source, dtype=dtype)
    return search.finish()
