"""toolkit.plan.compression_memory mirrors compression defaults as plain numbers (`bedside plan` must not import torch):
each mirrored figure is checked against the code it describes, so the estimate follows a change of those defaults."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from toolkit.compress.prune.methods.activation import select_activation
from toolkit.compress.quant import awq
from toolkit.compress.stages import perplexity
from toolkit.plan import compression_memory as estimate

REPO = Path(__file__).resolve().parents[1]


def _default(function: object, name: str) -> object:
    return inspect.signature(function).parameters[name].default  # type: ignore[arg-type]


def test_mirrored_awq_figures_are_awqs_defaults() -> None:
    assert estimate.AWQ_CLIP_ROWS == awq.CLIP_OUT_ROWS
    assert _default(awq.AwqSearch.__init__, "search_tokens") == estimate.AWQ_SEARCH_TOKENS
    assert _default(awq.AwqSearch.__init__, "clip_tokens") == estimate.AWQ_CLIP_TOKENS
    assert _default(awq.AwqSearch.__init__, "batch_size") == estimate.AWQ_BATCH


def test_mirrored_activation_and_perplexity_figures_are_their_defaults() -> None:
    assert _default(select_activation, "max_sequences") == estimate.ACTIVATION_SEQUENCES
    assert _default(select_activation, "max_tokens") == estimate.ACTIVATION_TOKENS
    assert _default(perplexity, "batch_size") == estimate.PERPLEXITY_BATCH


def test_the_estimator_imports_no_torch() -> None:
    """The reason the figures are mirrored: importing the estimator loads neither torch nor the compress code."""
    probe = (
        "import sys, toolkit.plan.compression_memory; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('toolkit.compress')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"
