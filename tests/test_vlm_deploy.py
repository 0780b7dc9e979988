"""A LLaVA that is not the demo (the tiny random one) through plan, compress, export to GGUF and ONNX, eval and deploy.

One deploy (GGUF, forced to remove a layer and to 4 bits) is shared by the module; the ONNX export reuses its
compressed checkpoint. The bundle must carry the mmproj and a smoke image, and `verify` must ask about it.
"""

from __future__ import annotations

import json

import pytest

from tests.cli_runner import bedside as run_bedside

pytestmark = pytest.mark.heavy
PROFILE = "tests/fixtures/profiles/tiny-cpu.yaml"


@pytest.fixture(scope="module")
def deployed(tiny_llava, image_qa_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm-deploy") / "out"
    result = run_bedside(
        "deploy", "--profile", PROFILE, "--model", str(tiny_llava), "--calib", str(image_qa_file),
        "--prune-layers", "1", "--quant", "Q4_0", "--calib-sequences", "6", "--seq-len", "96",
        "--heal-steps", "2", "--eval-tokens", "256", "--threads", "1", "--out", str(out), "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def test_deploy_reports_image_accuracy_before_and_after(deployed):
    _, report = deployed
    assert report["passed"]
    accuracy = report["quality"]["accuracy"]
    assert accuracy["closed"]["n"] >= 1 and "reference" in accuracy["closed"]
    assert report["quality"]["kl_divergence"] is not None  # over the answers' positions
    checks = {c["name"]: c for c in report["checks"]}
    reference = report["quality"]["reference_accuracy"]["closed"]["value"]  # the uncompressed model alone
    assert reference == pytest.approx(accuracy["closed"]["reference"])
    expected = 100 * accuracy["closed"]["value"] / reference if reference else 100.0
    assert checks["accuracy_retention_pct"]["value"] == pytest.approx(expected)
    attempt = report["attempts"][-1]
    assert attempt["candidate"]["layers_removed"] == 1 and attempt["candidate"]["quant"] == "Q4_0"
    html = (deployed[0] / "report.html").read_text()
    assert "Accuracy before and after compression" in html and "closed image questions" in html


def test_bundle_carries_the_mmproj_and_verify_asks_about_an_image(deployed):
    out, _ = deployed
    bundle = out / "bundle-tiny-cpu"
    runtime = json.loads((bundle / "runtime.json").read_text())
    assert runtime["mmproj"].startswith("model/mmproj-") and (bundle / runtime["mmproj"]).is_file()
    assert (bundle / runtime["smoke_image"]).is_file()
    assert "--mmproj" in (bundle / "README.md").read_text()
    verified = run_bedside("verify", str(out / "bundle-tiny-cpu.tar.gz"), "--threads", "1")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "about smoke/phantom.png" in verified.stdout + verified.stderr


def test_the_compressed_llava_exports_to_onnx_and_evaluates(deployed, image_qa_file, tmp_path):
    out, _ = deployed
    checkpoint = out / "work" / "compress" / "checkpoint"
    export = run_bedside(
        "export", "--model", str(checkpoint), "--format", "onnx", "--quant", "int4", "--out", str(tmp_path / "onnx")
    )
    assert export.returncode == 0, export.stderr
    result = run_bedside(
        "eval", "--artifact", str(tmp_path / "onnx"), "--data", str(image_qa_file), "--context", "128",
        "--max-items", "4", "--json",
    )
    assert result.returncode == 0, result.stderr
    accuracy = json.loads(result.stdout)["accuracy"]
    assert accuracy["closed"]["n"] == 2 and accuracy["open"]["n"] == 2
