"""Device profiles: shipped files load and cite sources, bad files give one-line errors, host is measured."""

import copy
import json
import sys
import types
from pathlib import Path

import psutil
import pytest
import typer
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from toolkit.cli.profiles import register
from toolkit.core.errors import BedsideError
from toolkit.core.formats import FORMATS, KV_CACHE_DTYPES, RUNTIMES
from toolkit.core.paths import PROFILES_DIR
from toolkit.core.units import GIB
from toolkit.target.host import build_host_profile, detect_cpu, detect_host_profile, detect_nvidia_gpu
from toolkit.target.profiles import (
    HOST_PROFILE_NAME,
    DeviceProfile,
    Figure,
    available_bytes,
    budget_bytes,
    list_profiles,
    load_profile,
    profile_from_mapping,
    profile_to_yaml,
)

SHIPPED = [name for name in list_profiles() if name != HOST_PROFILE_NAME]


def figures(model: BaseModel, path: str = "") -> list[tuple[str, Figure]]:
    """Every Figure inside a profile, with its field path."""
    found: list[tuple[str, Figure]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in items:
            where = f"{path}{name}" + ("" if index is None else f"[{index}]")
            if isinstance(item, Figure):
                found.append((where, item))
            elif isinstance(item, BaseModel):
                found += figures(item, where + ".")
    return found


def base_data() -> dict:
    """The jetson4gb profile as plain data, to break one field at a time."""
    return yaml.safe_load((PROFILES_DIR / "jetson4gb.yaml").read_text())


def write(tmp_path: Path, data: object, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_for(path: Path) -> str:
    with pytest.raises(BedsideError) as caught:
        load_profile(str(path))
    message = str(caught.value)
    assert "\n" not in message
    assert path.name in message
    return message


# --- shipped profiles -----------------------------------------------------------------------


def test_the_expected_profiles_ship():
    assert {
        "jetson4gb",
        "jetson-orin-nano-8gb",
        "jetson-agx-orin-64gb",
        "rtx3050-4gb",
        "workstation-cpu-16gb",
        "workstation-cpu-8gb",
    } <= set(SHIPPED)
    assert list_profiles()[-1] == HOST_PROFILE_NAME


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_with_a_source_for_every_figure(name):
    profile = load_profile(name)
    assert profile.name == name  # the file stem is the name users type
    found = figures(profile)
    assert len(found) >= 10
    for where, figure in found:
        assert figure.source.strip(), f"{name}: {where} has no source"
    assert 0 < available_bytes(profile) < budget_bytes(profile) < profile.model_memory_tier.capacity_bytes
    assert set(profile.formats) <= set(FORMATS) and set(profile.runtimes) <= set(RUNTIMES)
    assert profile.kv_cache_dtype in KV_CACHE_DTYPES and set(profile.kv_cache_dtypes) <= set(KV_CACHE_DTYPES)


def test_shipped_figures_match_the_datasheets():
    jetson = load_profile("jetson4gb").model_memory_tier
    assert (jetson.capacity_gib.value, jetson.bandwidth_gbs.value, jetson.kind) == (4, 34, "unified")
    assert load_profile("jetson-orin-nano-8gb").model_memory_tier.bandwidth_gbs.value == 68
    agx = load_profile("jetson-agx-orin-64gb")  # DS-10662-001: 64 GB 256-bit LPDDR5, 2048 CUDA cores, 170 sparse TOPS
    assert (agx.model_memory_tier.capacity_gib.value, agx.model_memory_tier.bandwidth_gbs.value) == (64, 204.8)
    assert (agx.compute.cores.value, agx.compute.int8_tops.value, agx.compute.fp16_tflops.value) == (2048, 85, 42.5)
    laptop = load_profile("rtx3050-4gb")
    assert laptop.model_tier == "gddr6" and laptop.compute.architecture == "sm_86"
    assert laptop.links[0].bandwidth_gbs.value == pytest.approx(8 * 128 / 130 * 8 / 8, abs=0.01)


# --- budget arithmetic ----------------------------------------------------------------------


def test_budget_is_capacity_minus_reserved_and_available_keeps_the_headroom():
    data = base_data()
    data["memory_tiers"][0]["capacity_gib"]["value"] = 4
    data["reserved_gib"]["value"] = 1
    data["headroom_pct"]["value"] = 10
    profile = profile_from_mapping(data, "test")
    assert budget_bytes(profile) == 3 * GIB
    assert available_bytes(profile) == int(3 * GIB * 0.9)


def test_budget_uses_the_model_tier_not_the_biggest_tier():
    profile = load_profile("rtx3050-4gb")  # 16 GiB DDR4 host tier, 4 GiB GDDR6 model tier
    assert budget_bytes(profile) == int(4 * GIB) - int(0.3 * GIB)


# --- bad profiles ---------------------------------------------------------------------------


def test_malformed_yaml(tmp_path):
    message = error_for(write(tmp_path, "name: jetson\nformats: [gguf\n"))
    assert "malformed YAML at line" in message


def test_duplicate_key_is_refused(tmp_path):
    text = (PROFILES_DIR / "jetson4gb.yaml").read_text() + "\nformats: [onnx]\n"
    message = error_for(write(tmp_path, text))
    assert "duplicate key 'formats'" in message


@pytest.mark.parametrize("text", ["", "- a\n- b\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    assert "expected a mapping of profile fields" in error_for(write(tmp_path, text))


def test_unknown_top_level_key_lists_the_allowed_keys(tmp_path):
    data = base_data()
    data["gpu"] = "orin"
    message = error_for(write(tmp_path, data))
    assert "gpu: unknown key 'gpu' (allowed: schema_version, name, description," in message


def test_unknown_nested_key(tmp_path):
    data = base_data()
    data["compute"]["clock_mhz"] = 625
    message = error_for(write(tmp_path, data))
    assert "compute.clock_mhz: unknown key 'clock_mhz' (allowed: accelerator, architecture, cores," in message


def test_missing_field(tmp_path):
    data = base_data()
    del data["memory_tiers"][0]["bandwidth_gbs"]
    assert "memory_tiers[0].bandwidth_gbs: missing required field" in error_for(write(tmp_path, data))


def test_negative_size(tmp_path):
    data = base_data()
    data["memory_tiers"][0]["capacity_gib"]["value"] = -4
    message = error_for(write(tmp_path, data))
    assert "memory_tiers[0].capacity_gib.value: must be greater than or equal to 0 (got -4)" in message


def test_figure_needs_value_and_source(tmp_path):
    data = base_data()
    data["reserved_gib"] = 1.0
    message = error_for(write(tmp_path, data))
    assert "reserved_gib: expected a mapping with keys value, source (got 1.0)" in message


def test_empty_source(tmp_path):
    data = base_data()
    data["compute"]["cores"]["source"] = "  "
    assert "compute.cores.source:" in error_for(write(tmp_path, data))


def test_unknown_format_message_names_file_field_and_allowed_values(tmp_path):
    data = base_data()
    data["formats"] = ["gguf", "tflite"]
    path = write(tmp_path, data)
    message = error_for(path)
    assert message.endswith("formats[1]: unknown format 'tflite' (allowed: gguf, onnx)")


def test_format_no_listed_runtime_reads(tmp_path):
    data = base_data()
    data["formats"] = ["gguf", "onnx"]
    message = error_for(write(tmp_path, data))
    assert "formats[1]: no listed runtime reads 'onnx' (add one of: onnxruntime to runtimes)" in message


def test_unknown_runtime(tmp_path):
    data = base_data()
    data["runtimes"] = ["llama.cpp", "tensorrt"]
    message = error_for(write(tmp_path, data))
    assert "runtimes[1]: unknown runtime 'tensorrt' (allowed: llama.cpp, onnxruntime, torch)" in message


def test_quant_scheme_must_belong_to_the_profiles_formats(tmp_path):
    data = base_data()
    data["quant_schemes"] = ["Q4_K_M", "int4_b32"]  # an ONNX scheme on a gguf-only profile
    message = error_for(write(tmp_path, data))
    assert (
        f"quant_schemes[1]: unknown scheme 'int4_b32' for formats gguf (allowed: {', '.join(FORMATS['gguf'])})"
        in message
    )


def test_unknown_kv_dtype(tmp_path):
    data = base_data()
    data["kv_cache_dtypes"] = ["f16", "q4"]
    message = error_for(write(tmp_path, data))
    assert "kv_cache_dtypes[1]: unknown KV cache dtype 'q4' (allowed: f32, f16, q8_0, q4_0)" in message


def test_an_older_profile_with_one_kv_cache_dtype_still_loads(tmp_path):
    """`kv_cache_dtype: f16` alone (profiles before the planner chose KV precision) allows that one precision."""
    data = base_data()
    del data["kv_cache_dtypes"]
    data["kv_cache_dtype"] = "q8_0"
    profile = load_profile(str(write(tmp_path, data)))
    assert profile.kv_cache_dtypes == ["q8_0"] and profile.kv_cache_dtype == "q8_0"
    shipped = load_profile("jetson4gb")
    assert shipped.kv_cache_dtypes == ["f16", "q8_0", "q4_0"] and shipped.kv_cache_dtype == "f16"
    data["kv_cache_dtypes"] = ["f16", "q4_0"]  # both given: the single one must be among the list
    message = error_for(write(tmp_path, data))
    assert "kv_cache_dtype: 'q8_0' is not one of kv_cache_dtypes (f16, q4_0)" in message


def test_unknown_tier_kind(tmp_path):
    data = base_data()
    data["memory_tiers"][0]["kind"] = "vram"
    message = error_for(write(tmp_path, data))
    assert "memory_tiers[0].kind: unknown value 'vram' (allowed: 'unified', 'device', 'host' or 'cxl')" in message


def test_model_tier_must_name_a_tier(tmp_path):
    data = base_data()
    data["model_tier"] = "vram"
    assert "model_tier: unknown tier 'vram' (allowed: lpddr5)" in error_for(write(tmp_path, data))


def test_link_must_name_known_tiers(tmp_path):
    data = base_data()
    figure = {"value": 1, "source": "test figure"}
    data["links"] = [
        {"name": "pcie", "between": ["lpddr5", "ddr4"], "bandwidth_gbs": figure, "latency_ns": figure}
    ]
    assert "links[0].between[1]: unknown tier 'ddr4' (allowed: lpddr5)" in error_for(write(tmp_path, data))


def test_reserve_must_leave_room(tmp_path):
    data = base_data()
    data["reserved_gib"]["value"] = 4
    assert "reserved_gib.value:" in error_for(write(tmp_path, data))


def test_several_problems_are_counted_on_the_one_line(tmp_path):
    data = base_data()
    del data["name"]
    del data["model_tier"]
    message = error_for(write(tmp_path, data))
    assert "name: missing required field (and 1 more problem)" in message


def test_unknown_name_lists_the_available_profiles():
    with pytest.raises(BedsideError) as caught:
        load_profile("jetson2gb")
    message = str(caught.value)
    assert "unknown device profile 'jetson2gb'" in message
    assert all(name in message for name in [*SHIPPED, HOST_PROFILE_NAME])


def test_missing_user_file():
    with pytest.raises(BedsideError, match="profile file not found: nowhere/device.yaml"):
        load_profile("nowhere/device.yaml")


# --- user files and round trip --------------------------------------------------------------


def test_user_profile_path_works(tmp_path):
    data = base_data()
    data["name"] = "ward-7-nuc"
    path = write(tmp_path, data, "ward.yml")
    profile = load_profile(str(path))
    assert profile.name == "ward-7-nuc"
    assert budget_bytes(profile) == budget_bytes(load_profile("jetson4gb"))


@pytest.mark.parametrize("name", SHIPPED)
def test_yaml_round_trip(tmp_path, name):
    profile = load_profile(name)
    assert load_profile(str(write(tmp_path, profile_to_yaml(profile)))) == profile


def test_profile_is_immutable():
    profile = load_profile("jetson4gb")
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error type varies
        profile.name = "other"  # type: ignore[misc]
    assert isinstance(copy.deepcopy(profile), DeviceProfile)


# --- host -----------------------------------------------------------------------------------


def test_host_profile_is_measured():
    profile = load_profile(HOST_PROFILE_NAME)
    assert profile is detect_host_profile()  # measured once per process
    ram = next(tier for tier in profile.memory_tiers if tier.name == "ram")
    assert ram.bandwidth_gbs.value > 0
    assert "measured by `bedside profiles show host`" in ram.bandwidth_gbs.source
    assert ram.capacity_bytes == pytest.approx(psutil.virtual_memory().total, rel=0.01)
    assert profile.compute.cores.value >= 1
    for where, figure in figures(profile):
        assert figure.source.strip(), where
    assert available_bytes(profile) < budget_bytes(profile)


def fake_pynvml(supports_extras: bool = True) -> types.ModuleType:
    """An NVML stand-in describing an RTX 3050 Laptop GPU (no GPU on the test machines)."""
    module = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def extra(value: object):
        def query(*_args: object) -> object:
            if not supports_extras:
                raise NVMLError("Not Supported")
            return value

        return query

    module.NVMLError = NVMLError
    module.NVML_CLOCK_SM, module.NVML_CLOCK_MEM = 1, 2
    module.nvmlInit = module.nvmlShutdown = lambda: None
    module.nvmlDeviceGetCount = lambda: 1
    module.nvmlDeviceGetHandleByIndex = lambda index: "gpu0"
    module.nvmlDeviceGetName = lambda handle: b"NVIDIA GeForce RTX 3050 Laptop GPU"
    module.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(
        total=4 * GIB, used=GIB // 4, free=4 * GIB - GIB // 4
    )
    module.nvmlDeviceGetCudaComputeCapability = extra((8, 6))
    module.nvmlDeviceGetMemoryBusWidth = extra(128)
    module.nvmlDeviceGetMaxClockInfo = extra(6001)  # MHz; SM and memory alike, enough for the test
    module.nvmlDeviceGetNumGpuCores = extra(2048)
    module.nvmlDeviceGetMaxPcieLinkGeneration = extra(3)
    module.nvmlDeviceGetMaxPcieLinkWidth = extra(8)
    return module


def test_host_with_an_nvidia_gpu_plans_for_vram(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    gpu = detect_nvidia_gpu()
    assert gpu is not None and gpu.compute_capability == (8, 6)
    assert gpu.memory_bandwidth_gbs == pytest.approx(192.0, rel=0.01)  # 2 x 6001 MHz x 128 bit / 8
    profile = build_host_profile(detect_cpu(), gpu)
    assert profile.model_tier == "vram" and profile.compute.architecture == "sm_86"
    assert [tier.kind for tier in profile.memory_tiers] == ["device", "host"]
    assert profile.links[0].between == ("ram", "vram")
    assert profile.links[0].bandwidth_gbs.value == pytest.approx(7.88, abs=0.01)
    assert profile.reserved_gib.value == pytest.approx(0.25)  # used by others; our context is in the estimate
    assert budget_bytes(profile) == pytest.approx(3.75 * GIB, abs=1)


def test_host_gpu_without_optional_nvml_queries(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(supports_extras=False))
    gpu = detect_nvidia_gpu()
    assert gpu is not None and gpu.memory_bandwidth_gbs is None and gpu.cuda_cores == 0
    profile = build_host_profile(detect_cpu(), gpu)
    assert profile.links == [] and profile.model_memory_tier.bandwidth_gbs.source.startswith(
        "NVML reports no"
    )


def test_host_without_nvml_is_cpu_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if nvidia-ml-py were missing
    assert detect_nvidia_gpu() is None


# --- CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli() -> tuple[CliRunner, typer.Typer]:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """Stand-in for the bedside app."""

    register(app)
    return CliRunner(env={"COLUMNS": "300"}), app


def test_cli_lists_profiles(cli):
    runner, app = cli
    result = runner.invoke(app, ["profiles"])
    assert result.exit_code == 0, result.output
    for name in [*SHIPPED, HOST_PROFILE_NAME]:
        assert name in result.output
    assert "34 GB/s" in result.output


def test_cli_show_prints_every_figure_with_its_source(cli):
    runner, app = cli
    result = runner.invoke(app, ["profiles", "show", "jetson4gb"])
    assert result.exit_code == 0, result.output
    assert "memory_tiers[0].bandwidth_gbs" in result.output
    assert "DS-11105-001" in result.output
    assert "3.00 GiB" in result.output  # budget


def test_cli_show_json_round_trips(cli, tmp_path):
    runner, app = cli
    result = runner.invoke(app, ["profiles", "show", "rtx3050-4gb", "--json"])
    assert result.exit_code == 0, result.output
    assert DeviceProfile.model_validate(json.loads(result.output)) == load_profile("rtx3050-4gb")


def test_cli_show_unknown_profile_is_a_user_error(cli):
    runner, app = cli
    result = runner.invoke(app, ["profiles", "show", "nope"])
    assert isinstance(result.exception, BedsideError)
    assert "available:" in str(result.exception)
