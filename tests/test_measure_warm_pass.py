"""runtimes.measure's warm pass: speeds from a second prefill + decode, memory from the first (fast, fake runtime)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

import runtimes.measure as measure
from runtimes.measure import MeasureJob, run_job
from runtimes.registry import RUNNERS
from runtimes.runner import Message, Runner


class _SlowFirstRunner(Runner):
    """A runtime whose first pass over the context is slow (a cold runtime): 2 ms per call, then 0.2 ms."""

    name = "slow-first"

    def __init__(self, batch_size: int | None = None) -> None:
        super().__init__(batch_size or 16)
        self.calls: list[tuple[int, int]] = []  # (n_past, tokens) per call
        self.passes = 0

    def _load(self, path: Path, *, n_ctx: int, n_threads: int | None, device: str) -> None:
        self.path = path

    @property
    def vocab_size(self) -> int:
        return 8

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return [1, 2, 3]

    def detokenize(self, ids: Sequence[int]) -> str:
        return ""

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return ""

    def is_end_of_generation(self, token: int) -> bool:
        return False

    def reset(self) -> None:
        self.n_past = 0
        self.passes += 1

    def _forward(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        self.calls.append((self.n_past, len(ids)))
        time.sleep(0.002 if self.passes <= 1 else 0.0002)
        return np.zeros((len(ids) if all_logits else 1, 8), dtype=np.float32)


def test_speeds_come_from_the_warm_pass_and_memory_from_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    runners: list[_SlowFirstRunner] = []

    def make(**options: object) -> _SlowFirstRunner:
        runners.append(_SlowFirstRunner(**options))
        return runners[-1]

    monkeypatch.setitem(RUNNERS, "slow-first", make)
    readings = iter(range(100, 10_000, 100))  # every resident-memory reading is larger than the one before
    monkeypatch.setattr(measure, "current_rss_bytes", lambda: next(readings))
    monkeypatch.setattr(measure, "peak_rss_bytes", lambda: 0)

    monkeypatch.delenv("BEDSIDE_MEASURE_WARM_PASS", raising=False)  # the product's default: two passes
    result = run_job("slow-first", Path("model.bin"), MeasureJob(context=64, decode_tokens=8, n_threads=1))
    runner = runners[0]
    # two identical passes from an empty cache: prefill 56 tokens in chunks of 16, then 8 single-token steps
    one_pass = [(0, 16), (16, 16), (32, 16), (48, 8), *((56 + i, 1) for i in range(8))]
    assert runner.calls == one_pass + one_pass
    assert result.prefill_tokens == 56 and result.decode_tokens == 8
    details = result.details
    assert details["first_pass_decode_seconds"] > 8 * 0.002 > result.decode_seconds
    assert details["first_pass_prefill_seconds"] > 4 * 0.002 > result.prefill_seconds
    # memory: baseline 100, loaded 200, at context 300 (after the first pass), 400 after the warm pass
    assert (result.baseline_rss_bytes, result.loaded_rss_bytes, result.rss_at_context_bytes) == (
        100,
        200,
        300,
    )
    assert result.peak_rss_bytes == 300 and details["warm_pass_rss_bytes"] == 400


def test_without_the_warm_pass_one_pass_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    runners: list[_SlowFirstRunner] = []

    def make(**options: object) -> _SlowFirstRunner:
        runners.append(_SlowFirstRunner(**options))
        return runners[-1]

    monkeypatch.setitem(RUNNERS, "slow-first", make)
    result = run_job(
        "slow-first", Path("model.bin"), MeasureJob(context=64, decode_tokens=8, n_threads=1, warm_pass=False)
    )
    assert len(runners[0].calls) == 12
    assert result.decode_seconds > 8 * 0.002
    assert "first_pass_decode_seconds" not in result.details


def test_the_warm_pass_is_the_default_unless_the_environment_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(measure.WARM_PASS_ENV, raising=False)
    assert MeasureJob().warm_pass is True
    monkeypatch.setenv(measure.WARM_PASS_ENV, "0")
    assert MeasureJob().warm_pass is False
    assert MeasureJob(warm_pass=True).warm_pass is True  # an explicit request wins
