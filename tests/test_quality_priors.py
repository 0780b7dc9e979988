"""Quality priors: the depth-pruning prior against the published points it is fitted on, and docs/PRIORS.md.

Expected values come from DEPTH_PRIOR_POINTS (the two perplexities of each row), never from numbers typed here.
"""

import dataclasses
import math
from pathlib import Path

import pytest

from toolkit.core.errors import BedsideError
from toolkit.model.architectures import ARCHITECTURES
from toolkit.model.facts import ModelFacts, read_facts
from toolkit.plan.quality_priors import (
    DEPTH_CURVES,
    DEPTH_FIT_TOLERANCE,
    DEPTH_HEALING,
    DEPTH_PRIOR_POINTS,
    DEPTH_PRIOR_STAND_IN_GROUP,
    LLAMA3_8B_DELTA_PPL,
    LLAMA3_8B_DELTA_PPL_IMATRIX,
    DepthPoint,
    depth_coefficient,
    depth_curve,
    depth_prior_group,
    depth_prior_pct,
    predict_quality,
)

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ("smollm2-135m", "qwen2-0.5b", "qwen3-0.6b", "gemma-3-1b", "gemma-2b", "llama-2-7b", "mistral-7b",
          "llava-1.5-7b")


@pytest.fixture(scope="module")
def facts() -> dict[str, ModelFacts]:
    return {name: read_facts(FIXTURES / name) for name in MODELS}


def _predicted_ratio(point: DepthPoint) -> float:
    a, b = depth_curve(point.params, point.group, point.healed)
    return math.exp(a * point.fraction + b * point.fraction**2)


# --- the table -------------------------------------------------------------------------------------------------


def test_every_point_has_a_source_and_is_a_loss():
    assert DEPTH_PRIOR_POINTS
    for point in DEPTH_PRIOR_POINTS:
        assert point.source and point.method and point.metric and point.model
        assert 0 < point.removed < point.layers
        assert point.ppl_pruned > point.ppl_ref > 0
        assert point.group in DEPTH_CURVES


@pytest.mark.parametrize("point", DEPTH_PRIOR_POINTS, ids=lambda p: f"{p.model}-{p.removed}of{p.layers}-{p.metric}"
                         f"-{'healed' if p.healed else 'oneshot'}")
def test_prior_reproduces_each_point_it_was_fitted_on(point):
    published = point.ppl_pruned / point.ppl_ref
    assert _predicted_ratio(point) == pytest.approx(published, rel=DEPTH_FIT_TOLERANCE)


def test_fixture_models_at_a_point_size_reproduce_it_through_depth_prior_pct(facts):
    # The Llama-2-7B and SmolLM2-135M rows carry the fixtures' own text parameter counts.
    by_params = {f.text_params: f for f in facts.values() if f.vision is None}
    checked = 0
    for point in DEPTH_PRIOR_POINTS:
        model = by_params.get(int(point.params))
        if model is None or model.num_layers != point.layers:
            continue
        predicted = depth_prior_pct(model, point.removed, healed=point.healed)
        assert 1 + predicted / 100 == pytest.approx(point.ppl_pruned / point.ppl_ref, rel=DEPTH_FIT_TOLERANCE)
        checked += 1
    assert checked >= 3


def test_healing_factor_comes_from_measured_pairs_and_helps():
    for group, anchors in DEPTH_HEALING.items():
        assert anchors, group
        for _, factor in anchors:
            assert 0 < factor < 1


# --- shape of the prior ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("healed", [True, False])
def test_prior_is_zero_at_zero_and_strictly_monotone_in_layers(facts, healed):
    for model in facts.values():
        losses = [depth_prior_pct(model, k, healed=healed) for k in range(model.num_layers)]
        assert losses[0] == 0
        assert all(low < high for low, high in zip(losses, losses[1:], strict=False)), model.architecture


def test_healed_prior_is_below_the_one_shot_prior(facts):
    for model in facts.values():
        for k in range(1, model.num_layers):
            assert depth_prior_pct(model, k) < depth_prior_pct(model, k, healed=False)


def test_default_is_healed_and_predict_quality_passes_it_through(facts):
    llama2 = facts["llama-2-7b"]
    assert depth_prior_pct(llama2, 8) == depth_prior_pct(llama2, 8, healed=True)
    assert predict_quality(llama2, "Q4_K_M", 8).depth_pct == depth_prior_pct(llama2, 8)
    assert predict_quality(llama2, "Q4_K_M", 8, healed=False).depth_pct == depth_prior_pct(llama2, 8, False)


def test_larger_published_models_lose_less_at_the_same_fraction():
    for group, anchors in DEPTH_CURVES.items():
        for fraction in (0.1, 0.2, 0.25):
            for healed in (False, True):
                losses = [depth_coefficient(params, fraction, group, healed) for params, *_ in anchors]
                assert losses == sorted(losses, reverse=True), (group, fraction, healed)


def test_interpolates_in_log10_parameters_between_anchors():
    anchors = DEPTH_CURVES["llama"]
    for (p0, a0, b0), (p1, a1, b1) in zip(anchors, anchors[1:], strict=False):
        middle = math.sqrt(p0 * p1)  # halfway in log10
        a, b = depth_curve(middle, "llama", healed=False)
        assert a == pytest.approx((a0 + a1) / 2) and b == pytest.approx((b0 + b1) / 2)
        quarter = p0 ** 0.75 * p1 ** 0.25
        a, b = depth_curve(quarter, "llama", healed=False)
        assert a == pytest.approx(0.75 * a0 + 0.25 * a1) and b == pytest.approx(0.75 * b0 + 0.25 * b1)


def test_clamps_outside_the_anchors():
    anchors = DEPTH_CURVES["llama"]
    (p_low, *low), (p_high, *high) = anchors[0], anchors[-1]
    for params in (p_low / 10, p_low):
        assert list(depth_curve(params, "llama", healed=False)) == pytest.approx(low)
    for params in (p_high, p_high * 10):
        assert list(depth_curve(params, "llama", healed=False)) == pytest.approx(high)
    (_, factor), *_ = DEPTH_HEALING["llama"]
    if len(DEPTH_HEALING["llama"]) == 1:  # one measured healing factor: used at every size
        a, b = depth_curve(p_high * 10, "llama", healed=True)
        assert (a, b) == pytest.approx((factor * high[0], factor * high[1]))


def test_depth_coefficient_is_the_log_ratio_over_the_fraction():
    a, b = depth_curve(6.7e9)
    assert depth_coefficient(6.7e9, 0.25) == pytest.approx(a + 0.25 * b)
    assert depth_coefficient(6.7e9, 0.25, healed=False) > depth_coefficient(6.7e9, 0.25)


# --- families ----------------------------------------------------------------------------------------------------


def test_family_chooses_the_point_set(facts):
    assert depth_prior_group(facts["llama-2-7b"]) == "llama"
    assert depth_prior_group(facts["llava-1.5-7b"]) == "llama"  # LLaVA-1.5's language model is Llama-2 (Vicuna)
    for name in ("qwen2-0.5b", "gemma-3-1b", "mistral-7b"):
        assert depth_prior_group(facts[name]) == DEPTH_PRIOR_STAND_IN_GROUP


def test_every_supported_family_has_a_prior(facts):
    model = facts["llama-2-7b"]
    for family in ARCHITECTURES:
        assert depth_prior_pct(dataclasses.replace(model, family=family), 4) > 0


# --- unknown inputs ------------------------------------------------------------------------------------------------


def test_unknown_inputs_raise(facts):
    model = facts["llama-2-7b"]
    with pytest.raises(BedsideError, match="model family 'opt'"):
        depth_prior_pct(dataclasses.replace(model, family="opt"), 4)
    with pytest.raises(BedsideError, match="between 0 and 31"):
        depth_prior_pct(model, 32)
    with pytest.raises(BedsideError, match="between 0 and 31"):
        depth_prior_pct(model, -1)
    with pytest.raises(BedsideError, match="group 'opt'"):
        depth_curve(6.7e9, "opt")
    with pytest.raises(BedsideError, match="positive"):
        depth_curve(0)
    with pytest.raises(BedsideError, match="fraction"):
        depth_coefficient(6.7e9, 1.0)


# --- docs/PRIORS.md ------------------------------------------------------------------------------------------------


def _docs() -> str:
    return (ROOT / "docs" / "PRIORS.md").read_text()


def test_priors_doc_lists_every_depth_point():
    docs = _docs()
    for point in DEPTH_PRIOR_POINTS:
        for value in (point.ppl_ref, point.ppl_pruned):
            assert f"{value:g}" in docs, (point.model, value)


def test_priors_doc_lists_the_quantization_scoreboard():
    docs = _docs()
    for table in (LLAMA3_8B_DELTA_PPL, LLAMA3_8B_DELTA_PPL_IMATRIX):
        for scheme, delta in table.items():
            assert f"{delta:.6f}" in docs, scheme
