"""The quality figures every room reports, defined once: perplexity and top-1 agreement.

Over the N predicted positions t of a text (every position of a block or window but its last),
with q the model under test and p a reference model:

    perplexity      = exp( sum_t -log q(x_{t+1} | x_<=t) / N )            (nll_sum / N: mean NLL, nats)
    top1_agreement  = (1/N) sum_t [ argmax_v q(v | x_<=t) == argmax_v p(v | x_<=t) ]

Callers gather the per-token figures their own way (a torch forward in the compress stages and the
benchmarks, a runtime's KV cache in `runtimes`, memory-mapped log-probability files in validation)
and hand them here, so every perplexity and agreement in a record is the same formula. numpy only:
`toolkit.core` must stay importable without torch.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def perplexity(nll_sum: float, count: int) -> float:
    """exp(nll_sum / count): perplexity from the summed negative log-likelihood of `count` tokens (nats).

    NaN when no token was scored (`count` 0).
    """
    if count <= 0:
        return float("nan")
    return math.exp(float(nll_sum) / count)


def mean_negative_logprob(token_logprobs: Any) -> float:
    """-(1/N) sum_t log q(x_t): mean negative log-likelihood of per-token log-probabilities (nats).

    Takes a sequence or array of log-probabilities (natural log); NaN when it is empty.
    """
    values = np.asarray(token_logprobs, dtype=np.float64)
    return float(-np.mean(values)) if values.size else float("nan")


def perplexity_from_logprobs(token_logprobs: Any) -> float:
    """exp(-(1/N) sum_t log q(x_t)): perplexity of per-token log-probabilities; NaN when empty."""
    return float(np.exp(mean_negative_logprob(token_logprobs)))


def top1_matches(predicted_ids: Any, reference_ids: Any) -> int:
    """Number of positions where two arrays of argmax token ids (same shape) hold the same id."""
    predicted = np.asarray(predicted_ids)
    reference = np.asarray(reference_ids)
    if predicted.shape != reference.shape:
        raise ValueError(f"argmax arrays differ in shape: {predicted.shape} vs {reference.shape}")
    return int(np.count_nonzero(predicted == reference))


def top1_agreement(predicted_ids: Any, reference_ids: Any) -> float:
    """Share of positions where the two models rank the same token first; NaN when there is none.

    Takes the argmax ids of each model (numpy arrays or CPU torch tensors, same shape).
    """
    size = int(np.asarray(predicted_ids).size)
    matches = top1_matches(predicted_ids, reference_ids)
    return matches / size if size else float("nan")
