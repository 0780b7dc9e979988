"""toolkit.core.metrics and toolkit.core.memory_sampling: the one home of perplexity, top-1 agreement and memory readings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtimes.results import ScoreResult
from toolkit.core.memory_sampling import (
    current_rss_bytes,
    peak_rss_bytes,
    proc_status_bytes,
    read_proc_status,
)
from toolkit.core.metrics import (
    mean_negative_logprob,
    perplexity,
    perplexity_from_logprobs,
    top1_agreement,
    top1_matches,
)


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood() -> None:
    logprobs = [math.log(0.5), math.log(0.25), math.log(0.125)]
    nll = -sum(logprobs)
    assert perplexity(nll, 3) == pytest.approx(math.exp(nll / 3))
    assert perplexity(nll, 3) == pytest.approx(4.0)  # geometric mean of 1/p: (2 * 4 * 8) ** (1/3)
    assert perplexity_from_logprobs(logprobs) == pytest.approx(4.0)
    assert mean_negative_logprob(np.array(logprobs)) == pytest.approx(nll / 3)
    assert math.isnan(perplexity(0.0, 0))
    assert math.isnan(perplexity_from_logprobs([]))
    assert math.isnan(mean_negative_logprob([]))


def test_score_result_reports_the_core_perplexity() -> None:
    logprobs = [-1.25, -0.5, -3.0, -0.125]
    score = ScoreResult(tokens=5, token_logprobs=logprobs, seconds=0.0)
    assert score.mean_negative_logprob == mean_negative_logprob(logprobs)
    assert score.perplexity == perplexity_from_logprobs(logprobs)
    assert score.perplexity == pytest.approx(math.exp(sum(-v for v in logprobs) / len(logprobs)))
    assert math.isnan(ScoreResult(tokens=0, token_logprobs=[], seconds=0.0).perplexity)


def test_top1_agreement_counts_equal_argmax_ids() -> None:
    predicted = np.array([[1, 2, 3], [4, 5, 6]])
    reference = np.array([[1, 0, 3], [4, 5, 0]])
    assert top1_matches(predicted, reference) == 4
    assert top1_agreement(predicted, reference) == pytest.approx(4 / 6)
    assert top1_agreement(predicted, predicted) == 1.0
    assert math.isnan(top1_agreement(np.zeros(0), np.zeros(0)))
    with pytest.raises(ValueError, match="shape"):
        top1_matches(predicted, reference[:1])


def test_torch_argmax_tensors_are_accepted() -> None:
    torch = pytest.importorskip("torch")
    predicted = torch.tensor([[0, 1], [2, 3]])
    assert top1_agreement(predicted, torch.tensor([[0, 1], [2, 0]])) == pytest.approx(0.75)


def test_memory_readings_of_this_process() -> None:
    current = current_rss_bytes()
    assert current > 0
    if read_proc_status("VmRSS") is None:
        pytest.skip("no /proc/self/status on this system")
    assert proc_status_bytes("VmHWM") >= proc_status_bytes("VmRSS") > 0
    assert peak_rss_bytes() == proc_status_bytes("VmHWM") or peak_rss_bytes() >= current // 2
    assert read_proc_status("NoSuchField") is None
    with pytest.raises(RuntimeError, match="NoSuchField"):
        proc_status_bytes("NoSuchField")
