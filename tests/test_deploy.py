"""`bedside deploy`: checks, re-planning, report, bad input (exit 2), and the end-to-end run with resume."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_runner import bedside as run_bedside

from toolkit.compress.stages import link_or_copy
from toolkit.core.errors import BedsideError
from toolkit.model.facts import facts_from_config
from toolkit.plan.planner import make_plan
from toolkit.target.profiles import load_profile
from toolkit.validate.checks import TOP1_AGREEMENT_MIN, blocking_failures, build_checks
from toolkit.validate.replan import Corrections, candidate_key, next_candidate

FIXTURES = Path(__file__).parent / "fixtures"
TINY_PROFILE = FIXTURES / "profiles" / "tiny-cpu.yaml"
REPO = Path(__file__).resolve().parents[1]
FAST_KNOBS = (
    "--calib-sequences",
    "4",
    "--heal-steps",
    "2",
    "--eval-tokens",
    "256",
    "--seq-len",
    "128",
    "--prune-method",
    "block-influence",
    "--quant-method",
    "rtn",
    "--threads",
    "1",
    "--no-progress",
)
# The same knobs as DeployOptions fields (the in-process deploys and the shared compress stages below).
FAST_OPTIONS = {
    "calib_sequences": 4,
    "heal_steps": 2,
    "eval_tokens": 256,
    "seq_len": 128,
    "prune_method": "block-influence",
    "quant_method": "rtn",
    "threads": 1,
    "progress": False,
}


def tiny_plan():
    facts = facts_from_config(json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text()))
    profile = load_profile(str(TINY_PROFILE))
    return facts, profile, make_plan(facts, profile, "demo")


def evaluation(
    ppl=11.0, ref=10.0, kl=0.1, top1=0.8, rss=150 * 2**20, speed=20.0, accuracy=None, ref_acc=None
):
    return {
        "perplexity": ppl,
        "reference_perplexity": ref,
        "kl_divergence": kl,
        "top1_agreement": top1,
        "accuracy": accuracy,
        "reference_accuracy": ref_acc,
        "peak_rss_bytes": rss,
        "peak_vram_bytes": None,
        "decode_tokens_per_s": speed,
        "context": 256,
    }


# ------------------------------------------------------------------------------------------------
# Checks and re-planning (no model needed)


def test_tiny_profile_forces_layer_removal_and_4_bit():
    """The memory budget, not the speed floor, rules out every candidate with all layers or more than 4 bits."""
    _, profile, plan = tiny_plan()
    assert plan.fits
    assert plan.chosen.layers_removed >= 1
    assert plan.chosen.quant in ("Q4_0", "Q4_K_M")
    assert all(
        c.decode_bound_tokens_per_s >= profile.min_decode_tokens_per_s.value for c in plan.candidates
    )
    full_depth = [c for c in plan.candidates if c.layers_removed == 0]
    assert full_depth and not any(c.fits for c in full_depth)
    assert all(c.memory.total_bytes > plan.budget_bytes for c in full_depth)
    wider = [c for c in plan.candidates if c.quant in ("Q5_K_M", "Q6_K", "Q8_0")]
    assert wider and not any(c.fits for c in wider if c.layers_removed <= plan.chosen.layers_removed)


def test_checks_compare_numbers_with_profile_thresholds():
    _, profile, plan = tiny_plan()
    checks = {c.name: c for c in build_checks(evaluation(), profile, plan.chosen, plan.budget_bytes)}
    assert checks["perplexity_increase_pct"].value == pytest.approx(10.0)
    assert checks["perplexity_increase_pct"].threshold == 400 and checks["perplexity_increase_pct"].passed
    assert checks["kl_divergence"].threshold == pytest.approx(math.log(5.0), rel=1e-6)
    assert checks["top1_agreement"].threshold == TOP1_AGREEMENT_MIN and not checks["top1_agreement"].blocking
    assert checks["peak_memory_bytes"].threshold == plan.budget_bytes and checks["peak_memory_bytes"].passed
    assert checks["peak_memory_bytes"].extra["estimate_bytes"] == plan.chosen.memory.total_bytes
    assert "measured on this host" in checks["decode_tokens_per_s_host"].detail
    assert "decode_tokens_per_s_target" not in checks  # no prediction given
    assert "accuracy_retention_pct" not in checks  # no answers in the eval data
    assert not blocking_failures(list(checks.values()))


def test_target_speed_check_is_reported_only_and_a_file_it_cannot_read_says_why(demo_gguf_path):
    """A slow prediction fails a reported-only check; a file the simulator cannot describe (the demo's original
    Q4_1 GGUF: not a Bedside scheme) leaves the prediction out with its reason instead of failing the deploy.
    The prediction itself is checked against `bedside simulate` in the end-to-end deploy test."""
    from toolkit.validate.target_speed import describe, predict_target_speed

    _, profile, plan = tiny_plan()
    missing = predict_target_speed(demo_gguf_path, plan.chosen, profile, 256)
    assert set(missing) == {"error"} and "cannot tell the GGUF scheme" in missing["error"]
    assert describe(missing).startswith("not predicted: ")

    slow = {
        "decode_tokens_per_s": profile.min_decode_tokens_per_s.value / 2,
        "prefill_tokens_per_s": 50.0,
        "ttft_s": 4.5,
        "oom_context": None,
        "placement": "all on the device",
        "context": 256,
    }
    checks = {c.name: c for c in build_checks(evaluation(), profile, plan.chosen, plan.budget_bytes, slow)}
    target = checks["decode_tokens_per_s_target"]
    assert (
        not target.passed
        and not target.blocking
        and target.threshold == profile.min_decode_tokens_per_s.value
    )
    assert f"predicted {profile.min_decode_tokens_per_s.value / 2:.1f} tok/s decode" in target.detail
    assert "docs/SIMULATOR.md" in target.detail
    assert not blocking_failures(list(checks.values()))


def test_checks_fail_over_floor_budget_and_accuracy():
    _, profile, plan = tiny_plan()
    bad = evaluation(
        ppl=60.0,
        rss=plan.budget_bytes + 1,
        accuracy={"overall": 0.3, "n": 10},
        ref_acc={"overall": 0.8, "n": 10},
        top1=0.2,
    )
    checks = {c.name: c for c in build_checks(bad, profile, plan.chosen, plan.budget_bytes)}
    assert (
        checks["perplexity_increase_pct"].value == pytest.approx(500.0)
        and not checks["perplexity_increase_pct"].passed
    )
    assert (
        checks["accuracy_retention_pct"].value == pytest.approx(37.5)
        and not checks["accuracy_retention_pct"].passed
    )
    assert not checks["peak_memory_bytes"].passed
    names = {c.name for c in blocking_failures(list(checks.values()))}
    assert names == {"perplexity_increase_pct", "accuracy_retention_pct", "peak_memory_bytes"}


def test_replan_after_quality_failure_takes_fewer_layers_or_more_bits():
    _, _, plan = tiny_plan()
    chosen = plan.chosen
    roomy = plan.model_copy(
        update={"budget_bytes": 210 * 2**20}
    )  # room for candidates with more bits / layers
    corrections = Corrections()
    measured = chosen.predicted_quality_loss * 1.25
    corrections.learn(
        chosen, int(chosen.memory.total_bytes * 0.9), measured, quality_failed=True, memory_failed=False
    )
    assert corrections.quality_ratio == pytest.approx(1.25, rel=1e-6)
    assert corrections.memory_ratio == 1.0  # measured below the estimate never loosens the estimate
    following, why = next_candidate(roomy, corrections, floor_pct=400.0)
    assert following is not None, why
    assert candidate_key(following) != candidate_key(chosen)
    assert following.predicted_quality_loss < chosen.predicted_quality_loss
    assert following.memory.total_bytes <= roomy.budget_bytes
    # with a floor below every corrected loss, nothing is left
    nothing, why = next_candidate(roomy, corrections, floor_pct=1.0)
    assert nothing is None and "no candidate left" in why
    # the speed floor holds in a re-plan as in the plan (on the prediction, x the measured ratio once the target's
    # speed was measured): a faster minimum than the candidate's prediction skips it
    slower = following.predicted_decode_tokens_per_s
    faster, why = next_candidate(roomy, corrections, floor_pct=400.0, min_speed=slower + 0.01)
    assert faster is not None, why
    assert faster.predicted_decode_tokens_per_s > slower
    none_fast_enough = max(c.predicted_decode_tokens_per_s for c in roomy.candidates) + 1
    nothing, why = next_candidate(roomy, corrections, floor_pct=400.0, min_speed=none_fast_enough)
    assert nothing is None and "below the" in why and "speed floor" in why


def test_replan_after_memory_failure_scales_estimates_and_can_give_up():
    _, profile, plan = tiny_plan()
    chosen = plan.chosen
    floor = profile.quality_floor.max_perplexity_increase_pct.value
    corrections = Corrections()
    corrections.learn(
        chosen, int(chosen.memory.total_bytes * 1.02), 10.0, quality_failed=False, memory_failed=True
    )
    assert corrections.memory_ratio == pytest.approx(1.02, rel=1e-3)
    following, why = next_candidate(plan, corrections, floor_pct=floor)
    assert following is not None, why
    assert following.memory.total_bytes < chosen.memory.total_bytes
    assert following.memory.total_bytes * 1.02 <= plan.budget_bytes
    assert following.layers_removed > chosen.layers_removed
    # 1.25 times the estimate: not even the smallest candidate (Q4_0, 15 layers removed, 143 MiB) fits 162.5 MiB
    corrections = Corrections()
    corrections.learn(
        chosen, int(chosen.memory.total_bytes * 1.25), 10.0, quality_failed=False, memory_failed=True
    )
    following, why = next_candidate(plan, corrections, floor_pct=floor)
    assert following is None
    assert "no candidate left" in why and "x1.25" in why


def test_report_json_and_self_contained_html(tmp_path):
    from toolkit.deploy.outcome import Attempt, DeployOutcome, ModelSummary, StageRecord
    from toolkit.deploy.report import write_reports

    facts, profile, plan = tiny_plan()
    record = {
        "layers_removed": [3, 7],
        "layer_scores": {"method": "block-influence", "scores": [0.1 * i for i in range(30)]},
        "quality": {"original": 10.0, "pruned": 14.0, "healed": 12.0, "quantized": 12.5},
        "calibration": {"sha256": "c" * 64, "documents": 9, "tokens": 512},
        "eval": {"sha256": "e" * 64, "tokens": 64},
    }
    result = evaluation(ppl=13.0, ref=10.0)
    checks = build_checks(result, profile, plan.chosen, plan.budget_bytes)
    attempt = Attempt(
        attempt=1,
        plan=plan,
        compression=record,
        checkpoint=tmp_path / "checkpoint",
        export_dir=tmp_path / "export",
        artifact=tmp_path / "export" / "model.gguf",
        evaluation=result,
        checks=checks,
    )
    stages = {name: StageRecord(seconds=1.0, resumed=False) for name in ("plan", "compress", "export")}
    outcome = DeployOutcome(
        model=ModelSummary(
            name="demo", source_sha256="s" * 64, num_layers=facts.num_layers, total_params=facts.total_params
        ),
        threads=None,
        profile=profile,
        first_plan=plan,
        attempts=[attempt],
        passed=True,
        reason="attempt 1 passed",
        stages={**stages, "bundle": StageRecord(resumed=False, folder="b", tarball="b.tar.gz")},  # running
        disk_estimate_bytes=1,
    )
    report, json_path, html_path = write_reports(tmp_path, outcome, seconds=3.0)
    stored = json.loads(json_path.read_text())
    assert stored == report
    assert stored["schema_version"] == 1 and stored["status"] == "PASS"
    assert [c["name"] for c in stored["checks"]] == [c.name for c in checks]
    memory = next(c for c in stored["checks"] if c["name"] == "peak_memory_bytes")
    assert memory["value"] == 150 * 2**20 and isinstance(memory["value"], int)  # bytes stay integers
    assert memory["extra"] == {"estimate_bytes": plan.chosen.memory.total_bytes}
    assert stored["memory"]["measured_peak_bytes"] == 150 * 2**20
    assert stored["memory"]["estimate"] == plan.chosen.memory.model_dump()
    (listed,) = stored["attempts"]
    assert listed["passed"] and listed["layers_removed"] == [3, 7] and "reason" not in listed["candidate"]
    assert stored["stages"]["plan"] == {"seconds": 1.0, "resumed": False}
    assert stored["stages"]["bundle"] == {"resumed": False, "folder": "b", "tarball": "b.tar.gz"}
    assert stored["model"] == {
        "name": "demo",
        "source_sha256": "s" * 64,
        "num_layers": facts.num_layers,
        "total_params": facts.total_params,
    }
    assert stored["quality"]["stages"] == {
        "original": 10.0,
        "pruned": 14.0,
        "healed": 12.0,
        "quantized": 12.5,
        "exported": 13.0,
    }
    assert stored["speed"]["target"] == "not predicted" and stored["speed"]["target_prediction"] is None
    rows = {row["term"].split()[0]: row for row in stored["quality"]["prior_vs_measured"]}
    predicted = plan.chosen.predicted
    assert rows["depth"]["predicted_pct"] == predicted.depth_pct
    assert rows["depth"]["measured_pct"] == pytest.approx(20.0)  # healed 12 / original 10
    assert rows["quantization"]["measured_pct"] == pytest.approx(100 * (12.5 / 12.0 - 1), abs=1e-3)
    assert rows["total"]["measured_pct"] == pytest.approx(30.0)  # exported 13 / reference 10
    assert rows["total"]["predicted_pct"] == pytest.approx(plan.chosen.predicted_quality_loss, abs=1e-3)
    assert stored["layer_selection"]["layers_removed"] == [3, 7]
    html = html_path.read_text()
    assert html.count("data:image/png;base64,") == 4
    assert 'src="http' not in html and "<script" not in html  # self-contained
    assert "perplexity_increase_pct" in html and "30.00 %" in html
    assert "Predicted and measured quality" in html and "+20.00 %" in html


# ------------------------------------------------------------------------------------------------
# The plan's KV precision and placement in runtime.json, the launch files and validation (no model needed)


def _deployed(facts, profile_name: str, **pins):
    """runtime.json, llama-server flags and Modelfile of the plan's chosen candidate (what make_bundle writes)."""
    from toolkit.deploy.bundle import runtime_config
    from toolkit.deploy.launch import ChatInfo, llama_cpp_flags, modelfile

    profile = load_profile(profile_name)
    plan = make_plan(facts, profile, "m", **pins)
    outcome = SimpleNamespace(profile=profile, candidate=plan.chosen)
    runtime = runtime_config(outcome, "model/model.gguf", ["<|im_end|>"]).model_dump(mode="json")  # type: ignore[arg-type]
    chat = ChatInfo(template=None, bos_token="", eos_token="", family=None)
    return plan.chosen, runtime, llama_cpp_flags(runtime), modelfile(runtime, chat, "b")


def test_runtime_json_and_launch_files_carry_kv_precision_and_gpu_layers():
    from runtimes.llamacpp_runner import runner_options
    from toolkit.deploy.launch import parse_modelfile
    from toolkit.deploy.pipeline import deployed_runner_options

    llama2 = facts_from_config(json.loads((FIXTURES / "llama-2-7b" / "config.json").read_text()))
    chosen, runtime, flags, text = _deployed(llama2, "rtx3050-4gb", quant="Q4_K_M", prune_layers=0)
    assert chosen.gpu_layers is not None  # Q4_K_M of a 7B model does not fit 4 GB: -ngl N
    assert runtime["gpu_layers"] == chosen.gpu_layers and runtime["kv_cache_dtype"] == chosen.kv_cache_dtype
    assert runtime["flash_attn"] is True and runtime["kv_offload"] is True  # CUDA: flash attention on
    assert f"-ngl {chosen.gpu_layers} " in flags and "-fa on " in flags and "--no-kv-offload" not in flags
    assert parse_modelfile(text)["num_gpu"] == [str(chosen.gpu_layers)]
    expected = {"flash_attn": True, "gpu_layers": chosen.gpu_layers, "kv_cache_dtype": chosen.kv_cache_dtype}
    assert runner_options(runtime) == expected  # what `bedside verify` loads
    assert deployed_runner_options(chosen, load_profile("rtx3050-4gb")) == expected  # what validation ran


def test_runtime_json_and_launch_files_carry_a_quantized_kv_cache_in_host_memory():
    from runtimes.llamacpp_runner import runner_options

    llama2 = facts_from_config(json.loads((FIXTURES / "llama-2-7b" / "config.json").read_text()))
    profile = load_profile("rtx3050-4gb")
    plan = make_plan(llama2, profile, "m", quant="Q3_K_M", prune_layers=0, kv_cache_dtype="q8_0")
    candidate = next(c for c in plan.candidates if c.kv_on_host and c.fits)
    from toolkit.deploy.bundle import runtime_config
    from toolkit.deploy.launch import ChatInfo, llama_cpp_flags, modelfile

    runtime = runtime_config(
        SimpleNamespace(profile=profile, candidate=candidate), "model/m.gguf"
    ).model_dump()  # type: ignore[arg-type]
    assert (
        runtime["kv_cache_dtype"] == "q8_0" and runtime["kv_offload"] is False and runtime["gpu_layers"] == -1
    )
    flags = llama_cpp_flags(runtime)
    assert "-ngl 99 -ctk q8_0 -ctv q8_0 -fa on --no-kv-offload " in flags
    text = modelfile(runtime, ChatInfo(template=None, bos_token="", eos_token="", family=None), "b")
    assert "OLLAMA_KV_CACHE_TYPE=q8_0 OLLAMA_FLASH_ATTENTION=1" in text and "--no-kv-offload" in text
    assert runner_options(runtime) == {"kv_cache_dtype": "q8_0", "flash_attn": True, "kv_offload": False}


def test_cpu_bundle_states_flash_attention_off_and_onnx_its_float_cache():
    """A CPU profile with an f16 cache: -fa off, as validated (llama.cpp's own auto would turn it on);
    ONNX Runtime's runtime.json records its graph's float cache and no llama.cpp settings."""
    smollm = facts_from_config(json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text()))
    chosen, runtime, flags, text = _deployed(smollm, "workstation-cpu-8gb", quant="Q8_0", prune_layers=0)
    assert chosen.kv_cache_dtype == "f16" and runtime["flash_attn"] is False and runtime["gpu_layers"] == 0
    assert "-fa off " in flags and "-ctk" not in flags and "-ngl" not in flags and "num_gpu" not in text
    pinned, runtime, flags, _ = _deployed(
        smollm, "workstation-cpu-8gb", quant="Q8_0", prune_layers=0, kv_cache_dtype="q8_0"
    )
    assert runtime["kv_cache_dtype"] == "q8_0" and "-ctk q8_0 -ctv q8_0 -fa on " in flags
    onnx, runtime, _, _ = _deployed(
        smollm, "workstation-cpu-16gb", format="onnx", quant="int4_b32", prune_layers=0
    )
    assert (
        runtime["kv_cache_dtype"] == "f32" and runtime["flash_attn"] is None and runtime["kv_offload"] is None
    )


def test_replan_tells_kv_precision_and_placement_apart():
    llama2 = facts_from_config(json.loads((FIXTURES / "llama-2-7b" / "config.json").read_text()))
    plan = make_plan(llama2, load_profile("rtx3050-4gb"), "m", quant="Q3_K_M", prune_layers=0)
    keys = {candidate_key(c) for c in plan.candidates}
    assert len(keys) == len(plan.candidates)  # same scheme and depth, other KV cache or placement: other keys


# ------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_model(folder: Path, config: dict, weights: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / weights).write_bytes(b"\0" * 16)
    return folder


def llama_config() -> dict:
    return json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text())


def test_unknown_profile_exit_2(tmp_path):
    assert_one_line_error(
        run_bedside("deploy", "--profile", "no-such-device", "--out", str(tmp_path)), "no-such-device"
    )


def test_pickle_weights_refused_without_allow_pickle(tmp_path):
    model = write_model(tmp_path / "m", llama_config(), "pytorch_model.bin")
    result = run_bedside(
        "deploy", "--profile", "jetson4gb", "--model", str(model), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, "pytorch_model.bin", "--allow-pickle")


def test_remote_code_refused(tmp_path):
    model = write_model(
        tmp_path / "m", {**llama_config(), "auto_map": {"AutoModel": "x.Y"}}, "model.safetensors"
    )
    result = run_bedside(
        "deploy", "--profile", "jetson4gb", "--model", str(model), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, "remote code")


def test_unsupported_model_exit_2(tmp_path):
    model = write_model(
        tmp_path / "m", {"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, "model.safetensors"
    )
    result = run_bedside(
        "deploy", "--profile", "jetson4gb", "--model", str(model), "--out", str(tmp_path / "o")
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_output_folder_not_writable_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_bedside("deploy", "--profile", "jetson4gb", "--out", str(blocker / "sub"))
    assert_one_line_error(result, "not writable")


@pytest.mark.parametrize(
    ("content", "needle"),
    [(None, "missing.jsonl"), ("", "empty.jsonl"), ("{not json\n", "malformed.jsonl")],
    ids=["missing", "empty", "malformed"],
)
def test_bad_calibration_data_exit_2(tmp_path, demo_model_dir, content, needle):
    path = tmp_path / needle
    if content is not None:
        path.write_text(content)
    result = run_bedside(
        "deploy", "--profile", "jetson4gb", "--calib", str(path), "--out", str(tmp_path / "o")
    )
    assert_one_line_error(result, needle)


def test_not_enough_disk_refused_before_work(tmp_path, demo_model_dir, monkeypatch):
    from toolkit.deploy import preflight
    from toolkit.deploy.pipeline import DeployOptions, run_deploy

    monkeypatch.setattr(preflight, "free_bytes", lambda folder: 10 * 2**20)
    with pytest.raises(BedsideError, match="not enough disk"):
        run_deploy(DeployOptions(profile="jetson4gb", out=tmp_path / "o", progress=False))
    assert not (tmp_path / "o" / "work" / "compress").exists()


def test_unknown_replace_mode_exit_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    result = run_bedside("deploy", "--profile", "jetson4gb", "--replace", "quadratic", "--out", str(out))
    assert_one_line_error(result, "unknown --replace 'quadratic'", "linear, none")
    assert not out.exists()


def test_knob_out_of_range_exit_2(tmp_path):
    result = run_bedside("deploy", "--profile", "jetson4gb", "--max-attempts", "0", "--out", str(tmp_path))
    assert_one_line_error(result, "--max-attempts")


def test_kv_cache_the_profile_does_not_allow_exit_2(tmp_path):
    out = tmp_path / "o"
    result = run_bedside("deploy", "--profile", str(TINY_PROFILE), "--kv-cache", "q8_0", "--out", str(out))
    assert_one_line_error(result, "--kv-cache q8_0: profile 'tiny-cpu' allows f16")
    assert not out.exists()  # refused before anything is written


# ------------------------------------------------------------------------------------------------
# End to end on the demo model (tiny profile: layer removal + 4-bit), killed after compress, resumed
#
# Every deploy below starts with the same attempt (Q4_0, 6 of 30 layers removed, FAST_KNOBS), so that attempt is
# computed once: its compress stages by `compressed_stages`, its export and validation by the killed-then-resumed
# deploy (which starts from the stages). The other deploys start from a hard-linked copy of that work folder
# (`seed_work`): attempt 1 resumes every stage (and says so), each deploy publishes its own checkpoint,
# compression.json, report and bundle, and whatever it does after attempt 1 (re-plan, compress, export,
# validate) it computes as before.


@pytest.fixture(scope="module")
def compressed_stages(demo_model_dir, tmp_path_factory) -> Path:
    """work/compress/stages of attempt 1 of the deploys below, computed in this process (like the in-process
    deploy's compress) by the deploy's own compress step with their plan and options. Read-only."""
    from toolkit.deploy import pipeline
    from toolkit.deploy.preflight import check_model_config

    options = pipeline.DeployOptions(profile=str(TINY_PROFILE), **FAST_OPTIONS)
    _, facts = check_model_config(options.model)
    plan = make_plan(facts, load_profile(options.profile), options.model)
    work = tmp_path_factory.mktemp("deploy-compress") / "work"
    pipeline._compress(options, options.model, plan, work)
    return work / "compress" / "stages"


def seed_compress_stages(compressed_stages: Path, out: Path) -> None:
    """Hard-link the shared stage cache into `out`'s work folder (stage files are replaced, never rewritten in
    place, so the shared copy stays intact)."""
    shutil.copytree(compressed_stages, out / "work" / "compress" / "stages", copy_function=link_or_copy)


def seed_work(finished: Path, out: Path) -> None:
    """Hard-link a finished deploy's caches into `out`'s work folder: compress stages, exports and validations
    (not the published checkpoint and compression.json, which each deploy writes itself)."""
    work = finished / "work"
    seed_compress_stages(work / "compress" / "stages", out)
    for name in ("exports", "validate"):
        shutil.copytree(work / name, out / "work" / name, copy_function=link_or_copy)


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory, compressed_stages) -> SimpleNamespace:
    """`bedside deploy` on the tiny profile, killed (SIGKILL) once compress has finished and run again to the end,
    from the shared compress stages: what the end-to-end test checks. Its work folder seeds the other deploys."""
    out = tmp_path_factory.mktemp("killed-then-resumed") / "deploy"
    seed_compress_stages(compressed_stages, out)
    command = [
        sys.executable,
        "-m",
        "toolkit.cli.main",
        "deploy",
        "--profile",
        str(TINY_PROFILE),
        "--out",
        str(out),
        *FAST_KNOBS,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    record = out / "work" / "compress" / "compression.json"
    try:
        deadline = time.monotonic() + 900
        while not record.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        compressed, exit_code = record.exists(), first.poll()
    finally:
        first.send_signal(signal.SIGKILL)  # mid-run: after compress, before the bundle
        first.wait()
    bundles_after_kill = list(out.glob("bundle-*"))
    second = None
    if compressed:
        second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return SimpleNamespace(
        out=out,
        compressed=compressed,
        exit_code=exit_code,
        bundles_after_kill=bundles_after_kill,
        second=second,
    )


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_deploy_end_to_end_killed_then_resumed_and_verified(killed_then_resumed):
    out = killed_then_resumed.out
    assert killed_then_resumed.compressed, (
        f"compress did not finish (exit code {killed_then_resumed.exit_code})"
    )
    assert not killed_then_resumed.bundles_after_kill, "an interrupted deploy left a bundle"

    result = killed_then_resumed.second
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["schema_version"] == 1 and report["passed"] and report["status"] == "PASS"
    assert report["stages"]["compress"]["resumed"] is True
    assert set(report["stages"]) == {"plan", "compress", "export", "validate", "bundle"}
    chosen = report["attempts"][-1]["candidate"]
    assert chosen["layers_removed"] >= 1 and chosen["quant"].startswith("Q4")
    for check in report["checks"]:
        assert {"name", "passed", "value", "threshold"} <= set(check)
    quality = report["quality"]["stages"]
    assert all(
        quality[name] is not None for name in ("original", "pruned", "healed", "quantized", "exported")
    )
    assert quality["pruned"] > quality["original"]  # removing layers costs perplexity
    assert quality["healed"] < quality["pruned"]  # healing (2 LoRA steps) wins some of it back
    assert len(report["layer_selection"]["scores"]) == 30
    config = json.loads((out / "work" / "compress" / "checkpoint" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 - len(report["attempts"][-1]["layers_removed"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    prediction = report["speed"]["target_prediction"]
    assert prediction["decode_tokens_per_s"] > 0 and prediction["context"] == 256
    assert report["speed"]["target"].startswith("predicted ") and "tok/s decode" in html
    target_check = next(c for c in report["checks"] if c["name"] == "decode_tokens_per_s_target")
    assert (
        target_check["value"] == pytest.approx(prediction["decode_tokens_per_s"])
        and not target_check["blocking"]
    )
    simulated = json.loads(
        run_bedside(
            "simulate", "--profile", str(TINY_PROFILE), "--bundle", str(out / "bundle-tiny-cpu"), "--json"
        ).stdout
    )  # the same file, profile, context and settings through `bedside simulate`
    assert prediction["decode_tokens_per_s"] == pytest.approx(simulated["decode_tokens_per_s"], rel=1e-3)
    assert prediction["ttft_s"] == pytest.approx(simulated["ttft_s"], rel=1e-3)

    bundle = out / "bundle-tiny-cpu"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"files", "profile", "plan", "versions", "source_model_sha256", "data"} <= set(manifest)
    assert manifest["data"]["calibration"]["sha256"] and manifest["data"]["eval"]["tokens"] > 0
    assert any(name.endswith(".gguf") for name in manifest["files"])
    assert "tokenizer/tokenizer.json" in manifest["files"] and "README.md" in manifest["files"]
    with tarfile.open(out / "bundle-tiny-cpu.tar.gz") as tar:
        assert "bundle-tiny-cpu/manifest.json" in tar.getnames()

    verified = run_bedside("verify", str(out / "bundle-tiny-cpu.tar.gz"), "--threads", "1", timeout=300)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "FAIL" not in verified.stdout


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_deploy_replans_after_a_measured_memory_overrun_and_compresses_again(
    tmp_path, killed_then_resumed, monkeypatch
):
    """Attempt 1's measured peak is raised 2 % over the budget (a target that needs more than this host):
    the deploy learns the ratio, removes more layers, compresses, exports and validates again, and the
    bundle holds attempt 2's model."""
    from toolkit.deploy import pipeline

    real_validate = pipeline._validate
    budget = tiny_plan()[2].budget_bytes
    calls: list[int] = []

    def overrun_once(*args, **kwargs):
        evaluation, resumed = real_validate(*args, **kwargs)
        calls.append(evaluation["peak_rss_bytes"])
        if len(calls) == 1:
            evaluation = {**evaluation, "peak_rss_bytes": int(budget * 1.02)}
        return evaluation, resumed

    monkeypatch.setattr(pipeline, "_validate", overrun_once)
    # a looser quality floor than tiny-cpu's 400 %, so that only memory drives the re-plan: 8 layers removed with 2
    # healing steps measured +185 % (attempt 1, 6 layers: +100 %; 2026-12-07, a replay of this test outside pytest)
    profile = tmp_path / "tiny-loose.yaml"
    profile.write_text(TINY_PROFILE.read_text().replace("    value: 400\n", "    value: 1000\n"))
    options = pipeline.DeployOptions(profile=str(profile), out=tmp_path / "deploy", **FAST_OPTIONS)
    seed_work(killed_then_resumed.out, options.out)
    result = pipeline.run_deploy(options)

    assert result.passed, result.reason
    attempt_1, attempt_2 = result.attempts
    assert all(attempt_1.stages[name].resumed for name in ("compress", "export", "validate"))  # shared
    assert not any(attempt_2.stages[name].resumed for name in ("compress", "export", "validate"))
    first, second = result.report["attempts"]
    assert [c["name"] for c in first["checks"] if not c["passed"] and c["name"] == "peak_memory_bytes"]
    assert first["corrections"]["memory_ratio"] == pytest.approx(
        budget * 1.02 / first["candidate"]["memory"]["total_bytes"], rel=1e-3
    )
    assert second["passed"] and len(calls) == 2
    assert second["candidate"]["layers_removed"] > first["candidate"]["layers_removed"]
    assert second["candidate"]["memory"]["total_bytes"] * first["corrections"]["memory_ratio"] <= budget
    removed = second["layers_removed"]
    assert len(removed) == second["candidate"]["layers_removed"] and len(first["layers_removed"]) == 6
    artifact = second["evaluation"]["artifact_sha256"]
    assert artifact != first["evaluation"]["artifact_sha256"]
    manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
    model = next(name for name in manifest["files"] if name.endswith(".gguf"))
    assert manifest["files"][model] == artifact
    assert manifest["plan"]["chosen"]["layers_removed"] == second["candidate"]["layers_removed"]


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_deploy_that_nothing_passes_exits_1_with_a_report_and_no_bundle(tmp_path, killed_then_resumed):
    """A 50 % perplexity floor: attempt 1 (Q4_0, 6 layers removed) misses it, and every candidate with a lower
    predicted loss is over the budget, so the deploy stops, says why, and writes the report but no bundle."""
    profile = tmp_path / "tiny-strict.yaml"
    profile.write_text(TINY_PROFILE.read_text().replace("    value: 400\n", "    value: 50\n"))
    out = tmp_path / "deploy"
    seed_work(killed_then_resumed.out, out)
    result = run_bedside(
        "deploy", "--profile", str(profile), "--out", str(out), *FAST_KNOBS, "--json", timeout=900
    )
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "FAIL" and not report["passed"]
    summary = json.loads(result.stdout)  # --json: one object on stdout, nothing else
    assert summary["exit_status"] == 1 and summary["passed"] is False and summary["bundle"] is None
    assert summary["out"] == str(out) and summary["reason"] == report["reason"]
    assert summary["checks"] == report["checks"] and summary["checks"]
    assert all(report["stages"][name]["resumed"] for name in ("compress", "export", "validate"))  # shared
    assert "perplexity_increase_pct" in report["reason"] and "no candidate left" in report["reason"]
    (attempt,) = report["attempts"]
    failed = {c["name"] for c in attempt["checks"] if not c["passed"]}
    assert "perplexity_increase_pct" in failed and "peak_memory_bytes" not in failed
    assert (out / "report.html").is_file()
    assert not list(out.glob("bundle-*"))


def test_layer_plot_is_left_out_when_no_layer_was_scored():
    """Nothing removed, nothing scored: the page says the stage was skipped instead of drawing empty axes."""
    from toolkit.deploy.report import plot_layer_scores

    assert (
        plot_layer_scores({"layer_selection": {"method": None, "scores": [None] * 30, "layers_removed": []}})
        is None
    )
    drawn = plot_layer_scores(
        {"layer_selection": {"method": "activation", "scores": [0.1] * 30, "layers_removed": [3]}}
    )
    assert drawn is not None and len(drawn) > 1000  # a base64 PNG


def test_replan_speed_floor_uses_the_measured_ratio_once_the_target_was_measured():
    """Unmeasured: the floor is checked on the simulator's prediction (ratio 1), as the planner checks it; after a
    host attempt measured its decode speed, on predicted x (measured / predicted) of that attempt."""
    _, _, plan = tiny_plan()
    chosen = plan.chosen
    corrections = Corrections()
    assert not corrections.speed_measured
    fits = [c for c in plan.candidates if candidate_key(c) != candidate_key(chosen) and c.fits]
    above_predictions = max(c.predicted_decode_tokens_per_s for c in fits) + 0.01
    assert all(c.decode_bound_tokens_per_s > above_predictions for c in fits)  # the bound alone would pass them
    nothing, why = next_candidate(plan, corrections, floor_pct=400.0, min_speed=above_predictions)
    assert nothing is None and "speed floor" in why
    corrections.learn(chosen, None, None, quality_failed=False, memory_failed=False,
                      target_speed=chosen.predicted_decode_tokens_per_s * 0.5)  # fmt: skip
    assert corrections.speed_measured and corrections.speed_ratio == pytest.approx(0.5)
    others = [c for c in plan.candidates if candidate_key(c) != candidate_key(chosen) and c.fits]
    floor = max(c.predicted_decode_tokens_per_s for c in others) * 0.5 + 0.01  # above every corrected prediction
    assert all(c.decode_bound_tokens_per_s > floor for c in others)  # the bound alone would pass them all
    nothing, why = next_candidate(plan, corrections, floor_pct=400.0, min_speed=floor)
    assert nothing is None and "speed floor" in why
