"""The `bedside` command as a user runs it: a real process, exit codes, one-line errors, no traceback."""

import json
import subprocess
from pathlib import Path

import pytest
from cli_runner import bedside as run_bedside

FIXTURES = Path(__file__).parent / "fixtures"



def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_lists_every_command():
    result = run_bedside("--help")
    assert result.returncode == 0
    listed = {
        line.split()[1]
        for line in result.stdout.splitlines()
        if line.startswith("│ ") and len(line.split()) > 2
    }
    expected = {
        "setup",
        "profiles",
        "inspect",
        "plan",
        "compress",
        "export",
        "eval",
        "run",
        "deploy",
        "verify",
    }
    assert expected <= listed, sorted(expected - listed)


def test_unknown_profile_is_one_line_exit_2():
    result = run_bedside("plan", "--model", str(FIXTURES / "llama-2-7b"), "--profile", "no-such-device")
    assert_one_line_error(result, 2, "no-such-device", "jetson4gb")


def test_malformed_profile_yaml_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    result = run_bedside("profiles", "show", str(bad))
    assert_one_line_error(result, 2, "bad.yaml")


def test_model_folder_without_config_is_one_line_exit_2(tmp_path):
    result = run_bedside("inspect", str(tmp_path))
    assert_one_line_error(result, 2, "config.json")


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    result = run_bedside("inspect", str(tmp_path))
    assert_one_line_error(result, 2, "LlamaForCausalLM")


def test_plan_json_contract_and_exit_codes(tmp_path):
    fits = run_bedside(
        "plan", "--model", str(FIXTURES / "llava-1.5-7b"), "--profile", "rtx3050-4gb", "--json"
    )
    assert fits.returncode == 0, fits.stderr
    plan = json.loads(fits.stdout)
    assert plan["fits"] is True
    memory = plan["chosen"]["memory"]
    assert memory["total_bytes"] == pytest.approx(
        sum(memory[k] for k in ("weights_bytes", "kv_cache_bytes", "vision_bytes", "overhead_bytes")),
        rel=1e-9,
    )
    assert memory["total_bytes"] <= 4 * 1024**3
    tiny = tmp_path / "tiny.yaml"
    profile = (Path(__file__).parents[1] / "device_profiles" / "jetson4gb.yaml").read_text()
    tiny.write_text(
        profile.replace("name: jetson4gb", "name: tiny").replace("      value: 4\n", "      value: 1.1\n", 1)
    )
    none = run_bedside("plan", "--model", str(FIXTURES / "llava-1.5-7b"), "--profile", str(tiny), "--json")
    assert none.returncode == 3, none.stderr
    assert json.loads(none.stdout)["fits"] is False
    assert "Traceback" not in none.stderr


def test_plan_estimates_16_bit_healing_for_a_streamed_16_bit_model():
    """Llama-2-7B (fp16 weights, streamed): healing in 16 bits with gradient checkpointing, estimated as such and
    labelled in the table; the 135M fixture (bf16 but compressed in memory) heals in float32."""
    from toolkit.compress.record import CompressOptions
    from toolkit.model.facts import read_facts
    from toolkit.plan.compression_memory import heal_memory

    defaults = CompressOptions()
    for name, sixteen_bit in (("llama-2-7b", True), ("smollm2-135m", False)):
        result = run_bedside(
            "plan", "--model", str(FIXTURES / name), "--profile", "jetson4gb", "--prune-layers", "4", "--json"
        )
        assert result.returncode == 0, result.stderr
        compression = json.loads(result.stdout)["compression"]
        expected = heal_memory(
            read_facts(str(FIXTURES / name)),
            calib_sequences=defaults.calib_sequences,
            seq_len=defaults.seq_len,
            sixteen_bit=sixteen_bit,
        )
        assert (compression["heal_sixteen_bit"], compression["heal"]) == (sixteen_bit, expected), name
        assert compression["can_heal"] == (expected <= compression["host_memory_bytes"])
    llava = run_bedside(
        "plan", "--model", str(FIXTURES / "llava-1.5-7b"), "--profile", "jetson4gb", "--prune-layers", "4", "--json"
    )  # a LLaVA cannot stream: compressed in memory, healed in float32
    compression = json.loads(llava.stdout)["compression"]
    assert (compression["sequential"], compression["heal_sixteen_bit"]) == (False, False)
    table = run_bedside("plan", "--model", str(FIXTURES / "llama-2-7b"), "--profile", "jetson4gb", "--prune-layers", "4")
    assert "heal (16-bit, checkpointing)" in table.stdout


def test_deploy_with_missing_data_is_one_line_exit_2(tmp_path):
    result = run_bedside(
        "deploy",
        "--profile",
        "rtx3050-4gb",
        "--model",
        str(FIXTURES / "llama-2-7b"),
        "--calib",
        str(tmp_path / "missing.jsonl"),
        "--out",
        str(tmp_path / "d"),
    )
    assert_one_line_error(result, 2, "missing.jsonl")
    assert not (tmp_path / "d").exists()


def test_usage_errors_are_one_line_exit_2():
    """An unknown option or a bad value is click's usage error (vendored by typer): one line, exit 2."""
    assert_one_line_error(run_bedside("plan", "--bogus"), 2, "No such option", "--bogus")
    assert_one_line_error(
        run_bedside("plan", "--model", "demo", "--profile", "jetson4gb", "--context", "many"), 2, "--context", "integer"
    )
