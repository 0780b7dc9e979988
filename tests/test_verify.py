"""`bedside verify`: hashes, tampered and truncated files named, load + smoke prompt + peak memory, exit codes.

The bundle is built with `toolkit.deploy.bundle.make_bundle` from the demo model's original GGUF, so these
tests need no compression run (the end-to-end deploy test in test_deploy.py verifies a real bundle).
"""

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from cli_runner import bedside as run_bedside

from toolkit.deploy.bundle import make_bundle
from toolkit.deploy.outcome import Attempt, DeployOutcome, ModelSummary
from toolkit.deploy.verify import hash_checks, read_manifest, verify_bundle
from toolkit.model.facts import facts_from_config
from toolkit.plan.planner import make_plan
from toolkit.target.profiles import load_profile
from toolkit.validate.checks import Check

FIXTURES = Path(__file__).parent / "fixtures"
TINY_PROFILE = FIXTURES / "profiles" / "tiny-cpu.yaml"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, demo_model_dir, demo_gguf_path) -> Path:
    """A bundle of the demo GGUF for the tiny profile: folder and .tar.gz under one out folder."""
    out = tmp_path_factory.mktemp("verify")
    profile = load_profile(str(TINY_PROFILE))
    facts = facts_from_config(json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text()))
    plan = make_plan(facts, profile, "demo")
    export_dir = out / "export"
    export_dir.mkdir()
    shutil.copy(demo_gguf_path, export_dir / "model-Q4_1.gguf")
    (export_dir / "export.json").write_text(json.dumps({"format": "gguf", "file": "model-Q4_1.gguf"}))
    for name in ("report.json", "report.html"):
        (out / name).write_text("{}" if name.endswith("json") else "<html></html>")
    record = {
        "layers_removed": [],
        "calibration": {"sha256": "c" * 64, "documents": 3, "tokens": 100},
        "eval": {"sha256": "e" * 64, "documents": 1, "tokens": 50},
    }
    final = Attempt(
        attempt=1,
        plan=plan,
        compression=record,
        checkpoint=demo_model_dir,
        export_dir=export_dir,
        artifact=export_dir / "model-Q4_1.gguf",
        checks=[Check("peak_memory_bytes", True, 170.0 * 2**20, float(plan.budget_bytes), "<=", "bytes")],
    )
    outcome = DeployOutcome(
        model=ModelSummary(name="demo", source_sha256="s" * 64, num_layers=30, total_params=1),
        threads=None,
        profile=profile,
        first_plan=plan,
        attempts=[final],
        passed=True,
        reason="attempt 1 passed",
    )
    make_bundle(out, "bundle-tiny-cpu", outcome, out / "report.json", out / "report.html")
    return out


def roomy_profile(tmp_path: Path) -> Path:
    """The tiny profile with 1 GiB, so memory on a busy test host never decides these tests."""
    path = tmp_path / "roomy.yaml"
    text = TINY_PROFILE.read_text()
    capacity = text.index("capacity_gib:\n      value: ") + len("capacity_gib:\n      value: ")
    text = text[:capacity] + "1.0" + text[text.index("\n", capacity) :]
    path.write_text(text.replace("name: tiny-cpu", "name: roomy"))
    return path


def copy_of(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle-tiny-cpu"
    shutil.copytree(bundle / "bundle-tiny-cpu", target)
    return target


def test_manifest_lists_every_file_with_sha256_and_no_data(bundle):
    folder = bundle / "bundle-tiny-cpu"
    manifest = read_manifest(folder)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert manifest["data"]["calibration"] == {"sha256": "c" * 64, "documents": 3, "tokens": 100}
    assert manifest["versions"]["bedside"] and "llama_cpp_python" in manifest["versions"]
    runtime = json.loads((folder / "runtime.json").read_text())
    assert (
        runtime["model"] == "model/model-Q4_1.gguf"
        and runtime["context"] == 256
        and runtime["gpu_layers"] == 0
    )
    assert runtime["mmap"] is False  # the plan's Q4_0 is repacked on this CPU: read, not mapped
    readme = (folder / "README.md").read_text()
    assert "bedside verify bundle-tiny-cpu.tar.gz" in readme and "--no-mmap" in readme
    assert "measured peak 170 MiB" in readme
    assert manifest["validation"] == {"peak_memory_bytes": 170.0 * 2**20, "context": 256}
    assert manifest["source_model_sha256"] == "s" * 64 and manifest["layers_removed"] == []
    assert all(check.passed for check in hash_checks(folder, manifest))


def test_verify_archive_passes_every_check(bundle, tmp_path):
    result = run_bedside(
        "verify",
        str(bundle / "bundle-tiny-cpu.tar.gz"),
        "--profile",
        str(roomy_profile(tmp_path)),
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("sha256 model/model-Q4_1.gguf", "load", "smoke prompt", "peak memory"):
        assert f"PASS {name}" in result.stdout
    assert "FAIL" not in result.stdout


def test_verify_json_prints_passed_and_checks_only(bundle, tmp_path):
    archive = str(bundle / "bundle-tiny-cpu.tar.gz")
    result = run_bedside(
        "verify", archive, "--profile", str(roomy_profile(tmp_path)), "--threads", "1", "--json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = json.loads(result.stdout)  # one object and nothing else on stdout
    assert set(output) == {"passed", "checks"} and output["passed"] is True
    names = [check["name"] for check in output["checks"]]
    assert {"sha256 model/model-Q4_1.gguf", "sha256 Modelfile", "sha256 MODEL_CARD.md", "load"} <= set(names)
    assert {"smoke prompt", "peak memory"} <= set(names) and all(
        check["passed"] for check in output["checks"]
    )
    assert set(output["checks"][0]) == set(
        Check("x", True, None, None).model_dump(mode="json")
    )  # report form
    folder = copy_of(bundle, tmp_path)
    (folder / "README.md").write_text("changed")
    failed = run_bedside("verify", str(folder), "--json")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    output = json.loads(failed.stdout)
    assert output["passed"] is False
    assert {c["name"] for c in output["checks"] if not c["passed"]} == {"sha256 README.md", "load"}


def test_tampered_model_fails_with_file_named_and_is_not_loaded(bundle, tmp_path):
    folder = copy_of(bundle, tmp_path)
    model = folder / "model" / "model-Q4_1.gguf"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    result = verify_bundle(folder, profile=str(roomy_profile(tmp_path)))
    failed = {c.name: c for c in result.checks if not c.passed}
    assert set(failed) == {"sha256 model/model-Q4_1.gguf", "load"}
    assert "not run" in failed["load"].detail
    cli = run_bedside("verify", str(folder))
    assert cli.returncode == 1 and "FAIL sha256 model/model-Q4_1.gguf" in cli.stdout


def test_truncated_and_extra_files_fail_with_file_named(bundle, tmp_path):
    folder = copy_of(bundle, tmp_path)
    tokenizer = folder / "tokenizer" / "tokenizer.json"
    size = tokenizer.stat().st_size
    with open(tokenizer, "r+b") as stream:
        stream.truncate(size // 2)
    (folder / "model" / "extra.bin").write_bytes(b"x")
    checks = {c.name: c for c in hash_checks(folder, read_manifest(folder))}
    truncated = checks["sha256 tokenizer/tokenizer.json"]
    assert not truncated.passed and "truncated" in truncated.detail and str(size) in truncated.detail
    assert not checks["unlisted files"].passed and "model/extra.bin" in checks["unlisted files"].detail
    assert sum(not c.passed for c in checks.values()) == 2


def test_missing_file_fails(bundle, tmp_path):
    folder = copy_of(bundle, tmp_path)
    (folder / "README.md").unlink()
    checks = {c.name: c for c in hash_checks(folder, read_manifest(folder))}
    assert not checks["sha256 README.md"].passed and "missing" in checks["sha256 README.md"].detail


def test_bad_input_exit_2(bundle, tmp_path):
    missing = run_bedside("verify", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    not_bundle = run_bedside("verify", str(empty))
    assert not_bundle.returncode == 2 and "manifest.json is missing" in not_bundle.stderr
    archive = bundle / "bundle-tiny-cpu.tar.gz"
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    truncated = run_bedside("verify", str(cut))
    assert (
        truncated.returncode == 2 and "cut.tar.gz" in truncated.stderr and "Traceback" not in truncated.stderr
    )
    profile = run_bedside("verify", str(bundle / "bundle-tiny-cpu"), "--profile", "no-such-device")
    assert profile.returncode == 2 and "no-such-device" in profile.stderr


def test_archive_holds_one_folder(bundle):
    with tarfile.open(bundle / "bundle-tiny-cpu.tar.gz") as tar:
        roots = {name.split("/")[0] for name in tar.getnames()}
    assert roots == {"bundle-tiny-cpu"}


@pytest.mark.heavy
def test_verify_on_a_gpu_memory_profile_fails_a_cpu_run(bundle, tmp_path):
    """rtx3050-4gb budgets VRAM: a CPU run's RSS (this host has no GPU) is no verification of it. The profile's
    context is cut to the tiny profile's 256 tokens: the check is the same, the measurement 16x shorter."""
    import yaml

    from toolkit.core.paths import PROFILES_DIR

    profile = yaml.safe_load((PROFILES_DIR / "rtx3050-4gb.yaml").read_text())
    profile["context_length"] = yaml.safe_load(TINY_PROFILE.read_text())["context_length"]
    gpu_profile = tmp_path / "rtx3050-4gb-short.yaml"
    gpu_profile.write_text(yaml.safe_dump(profile))
    result = run_bedside(
        "verify",
        str(bundle / "bundle-tiny-cpu.tar.gz"),
        "--profile",
        str(gpu_profile),
        "--threads",
        "1",
        "--json",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    checks = {check["name"]: check for check in json.loads(result.stdout)["checks"]}
    memory = checks["peak memory"]
    assert not memory["passed"] and memory["value"] < memory["threshold"]  # fits, but in the wrong memory
    assert "RSS measured where VRAM was budgeted" in memory["detail"]
    assert checks["load"]["passed"] and checks["smoke prompt"]["passed"]


def test_verify_loads_and_measures_with_runtime_json_kv_settings(tmp_path, monkeypatch):
    """The KV precision and placement of runtime.json reach the runner that loads and the child that measures."""
    from types import SimpleNamespace

    from toolkit.deploy import verify

    seen: dict[str, object] = {}

    class Runner:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def generate(self, messages, max_new_tokens, image=None):
            return SimpleNamespace(text="ok", token_ids=[1])

    def load_runner(path, runtime, n_ctx, n_threads, options=None):
        seen["load"] = options
        return Runner()

    def measure_in_child(runtime, path, job):
        seen["measure"] = job.runner_options
        return SimpleNamespace(
            peak_rss_bytes=100, peak_vram_bytes=None, device="cpu", decode_tokens_per_s=10.0
        )

    monkeypatch.setattr(verify, "load_runner", load_runner)
    monkeypatch.setattr(verify, "measure_in_child", measure_in_child)
    runtime = {
        "runtime": "llama.cpp",
        "model": "model/m.gguf",
        "kv_cache_dtype": "q8_0",
        "flash_attn": True,
        "kv_offload": True,
        "gpu_layers": 0,
    }
    checks = verify.runtime_checks(tmp_path, runtime, load_profile(str(TINY_PROFILE)), 1)
    assert seen["load"] == seen["measure"] == {"kv_cache_dtype": "q8_0", "flash_attn": True}
    memory = next(c for c in checks if c.name == "peak memory")
    assert "KV cache (q8_0)" in memory.detail
