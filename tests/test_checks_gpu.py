"""On a profile that budgets GPU memory, a CPU fallback or an RSS figure is a failed check, not a pass."""

import json
from pathlib import Path

from toolkit.model.facts import facts_from_config
from toolkit.plan.planner import make_plan
from toolkit.target.profiles import load_profile
from toolkit.validate.checks import blocking_failures, build_checks

FIXTURES = Path(__file__).parent / "fixtures"


def gpu_setup():
    facts = facts_from_config(json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text()))
    profile = load_profile("rtx3050-4gb")
    assert profile.model_memory_tier.kind == "device"
    plan = make_plan(facts, profile, "demo")
    return profile, plan


def evaluation(device: str, vram: int | None, rss: int = 900 * 2**20) -> dict:
    return {
        "perplexity": 11.0,
        "reference_perplexity": 10.0,
        "kl_divergence": 0.05,
        "top1_agreement": 0.9,
        "peak_rss_bytes": rss,
        "peak_vram_bytes": vram,
        "decode_tokens_per_s": 50.0,
        "context": 4096,
        "device": device,
    }


def test_a_cpu_fallback_on_a_gpu_profile_fails_device_and_memory():
    profile, plan = gpu_setup()
    checks = {
        c.name: c for c in build_checks(evaluation("cpu", None), profile, plan.chosen, plan.budget_bytes)
    }
    assert not checks["runtime_device"].passed and "ran on cpu" in checks["runtime_device"].detail
    memory = checks["peak_memory_bytes"]
    assert memory.value == 900 * 2**20 < memory.threshold  # would fit, but it is the wrong memory
    assert not memory.passed and "RSS measured where VRAM was budgeted" in memory.detail
    assert {c.name for c in blocking_failures(list(checks.values()))} == {
        "runtime_device",
        "peak_memory_bytes",
    }


def test_a_gpu_run_with_vram_passes_and_is_measured_on_vram():
    profile, plan = gpu_setup()
    good = evaluation("cuda", 700 * 2**20, rss=5 * 2**30)  # host RSS does not count against VRAM
    checks = {c.name: c for c in build_checks(good, profile, plan.chosen, plan.budget_bytes)}
    assert checks["runtime_device"].passed
    assert checks["peak_memory_bytes"].passed and checks["peak_memory_bytes"].value == 700 * 2**20
    too_big = evaluation("cuda", plan.budget_bytes + 1)
    checks = {c.name: c for c in build_checks(too_big, profile, plan.chosen, plan.budget_bytes)}
    assert not checks["peak_memory_bytes"].passed


def test_cpu_and_unified_profiles_have_no_device_check():
    facts = facts_from_config(json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text()))
    for name in ("jetson4gb", "workstation-cpu-8gb"):
        profile = load_profile(name)
        plan = make_plan(facts, profile, "demo")
        checks = {
            c.name for c in build_checks(evaluation("cpu", None), profile, plan.chosen, plan.budget_bytes)
        }
        assert "runtime_device" not in checks and "peak_memory_bytes" in checks
