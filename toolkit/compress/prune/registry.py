"""Layer-selection methods by name: the record they return and the registry they sign up in.

A method is a function

    select(model, calib_input_ids, n_remove, *, knob=default, ...) -> LayerSelection

decorated with `@register_selection_method("name")`. Adding one is one file under
`toolkit/compress/prune/methods/` plus one import line in `toolkit/compress/prune/methods/__init__.py`. The
registry's wrapper (`SelectionMethod.select`) does what every method would otherwise repeat:
check the request (how many layers, calibration tensor, knob names), time the call, and check the
answer (count, range, one score per layer).

Score convention, for every method: `scores[i]` is one number per ORIGINAL decoder layer i, and
HIGHER MEANS MORE IMPORTANT (removing it costs more). Methods that select by "least important
first" remove the layers with the lowest scores; methods that select a block (angular) or follow a
fixed rule (last) still report per-layer scores on that scale. The planner reads them as measured
sensitivity.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from toolkit.compress.prune.stack import check_calibration_ids, find_decoder_stack
from toolkit.core.errors import BedsideError

SelectFunction = Callable[..., "LayerSelection"]


@dataclass(frozen=True)
class LayerSelection:
    """Which decoder layers a method chose to remove, and how it ranked every layer.

    Attributes:
        method: registry name of the method.
        layers_to_remove: original indices of the layers to remove, ascending.
        scores: one per original layer; higher = more important (see the module docstring).
        forward_passes: full passes over the calibration sequences the method ran (a pass of only
            the decoder, without the vocabulary projection, counts as one too).
        seconds: wall time of the selection.
        details: method-specific, JSON-serialisable facts (e.g. the greedy path of `activation`).
    """

    method: str
    layers_to_remove: list[int]
    scores: list[float]
    forward_passes: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (the shape compression.json's `layer_scores` takes from)."""
        return asdict(self)


@dataclass(frozen=True)
class SelectionMethod:
    """A registered method: the function plus what the registry knows about it."""

    name: str
    function: SelectFunction
    needs_calibration: bool = True

    @property
    def summary(self) -> str:
        """First line of the method's docstring."""
        return (inspect.getdoc(self.function) or "").splitlines()[0] if self.function.__doc__ else ""

    @property
    def knobs(self) -> dict[str, Any]:
        """Keyword-only parameters of the method with their defaults."""
        parameters = inspect.signature(self.function).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def select(
        self, model: nn.Module, calib_input_ids: torch.Tensor | None, n_remove: int, **knobs: Any
    ) -> LayerSelection:
        """Check the request, run the method, time it, and check its answer."""
        unknown = sorted(set(knobs) - set(self.knobs))
        if unknown:
            known = ", ".join(self.knobs) or "none"
            raise BedsideError(f"selection method {self.name!r} has no knob {unknown[0]!r} (knobs: {known})")
        num_layers = find_decoder_stack(model).num_layers
        if isinstance(n_remove, bool) or not isinstance(n_remove, int) or n_remove < 0:
            raise BedsideError(
                f"the number of layers to remove must be a whole number >= 0, got {n_remove!r}"
            )
        if n_remove >= num_layers:
            raise BedsideError(
                f"cannot remove {n_remove} of {num_layers} decoder layers: at least one must remain"
            )
        if self.needs_calibration:
            calib_input_ids = check_calibration_ids(calib_input_ids)
        was_training = model.training
        model.eval()  # no dropout while measuring
        start = time.perf_counter()
        try:
            with torch.no_grad():
                selection = self.function(model, calib_input_ids, n_remove, **knobs)
        finally:
            model.train(was_training)
        seconds = time.perf_counter() - start
        _check_answer(self.name, selection, n_remove, num_layers)
        return replace(
            selection,
            method=self.name,
            layers_to_remove=sorted(selection.layers_to_remove),
            scores=[float(score) for score in selection.scores],
            seconds=seconds,
        )


def _check_answer(name: str, selection: LayerSelection, n_remove: int, num_layers: int) -> None:
    """A method's answer must be usable as is: a bug here is ours, not the user's (AssertionError)."""
    chosen = selection.layers_to_remove
    if len(chosen) != n_remove or len(set(chosen)) != n_remove:
        raise AssertionError(f"{name}: asked for {n_remove} distinct layers, got {chosen}")
    if any(not 0 <= index < num_layers for index in chosen):
        raise AssertionError(f"{name}: layer index out of range in {chosen} ({num_layers} layers)")
    if len(selection.scores) != num_layers:
        raise AssertionError(f"{name}: {len(selection.scores)} scores for {num_layers} layers")


SELECTION_METHODS: dict[str, SelectionMethod] = {}


def register_selection_method(
    name: str, *, needs_calibration: bool = True
) -> Callable[[SelectFunction], SelectFunction]:
    """Decorator: make `select(model, calib_input_ids, n_remove, **knobs)` available as `name`."""

    def register(function: SelectFunction) -> SelectFunction:
        if name in SELECTION_METHODS:
            raise ValueError(f"selection method {name!r} is registered twice")
        SELECTION_METHODS[name] = SelectionMethod(name, function, needs_calibration)
        return function

    return register


def get_selection_method(name: str) -> SelectionMethod:
    """The registered method called `name`; a user error naming the choices if there is none."""
    try:
        return SELECTION_METHODS[name]
    except KeyError:
        raise BedsideError(
            f"unknown layer-selection method {name!r}: choose one of {', '.join(sorted(SELECTION_METHODS))}"
        ) from None


def select_layers(
    method: str, model: nn.Module, calib_input_ids: torch.Tensor | None, n_remove: int, **knobs: Any
) -> LayerSelection:
    """Choose `n_remove` decoder layers of `model` to remove with the method called `method`."""
    return get_selection_method(method).select(model, calib_input_ids, n_remove, **knobs)
