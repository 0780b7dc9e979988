"""Paired perplexity comparison (toolkit/validate/paired.py): ratio, block-bootstrap interval, decomposition."""

from __future__ import annotations

import math

import numpy as np
import pytest

from toolkit.core.errors import BedsideError
from toolkit.validate.paired import nll_change_by_reference_probability, paired_perplexity_ratio


def test_identical_and_shifted_artifacts_give_exact_ratios():
    rng = np.random.default_rng(1)
    b = -rng.exponential(2.0, size=1024)
    same = paired_perplexity_ratio(b, b, block=64, resamples=500)
    assert (same.ratio, same.low, same.high, same.share_a_worse) == (1.0, 1.0, 1.0, 0.0)
    worse = paired_perplexity_ratio(b - 0.05, b, block=64, resamples=500)  # A loses 0.05 nats on every token
    assert worse.ratio == pytest.approx(math.exp(0.05), rel=1e-12)
    assert worse.low == pytest.approx(math.exp(0.05), rel=1e-12) and worse.high == pytest.approx(worse.low)
    assert worse.share_a_worse == 1.0 and worse.tokens == 1024


def test_interval_covers_the_true_shift_and_narrows_with_more_tokens():
    covered, widths = 0, {4096: [], 16384: []}
    for seed in range(20):
        rng = np.random.default_rng(seed)
        for tokens in widths:
            b = -rng.exponential(2.0, size=tokens)
            a = b - 0.01 + rng.normal(0.0, 0.5, size=tokens)  # true log-ratio 0.01 nats, noisy per token
            result = paired_perplexity_ratio(a, b, block=32, resamples=1000, seed=seed)
            assert result.ratio == pytest.approx(math.exp(np.mean(b - a)), rel=1e-12)
            covered += result.low < math.exp(0.01) < result.high
            widths[tokens].append(math.log(result.high) - math.log(result.low))
    assert covered >= 34  # of 40 95 % intervals (expected 38)
    assert np.mean(widths[16384]) == pytest.approx(np.mean(widths[4096]) / 2, rel=0.1)  # 4x the tokens, half


def test_blocks_widen_the_interval_of_correlated_differences():
    rng = np.random.default_rng(3)
    shared = np.repeat(rng.normal(0.0, 0.3, size=64), 64)  # one draw per 64 neighbouring tokens
    b = np.full(shared.size, -2.0)
    a = b - shared
    single = paired_perplexity_ratio(a, b, block=1, resamples=2000)
    blocked = paired_perplexity_ratio(a, b, block=64, resamples=2000)
    width = lambda r: math.log(r.high) - math.log(r.low)  # noqa: E731
    assert width(blocked) > 4 * width(single)


def test_decomposition_by_reference_probability_adds_up_to_the_log_ratio():
    reference = np.log(np.array([0.005, 0.03, 0.3, 0.9, 0.99, 1.0]))
    a = reference - np.array([0.1, 0.0, 0.2, 0.0, 0.0, 0.0])
    b = reference - np.array([-0.3, 0.1, 0.0, 0.0, 0.0, 0.0])
    rows = nll_change_by_reference_probability(reference, a, b, bins=(0.0, 0.01, 0.5, 1.0))
    assert [row["tokens"] for row in rows] == [1, 2, 3]  # p = 1.0 falls in the last, closed bin
    assert rows[0]["a_nll_change"] == pytest.approx(0.1) and rows[0]["b_nll_change"] == pytest.approx(-0.3)
    assert rows[1]["a_nll_change"] == pytest.approx(0.1) and rows[1]["b_nll_change"] == pytest.approx(0.05)
    total = sum(row["log_ratio_part"] for row in rows)
    assert total == pytest.approx(math.log(paired_perplexity_ratio(a, b, block=1, resamples=10).ratio))
    assert rows[0]["log_ratio_part"] == pytest.approx(0.4 / 6)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (np.zeros(10), np.zeros(12), {}, "same tokens: 10 vs 12"),
        (np.array([0.0, np.nan]), np.zeros(2), {}, "not finite"),
        (np.zeros(100), np.zeros(100), {"block": 64}, "100 values make fewer than 2 blocks of 64"),
        (np.zeros(100), np.zeros(100), {"block": 0}, "must be at least 1"),
    ],
)
def test_bad_inputs_are_refused_with_the_fix(a, b, kwargs, message):
    with pytest.raises(BedsideError, match=message):
        paired_perplexity_ratio(a, b, **kwargs)


def test_bins_must_increase():
    with pytest.raises(BedsideError, match="bins must increase"):
        nll_change_by_reference_probability(np.zeros(3), np.zeros(3), np.zeros(3), bins=(0.0, 0.5, 0.5))


def test_the_bench_reports_the_paired_ratio_and_its_decomposition():
    from bench.paired_perplexity import compare, report

    rng = np.random.default_rng(4)
    reference = np.log(rng.uniform(0.001, 1.0, size=2048))
    rows = {}
    for method, shift in (("awq", 0.02), ("awq-gptq", -0.01), ("imatrix", 0.0)):
        artifact = reference - 0.1 - shift
        rows[method] = {"kl": 0.1, "perplexity": float(np.exp(-artifact.mean())), "top1_agreement": 0.8,
                        "logprobs": {"artifact": artifact, "reference": reference,
                                     "window_lengths": [513] * 4}}  # fmt: skip
    paired = {method: compare(rows, method) for method in ("awq", "awq-gptq")}
    assert paired["awq"]["ratio"]["ratio"] == pytest.approx(math.exp(0.02), rel=1e-9)
    assert paired["awq-gptq"]["ratio"]["ratio"] == pytest.approx(math.exp(-0.01), rel=1e-9)
    assert paired["awq"]["float_perplexity"] == pytest.approx(float(np.exp(-reference.mean())))
    record = {"command": "x", "tokens": 2048, "started": "s", "finished": "f", "loadavg": [], "schemes": {
        "Q4_0": {"rows": rows, "paired": paired}}}  # fmt: skip
    text = report(record)
    assert f"awq / imatrix: ratio **{math.exp(0.02):.4f}**" in text and "awq worse in 100.0 % of resamples" in text
    assert f"awq-gptq / imatrix: ratio **{math.exp(-0.01):.4f}**" in text and "awq-gptq worse in 0.0 %" in text
    assert text.count("\n| ") == 2 * (1 + 1 + 7)  # per method: header, rule, one row per probability bin
    assert "Predictive entropy" not in text
    record["checks"] = {"entropy_tokens": 4096, "entropy": {"Q4_0": {"float": 2.7, "awq": 2.8, "imatrix": 2.95}},
                        "float_temperature_perplexity": {"1": 17.24, "1.05": 17.18}}  # fmt: skip
    text = report(record)
    assert "Q4_0: float 2.700, awq 2.800, imatrix 2.950" in text and "T 1.05: 17.18" in text


def test_bench8_positions_are_the_windows_of_its_token_budget():
    from bench.paired_perplexity import bench8_positions

    assert bench8_positions([512] * 32) == 8 * 511  # 4,096 tokens: eight windows, each predicts 511
    assert bench8_positions([600] * 10) == 6 * 599  # a seventh window would pass 4,096 tokens
    assert bench8_positions([]) == 0
