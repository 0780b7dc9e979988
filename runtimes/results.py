"""What runtimes return and raise: generation, score and measurement records, and the runtime errors.

Plain dataclasses with `to_dict` (JSON-ready, schema-versioned), so a measurement child can send
them back over a pipe and validation can store them in the report.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from toolkit.core.errors import BedsideError
from toolkit.core.metrics import mean_negative_logprob, perplexity_from_logprobs
from toolkit.core.records import SCHEMA_VERSION


class RuntimeLoadError(BedsideError):
    """An artifact cannot be loaded or run by a runtime: a one-line message that names the file.

    Raised for truncated or corrupted files, a missing tokenizer, a file given to the wrong
    runtime, and native crashes during measurement (see `RuntimeCrashError`). The toolkit
    translates it into its own user-facing error.
    """


class RuntimeCrashError(RuntimeLoadError):
    """The runtime's process died from a signal (segfault, abort) while running a measurement job."""


# ----------------------------------------------------------------------------------------------
# Result records


@dataclass
class GenerationResult:
    """One generated answer with the timing of its two phases."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos", "length" or "context" (the KV cache is full)
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Generated tokens per second of decoding; None when nothing was decoded."""
        if not self.token_ids or self.decode_seconds <= 0:
            return None
        return len(self.token_ids) / self.decode_seconds


@dataclass
class ScoreResult:
    """Log-probabilities of a scored sequence and what scoring cost, kept apart from deployment memory.

    `token_logprobs[t]` is log p(ids[t+1] | ids[:t+1]), so it has one entry fewer than the sequence.
    `peak_rss_bytes` is the process peak after scoring (it includes the full-vocabulary logit
    buffers that scoring needs and generation does not).
    """

    tokens: int
    token_logprobs: list[float]
    seconds: float
    peak_rss_bytes: int | None = None
    full_logprobs_path: str | None = None  # .npy file [tokens, vocab] when the job asked for one
    # Set when the job gave texts (`MeasureJob.score_texts`): the ids scored, window after window (the runtime's
    # own tokenizer's ids cut to `score_max_tokens`, each window opened by its BOS when it adds one), and the
    # lengths of those windows (fresh cache each).
    token_ids: list[int] | None = None
    window_lengths: list[int] | None = None
    # One entry per `MeasureJob.option_items` item: log p(option | chat prompt) per option, or None when
    # the prompt and its longest option do not fit the context.
    option_logprobs: list[list[float] | None] | None = None
    # One entry per `MeasureJob.image_items` item: {"answer_logprobs": [...], "options": [totals] or None,
    # "generated": greedy answer text or None}.
    image_results: list[dict[str, Any]] | None = None

    @property
    def mean_negative_logprob(self) -> float:
        """Mean negative log-likelihood per predicted token (nats); NaN when nothing was scored."""
        return mean_negative_logprob(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood) of the predicted tokens (`toolkit.core.metrics`)."""
        return perplexity_from_logprobs(self.token_logprobs)


@dataclass
class MeasureResult:
    """What one measurement job found, from a child process that ran nothing but that runtime.

    `peak_rss_bytes` is the peak resident memory of the child while it loads the model and fills a
    KV cache of `context` tokens (prefill, then decode up to the end of the context): what a
    deployment at that context uses. It includes the Python interpreter and the runtime's
    libraries, whose share before loading is `baseline_rss_bytes`. Scoring memory is in
    `score.peak_rss_bytes`, never here. `peak_vram_bytes` is None without an NVIDIA GPU.
    """

    runtime: str
    path: str
    device: str
    context: int
    n_threads: int | None
    load_seconds: float
    prefill_tokens: int
    prefill_seconds: float
    decode_tokens: int
    decode_seconds: float
    baseline_rss_bytes: int
    loaded_rss_bytes: int
    rss_at_context_bytes: int
    peak_rss_bytes: int
    peak_vram_bytes: int | None = None
    score: ScoreResult | None = None
    details: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens processed per second while filling the KV cache."""
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens generated per second, one at a time, at the end of a full context."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the derived speeds included for readers of the JSON."""
        data = dataclasses.asdict(self)
        data["prefill_tokens_per_s"] = self.prefill_tokens_per_s
        data["decode_tokens_per_s"] = self.decode_tokens_per_s
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MeasureResult:
        """Inverse of `to_dict` (derived fields are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {key: value for key, value in data.items() if key in names}
        if kwargs.get("score") is not None:
            score_names = {f.name for f in dataclasses.fields(ScoreResult)}
            kwargs["score"] = ScoreResult(**{k: v for k, v in kwargs["score"].items() if k in score_names})
        return cls(**kwargs)

    def to_json(self) -> str:
        """JSON text of `to_dict`."""
        return json.dumps(self.to_dict(), indent=2)
