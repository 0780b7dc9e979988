"""Paired comparison of two artifacts scored on the same tokens: perplexity ratio with a block-bootstrap interval,
and where the difference comes from (by the reference model's probability of each token).

With per-token log-probabilities ``a_t``, ``b_t`` of the same N target tokens (``evaluate(...,
token_logprobs_path=...)``) and ``d_t = (-a_t) - (-b_t)`` (NLL of A minus NLL of B, nats):

    ratio = perplexity(A) / perplexity(B) = exp( (1/N) sum_t d_t )

The interval resamples whole blocks of ``block`` consecutive tokens with replacement (a moving-block bootstrap's
non-overlapping variant: neighbouring tokens' differences are correlated, so single tokens would give too
narrow an interval): ``B`` resamples of ``N // block`` blocks, ratio_b = exp(mean of the drawn blocks' means),
interval = the 2.5 and 97.5 percentiles; ``share_a_worse`` = the fraction of resamples with ratio_b > 1.

Decomposition by the reference model's probability ``p_t = exp(r_t)`` of the target token: for each bin
``[lo, hi)`` of ``p_t``, the mean NLL change of each artifact against the reference, ``mean(r_t - a_t)``, and the
bin's part of ``(1/N) sum_t d_t`` (the parts add up to the log of the ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.core.errors import BedsideError

PROBABILITY_BINS: tuple[float, ...] = (0.0, 0.01, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0)


@dataclass(frozen=True)
class PairedRatio:
    """perplexity(A) / perplexity(B) over the same tokens, its bootstrap interval and P(ratio > 1)."""

    ratio: float
    low: float
    high: float
    share_a_worse: float
    tokens: int
    block: int
    resamples: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    left = np.asarray(a, dtype=np.float64).ravel()
    right = np.asarray(b, dtype=np.float64).ravel()
    if left.shape != right.shape:
        raise BedsideError(
            f"paired comparison needs the same tokens: {left.size} vs {right.size} log-probabilities "
            "(score both artifacts on the same text, window and tokenizer)"
        )
    if not (np.isfinite(left).all() and np.isfinite(right).all()):
        raise BedsideError("paired comparison: a log-probability is not finite (NaN or infinite)")
    return left, right


def bootstrap_mean(
    values: Any, *, block: int = 1, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float, float]:
    """(mean, 2.5 and 97.5 percentiles of the block-bootstrap mean, share of resamples above 0) of `values`.

    ``N // block`` non-overlapping blocks of ``block`` consecutive values (the tail dropped) are drawn with
    replacement ``resamples`` times; each resample's statistic is the mean of its blocks' means. The returned
    mean is of all values.
    """
    data = np.asarray(values, dtype=np.float64).ravel()
    if block < 1 or resamples < 1:
        raise BedsideError(f"block ({block}) and resamples ({resamples}) must be at least 1")
    blocks = data.size // block
    if blocks < 2:
        raise BedsideError(f"{data.size} values make fewer than 2 blocks of {block}: measure more")
    means = data[: blocks * block].reshape(blocks, block).mean(axis=1)
    draws = np.random.default_rng(seed).integers(0, blocks, size=(resamples, blocks))
    boot = means[draws].mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(data.mean()), float(low), float(high), float((boot > 0).mean())


def paired_perplexity_ratio(
    a: Any, b: Any, *, block: int = 128, resamples: int = 10_000, seed: int = 0
) -> PairedRatio:
    """perplexity(A) / perplexity(B) with a block-bootstrap 95 % interval (module docstring)."""
    left, right = _pair(a, b)
    try:
        mean, low, high, worse = bootstrap_mean(right - left, block=block, resamples=resamples, seed=seed)
    except BedsideError as error:
        raise BedsideError(f"paired comparison: {error}") from None
    return PairedRatio(
        ratio=float(np.exp(mean)),
        low=float(np.exp(low)),
        high=float(np.exp(high)),
        share_a_worse=worse,
        tokens=int(left.size),
        block=block,
        resamples=resamples,
    )


def nll_change_by_reference_probability(
    reference: Any, a: Any, b: Any, bins: tuple[float, ...] = PROBABILITY_BINS
) -> list[dict[str, Any]]:
    """Per bin of the reference's probability of the target token: count, each artifact's mean NLL change against
    the reference (nats), and the bin's part of log(ratio) (module docstring)."""
    ref, left = _pair(reference, a)
    _, right = _pair(reference, b)
    if len(bins) < 2 or any(hi <= lo for lo, hi in zip(bins, bins[1:], strict=False)):
        raise BedsideError(f"probability bins must increase: {bins}")
    p = np.exp(ref)
    rows = []
    for index, (lo, hi) in enumerate(zip(bins, bins[1:], strict=False)):
        last = index == len(bins) - 2
        mask = (p >= lo) & ((p <= hi) if last else (p < hi))
        count = int(mask.sum())
        rows.append(
            {
                "p_low": lo,
                "p_high": hi,
                "tokens": count,
                "a_nll_change": float((ref[mask] - left[mask]).mean()) if count else None,
                "b_nll_change": float((ref[mask] - right[mask]).mean()) if count else None,
                "log_ratio_part": float((right[mask] - left[mask]).sum() / ref.size),
            }
        )
    return rows
