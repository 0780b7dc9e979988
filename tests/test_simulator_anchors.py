"""The public GPU anchors of the simulator (bench/simulator_anchors.py): well-formed, predicted as `bedside simulate`
predicts, and the fit behind DEFAULTS["cuda"] (fast: config.json models, no device)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from cli_runner import bedside as run_bedside

from bench.simulator_anchors import (
    ANCHORS,
    Anchor,
    FitPoint,
    anchor_profile,
    fit_efficiency,
    fit_point,
    predict,
    record_with_cuda,
)
from toolkit.core.formats import FORMATS
from toolkit.core.paths import PROFILES_DIR, REPO_ROOT
from toolkit.model.facts import read_facts
from toolkit.plan.calibration import DEFAULTS, Efficiency
from toolkit.plan.planner import make_plan
from toolkit.plan.schema import write_plan
from toolkit.target.profiles import load_profile, profile_to_yaml

BY_KEY = {anchor.key: anchor for anchor in ANCHORS}
AGX_7B = BY_KEY["agx-orin/llama-2-7b/Q4_0"]
NANO_SUPER = BY_KEY["orin-nano-super/smollm2-135m/Q4_K_M"]


@pytest.mark.parametrize("anchor", ANCHORS, ids=lambda anchor: anchor.key)
def test_anchor_is_well_formed(anchor: Anchor):
    assert (PROFILES_DIR / f"{anchor.profile}.yaml").is_file()
    assert (REPO_ROOT / anchor.model / "config.json").is_file()
    facts = read_facts(REPO_ROOT / anchor.model)
    profile = load_profile(anchor.profile)
    assert anchor.scheme in FORMATS["gguf"] and anchor.scheme in profile.quant_schemes
    assert 0 < anchor.generated_tokens < anchor.context <= facts.max_position_embeddings
    assert anchor.measured_tokens_per_s > 0
    assert re.fullmatch(r"https://\S+", anchor.source.url)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", anchor.source.date)
    assert anchor.source.quote.strip() and anchor.source.author.strip()
    assert anchor.scheme_note.strip() and anchor.job_note.strip()
    changed = anchor.bandwidth_gbs is not None or anchor.int8_tops is not None
    assert bool(anchor.profile_note.strip()) == changed  # a replaced figure says where it comes from
    copy = anchor_profile(anchor)
    if anchor.bandwidth_gbs is not None:
        assert copy.model_memory_tier.bandwidth_gbs.value == anchor.bandwidth_gbs
        assert anchor.profile_note in copy.model_memory_tier.bandwidth_gbs.source


def test_anchor_keys_are_unique_and_the_super_is_a_copy():
    assert len(BY_KEY) == len(ANCHORS)
    nano = load_profile("jetson-orin-nano-8gb")
    copy = anchor_profile(NANO_SUPER)
    assert nano.model_memory_tier.bandwidth_gbs.value == 68  # the shipped profile stays the 15 W one
    assert copy.model_memory_tier.bandwidth_gbs.value == 102
    assert copy.compute.int8_tops.value == 33.5 and copy.compute.fp16_tflops.value == 33.5 / 2


@pytest.mark.parametrize("anchor", [AGX_7B, NANO_SUPER], ids=lambda anchor: anchor.key)
def test_anchor_prediction_is_what_bedside_simulate_prints(anchor: Anchor, tmp_path):
    """The anchors command predicts what `bedside simulate --plan` prints for a plan of the same model and scheme
    (f16 KV cache, all on the GPU) on the same profile, context and decode steps."""
    profile = anchor_profile(anchor)
    model = REPO_ROOT / anchor.model
    plan = make_plan(read_facts(model), profile, str(model), format="gguf", quant=anchor.scheme, prune_layers=0,
                     kv_cache_dtype="f16", context=anchor.context)  # fmt: skip
    assert plan.chosen is not None and plan.chosen.gpu_layers is None and not plan.chosen.kv_on_host
    write_plan(plan, tmp_path / "plan.json")
    (tmp_path / "profile.yaml").write_text(profile_to_yaml(profile))
    result = run_bedside("simulate", "--profile", str(tmp_path / "profile.yaml"), "--plan", str(tmp_path / "plan.json"),
                         "--context", str(anchor.context), "--decode-tokens", str(anchor.generated_tokens),
                         "--placement", "device", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    predicted, efficiency = predict(anchor)
    assert printed["decode_tokens_per_s"] == pytest.approx(predicted, rel=1e-12)
    assert printed["efficiency"]["cuda"] == efficiency
    assert printed["placement"]["name"] == "device"


def _synthetic(points: list[FitPoint], times: list[float]) -> list[FitPoint]:
    return [dataclasses.replace(point, measured_s=seconds) for point, seconds in zip(points, times, strict=True)]


def test_fit_recovers_known_efficiencies_from_simulated_times():
    """Times the simulator predicts at a known bandwidth efficiency and step overhead are fitted back to them
    (the fit's time model is the simulator's)."""
    known = Efficiency(0.42, 0.3, 0.0061, "test")
    record = record_with_cuda(known, {})
    points = [fit_point(anchor) for anchor in ANCHORS]
    times = [1.0 / predict(anchor, record)[0] for anchor in ANCHORS]
    fit = fit_efficiency(_synthetic(points, times), compute_efficiency=0.3)
    assert fit.bandwidth == pytest.approx(0.42, abs=0.001)
    assert fit.overhead_s == pytest.approx(0.0061, abs=2e-5)
    assert fit.rms_log_error < 1e-3
    for point, seconds in zip(points, times, strict=True):  # the fit's own seconds are the simulator's
        assert fit.seconds(point) == pytest.approx(seconds, rel=2e-3)


def test_fit_recovers_an_overhead_per_layer():
    points = [fit_point(anchor) for anchor in ANCHORS]
    times = [float(p.step_seconds(np.array([0.55]), 0.3)[0]) + 1.2e-4 * p.layers for p in points]
    fit = fit_efficiency(_synthetic(points, times), compute_efficiency=0.3, per_layer=True)
    assert fit.bandwidth == pytest.approx(0.55, abs=0.001)
    assert fit.overhead_s == pytest.approx(1.2e-4, abs=1e-6)
    with pytest.raises(ValueError, match="per step"):
        fit.efficiency("test")
    with pytest.raises(ValueError, match="two anchors"):
        fit_efficiency(points[:1], compute_efficiency=0.3)


def test_cuda_defaults_are_the_anchor_fit_and_stay_an_assumption():
    """DEFAULTS["cuda"] holds the fit over the fitted anchors (re-run `bench.simulator anchors` after changing
    one), and its source keeps the word the deploy reads as "not calibrated on the target"."""
    fit = fit_efficiency([fit_point(anchor) for anchor in ANCHORS if anchor.fit], DEFAULTS["cuda"].compute)
    cuda = DEFAULTS["cuda"]
    assert (cuda.bandwidth, cuda.step_overhead_s) == (fit.bandwidth, fit.overhead_s)
    assert "assumption" in cuda.source and "simulator_anchors.json" in cuda.source


def test_the_recorded_anchor_table_matches_the_anchors():
    record = json.loads((REPO_ROOT / "docs" / "benchmarks" / "simulator_anchors.json").read_text())
    assert [row["key"] for row in record["rows"]] == [anchor.key for anchor in ANCHORS]
    assert record["defaults_are_the_fit"]
    cuda = DEFAULTS["cuda"]
    assert (record["fit"]["bandwidth_efficiency"], record["fit"]["overhead_s"]) == (cuda.bandwidth, cuda.step_overhead_s)
    for row, anchor in zip(record["rows"], ANCHORS, strict=True):
        assert row["measured_tok_s"] == anchor.measured_tokens_per_s
        assert row["predicted_tok_s"] == pytest.approx(predict(anchor)[0], abs=1e-3)
