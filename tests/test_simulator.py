"""The simulator's epoch model, checked by hand on a small synthetic model and synthetic profiles (fast).

toolkit/plan/simulator.py documents every formula; here each is recomputed from its parts.
"""

from __future__ import annotations

import json
import sys

import pytest

from toolkit.core.errors import BedsideError
from toolkit.model.facts import facts_from_config
from toolkit.plan.memory import Deployment
from toolkit.plan.planner import make_plan
from toolkit.plan.schema import write_plan
from toolkit.plan.simulator import (
    Placement,
    epoch,
    first_oom_context,
    fits,
    make_target,
    prefill_epochs,
    simulate,
    tier_bytes,
)
from toolkit.plan.workload import make_workload
from toolkit.target.host import RUNTIME_UNUSED_CPU_FEATURES
from toolkit.target.profiles import Figure, load_profile

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "vocab_size": 256,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
# Efficiency 1, no overhead: times are the bare roofline.
UNIT = {"runtimes": {"llama.cpp": {
    "cpu": {"bandwidth_efficiency": 1.0, "compute_efficiency": 1.0, "step_overhead_s": 0.0},
    "cuda": {"bandwidth_efficiency": 1.0, "compute_efficiency": 1.0, "step_overhead_s": 0.0},
}}}  # fmt: skip


def fig(value: float) -> Figure:
    return Figure(value=value, source="test")


@pytest.fixture(scope="module")
def facts():
    return facts_from_config(CONFIG)


@pytest.fixture()
def cpu_profile():
    """One 1 GiB RAM tier at 10 GB/s; 2 cores, 1 TFLOPS float, 2 TOPS int8 (AVX2 only: every runtime uses it)."""
    base = load_profile("workstation-cpu-16gb")
    tier = base.memory_tiers[0].model_copy(
        update={"capacity_gib": fig(1), "bandwidth_gbs": fig(10), "sustained_bandwidth_gbs": None}
    )
    compute = base.compute.model_copy(
        update={
            "cores": fig(2),
            "fp16_tflops": fig(1),
            "int8_tops": fig(2),
            "cpu_features": ["avx", "avx2", "fma", "f16c"],
        }
    )
    return base.model_copy(
        update={"memory_tiers": [tier], "reserved_gib": fig(0), "headroom_pct": fig(0), "compute": compute}
    )


@pytest.fixture()
def gpu_profile():
    """rtx3050-4gb with its VRAM shrunk to `vram` GiB (set per test via model_copy)."""
    return load_profile("rtx3050-4gb").model_copy(update={"reserved_gib": fig(0), "headroom_pct": fig(0)})


def with_vram(profile, gib: float):
    tiers = [profile.memory_tiers[0].model_copy(update={"capacity_gib": fig(gib)}), profile.memory_tiers[1]]
    return profile.model_copy(update={"memory_tiers": tiers})


def workload(facts, profile, quant="Q8_0"):
    return make_workload(facts, Deployment("gguf", quant, runtime="llama.cpp"), profile)


def test_bytes_of_a_decode_epoch(facts, cpu_profile):
    w = workload(facts, cpu_profile)
    target = make_target(cpu_profile, "llama.cpp", record=UNIT)
    cached = 100
    step = epoch(w, target, Placement("device", 4), cached, 1, 1)
    kv_token_layer = 2 * 2 * 16 * 2.0  # K and V x kv_heads x head_dim x f16
    layer0 = step.segments[0]
    assert layer0.read_bytes == w.layer_bytes[0] + kv_token_layer * (cached + 1) + 64 * 4
    assert layer0.written_bytes == kv_token_layer + 64 * 4
    head = step.segments[-1]
    # tied: the head reads the whole Q8_0 embedding table, plus one embedding row and the final norm
    embd = next(t for t in w.tensors if t.role == "token_embd")
    assert head.read_bytes == embd.nbytes + embd.nbytes / 256 + 64 * 4
    assert len(step.segments) == 5 and step.link_seconds == 0


def test_the_onnx_export_copies_its_kv_cache_every_call(facts, cpu_profile):
    """optimum's graph writes present = Concat(past, new) into a fresh tensor: each call reads the past once more
    and writes all of it, where llama.cpp appends in place (test above)."""
    w = make_workload(facts, Deployment("onnx", "int4_b32", runtime="onnxruntime"), cpu_profile)
    target = make_target(cpu_profile, "onnxruntime", record=UNIT)
    kv_token_layer = 2 * 2 * 16 * 4.0  # K and V x kv_heads x head_dim x float32
    for cached, tokens in ((100, 1), (256, 128)):
        layer0 = epoch(w, target, Placement("device", 4), cached, tokens, tokens).segments[0]
        activations = tokens * 64 * 4
        assert layer0.read_bytes == w.layer_bytes[0] + kv_token_layer * (2 * cached + tokens) + activations
        assert layer0.written_bytes == kv_token_layer * (cached + tokens) + activations


def test_epoch_time_is_the_roofline_max(facts, cpu_profile):
    w = workload(facts, cpu_profile)
    target = make_target(cpu_profile, "llama.cpp", threads=1, record=UNIT)  # 1 of 2 cores: half the peak
    assert target.main.int_ops == pytest.approx(1e12) and target.main.float_flops == pytest.approx(0.5e12)
    step = epoch(w, target, Placement("device", 4), 0, 512, 1)
    expected = 0.0
    for s in step.segments:
        memory = s.read_bytes / 10e9 + s.written_bytes / 10e9
        compute = s.int_flops / 1e12 + s.float_flops / 0.5e12
        expected += max(memory, compute)
    assert step.seconds() == pytest.approx(expected)
    layer = step.segments[0]
    params = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128  # q, o, k, v, gate, up, down
    assert layer.int_flops == 2 * 512 * params
    assert layer.float_flops == pytest.approx(4 * 512 * (0 + 513 / 2) * 4 * 16)
    # a big prefill chunk is compute-bound, one decode token memory-bound
    assert layer.compute_units() > layer.memory_units()
    one = epoch(w, target, Placement("device", 4), 0, 1, 1).segments[0]
    assert one.memory_units() > one.compute_units()


@pytest.mark.parametrize(
    ("runtime", "features", "flops_share", "int8_share", "isa"),
    [
        ("llama.cpp", ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"], 32 / 1024,
         64 / 2048, "avx2"),
        ("onnxruntime", ["avx2", "fma", "avx512f", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"], 64 / 1024,
         256 / 2048, "avx512"),
        ("llama.cpp", ["avx2", "fma", "avx_vnni"], 1.0, 64 / 128, None),
        ("onnxruntime", ["avx2", "fma", "avx_vnni"], 1.0, 1.0, None),
        ("torch", ["avx2", "amx_tile", "amx_bf16", "amx_int8"], 1.0, 1.0, None),
    ],
)  # fmt: skip
def test_cpu_peak_is_the_isa_the_runtime_uses(cpu_profile, runtime, features, flops_share, int8_share, isa):
    """A CPU with AMX: the portable llama.cpp build runs AVX2 kernels, so its peak is 32 of 1024 FLOP per cycle."""
    compute = cpu_profile.compute.model_copy(update={"cpu_features": features})
    target = make_target(cpu_profile.model_copy(update={"compute": compute}), runtime, record=UNIT)
    assert target.main.float_flops == pytest.approx(1e12 * flops_share)
    assert target.main.int_ops == pytest.approx(2e12 * int8_share)
    notes = [note for note in target.notes if note.startswith("CPU peak scaled")]
    if isa is None:
        assert notes == ([] if int8_share == 1.0 else [
            f"CPU peak scaled to avx2 from avx2 (32 of 32 FLOP/cycle, 64 of 128 INT8 op/cycle): "
            f"{RUNTIME_UNUSED_CPU_FEATURES[runtime][1]}"])  # fmt: skip
    else:
        assert notes == [f"CPU peak scaled to {isa} from amx ({flops_share * 1024:g} of 1024 FLOP/cycle, "
                         f"{int8_share * 2048:g} of 2048 INT8 op/cycle): {RUNTIME_UNUSED_CPU_FEATURES[runtime][1]}"]  # fmt: skip


def test_overhead_and_prefill_chunks(facts, cpu_profile):
    record = {"runtimes": {"llama.cpp": {"cpu": {
        "bandwidth_efficiency": 0.5, "compute_efficiency": 0.25, "step_overhead_s": 0.01}}}}  # fmt: skip
    w = workload(facts, cpu_profile)
    assert prefill_epochs(w, 1100) == [(0, 512, 1), (512, 512, 1), (1024, 76, 1)]
    unit = epoch(w, make_target(cpu_profile, "llama.cpp", record=UNIT), Placement("device", 4), 5, 1, 1)
    slow = epoch(w, make_target(cpu_profile, "llama.cpp", record=record), Placement("device", 4), 5, 1, 1)
    expected = sum(max(s.memory_units() / 0.5, s.compute_units() / 0.25) for s in unit.segments) + 0.01
    assert slow.seconds() == pytest.approx(expected)
    result = simulate(w, cpu_profile, context=600, record=record, decode_tokens=32)
    assert result.prompt_tokens == 568
    assert result.prefill_tokens_per_s == pytest.approx(568 / result.ttft_s)
    assert len(result.per_token_latency_s) == len(result.latency_positions) == 32
    assert result.per_token_latency_s == sorted(result.per_token_latency_s)  # KV grows along the context


def test_device_placement_when_it_fits(facts, gpu_profile):
    w = workload(facts, gpu_profile)
    result = simulate(w, gpu_profile, context=1024, record=UNIT)
    assert result.placement.name == "device" and result.oom_context is None
    data = result.to_json(4)
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "placement", "oom_context"):
        assert key in data
    assert data["placement"]["kv_cache_tier"] == "gddr6"


def test_split_takes_the_largest_layer_count_that_fits(facts, gpu_profile):
    w = workload(facts, gpu_profile)
    full = tier_bytes(
        w, gpu_profile, make_target(gpu_profile, "llama.cpp", record=UNIT), Placement("device", 4), 1024
    )
    # VRAM that holds everything except about one and a half layers (weights and their KV)
    layer = w.layer_bytes[0] + full["gddr6"] * 0  # weights of one layer
    profile = with_vram(gpu_profile, (full["gddr6"] - 1.5 * layer) / 2**30)
    target = make_target(profile, "llama.cpp", record=UNIT)
    assert not fits(tier_bytes(w, profile, target, Placement("device", 4), 1024), target)
    result = simulate(w, profile, context=1024, placement="split", record=UNIT)
    n = result.placement.gpu_layers
    assert fits(tier_bytes(w, profile, target, Placement("split", n), 1024), target)
    assert not fits(tier_bytes(w, profile, target, Placement("split", n + 1), 1024), target)
    # split moves the hidden state over PCIe; the CPU part runs at the host CPU's peak
    step = epoch(w, target, Placement("split", n), 100, 1, 1)
    assert step.link_seconds == pytest.approx(2 * 64 * 4 / 7.88e9 + 2 * 1e-6)
    assert step.segments[-1].processor.name == "cpu" and step.segments[0].processor.name == "cuda"
    auto = simulate(w, profile, context=1024, record=UNIT)
    assert auto.placement.name in ("split", "kv-host") and auto.fits


def test_oom_context(facts, cpu_profile):
    w = workload(facts, cpu_profile)
    target = make_target(cpu_profile, "llama.cpp", record=UNIT)
    at_512 = tier_bytes(w, cpu_profile, target, Placement("device", 4), 512)["ddr4"]
    at_2048 = tier_bytes(w, cpu_profile, target, Placement("device", 4), 2048)["ddr4"]
    capacity = (at_512 + at_2048) // 2
    tier = cpu_profile.memory_tiers[0].model_copy(update={"capacity_gib": fig(capacity / 2**30)})
    small = cpu_profile.model_copy(update={"memory_tiers": [tier]})
    small_target = make_target(small, "llama.cpp", record=UNIT)
    oom = first_oom_context(w, small, small_target, Placement("device", 4), 2048)
    assert oom is not None and 512 < oom <= 2048
    assert fits(tier_bytes(w, small, small_target, Placement("device", 4), oom - 1), small_target)
    assert not fits(tier_bytes(w, small, small_target, Placement("device", 4), oom), small_target)
    result = simulate(w, small, context=2048, record=UNIT)
    assert result.oom_context == oom and not result.fits
    assert simulate(w, small, context=512, record=UNIT).oom_context is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--placement", "sideways"], "unknown placement 'sideways'"),
        (["--context", "4096"], "beyond the model's maximum of 2048"),
        (["--placement", "kv-host"], "needs a second memory tier"),
        (["--profile-capacity", "0.01"], "fits no tier"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, monkeypatch, capsys, facts, extra, message):
    from toolkit.cli.main import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**CONFIG, "architectures": ["LlamaForCausalLM"]}))
    profile = load_profile("workstation-cpu-16gb")
    plan = make_plan(facts, profile, str(model), format="gguf", quant="Q8_0", prune_layers=0, context=512)
    write_plan(plan, tmp_path / "plan.json")
    profile_arg = "workstation-cpu-16gb"
    if extra[0] == "--profile-capacity":
        import yaml

        data = yaml.safe_load(
            (load_profile.__globals__["PROFILES_DIR"] / "workstation-cpu-16gb.yaml").read_text()
        )
        data["memory_tiers"][0]["capacity_gib"]["value"] = float(extra[1])
        data["reserved_gib"]["value"] = 0.001
        (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data))
        profile_arg, extra = str(tmp_path / "tiny.yaml"), []
    context = [] if "--context" in extra else ["--context", "512"]  # the profile's 4096 is beyond this model
    argv = [
        "bedside",
        "simulate",
        "--profile",
        profile_arg,
        "--plan",
        str(tmp_path / "plan.json"),
        *context,
        *extra,
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_plan_json_output(tmp_path, monkeypatch, capsys, facts):
    from toolkit.cli.main import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**CONFIG, "architectures": ["LlamaForCausalLM"]}))
    plan = make_plan(
        facts, load_profile("rtx3050-4gb"), str(model), format="gguf", quant="Q8_0", prune_layers=0
    )
    write_plan(plan, tmp_path / "plan.json")
    argv = ["bedside", "simulate", "--profile", "rtx3050-4gb", "--plan", str(tmp_path / "plan.json"),
            "--context", "1024", "--json"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()
    data = json.loads(capsys.readouterr().out)
    assert data["context"] == 1024 and data["oom_context"] is None and data["decode_tokens_per_s"] > 0
    assert data["placement"]["name"] == "device" and len(data["per_token_latency_s"]) == 32


def test_unknown_split_count_is_an_error(facts, gpu_profile):
    with pytest.raises(BedsideError, match="split:N"):
        simulate(workload(facts, gpu_profile), gpu_profile, context=256, placement="split:99", record=UNIT)
