"""Bundle security: archive members checked before extraction, symlinks refused, manifest paths kept inside
the bundle, runtime settings from the hashed runtime.json only, and Ed25519-signed manifests.

Crafted archives need no model; the bundles are built with `make_bundle` from the demo model's GGUF (as in
test_verify.py). `load_runner` is replaced where a test proves the model is not loaded, or which file is.
The launch files (README, Ollama Modelfile, model card) follow the bundle's runtime: GGUF or ONNX.
"""

import io
import json
import shutil
import stat
import tarfile
from pathlib import Path

import pytest
import yaml
from cli_runner import bedside as run_bedside

from toolkit.core.errors import BedsideError
from toolkit.deploy import verify as verify_module
from toolkit.deploy.bundle import make_bundle
from toolkit.deploy.launch import MODEL_CARD, MODELFILE, chat_info, modelfile, parse_modelfile
from toolkit.deploy.outcome import Attempt, DeployOutcome, ModelSummary
from toolkit.deploy.signing import (
    SIGNATURE,
    load_private_key,
    load_public_key,
    sign_manifest,
    write_keypair,
)
from toolkit.deploy.verify import hash_checks, opened_bundle, read_manifest, verify_bundle
from toolkit.model.facts import facts_from_config
from toolkit.plan.planner import make_plan
from toolkit.target.profiles import load_profile
from toolkit.validate.checks import Check

FIXTURES = Path(__file__).parent / "fixtures"
TINY_PROFILE = FIXTURES / "profiles" / "tiny-cpu.yaml"
REPO = Path(__file__).resolve().parents[1]
NAME = "bundle-tiny-cpu"



def build_bundle(
    out: Path, model_dir: Path, gguf: Path, *, folder_model: bool = False, sign_key=None
) -> Path:
    """make_bundle of the demo GGUF for the tiny profile (or of a folder model on onnxruntime, as ONNX exports
    are) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(str(TINY_PROFILE))
    facts = facts_from_config(json.loads((FIXTURES / "smollm2-135m" / "config.json").read_text()))
    plan = make_plan(facts, profile, "demo")
    if folder_model:
        onnx = plan.chosen.model_copy(
            update={"format": "onnx", "quant": "int4_b32", "runtime": "onnxruntime"}
        )
        plan = plan.model_copy(update={"chosen": onnx})
    export_dir = out / "export"
    export_dir.mkdir()
    if folder_model:
        (export_dir / "model.onnx").write_bytes(b"onnx graph")
        (export_dir / "model.onnx_data").write_bytes(b"\0" * 4096)
        artifact = export_dir
    else:
        shutil.copy(gguf, export_dir / "model-Q4_1.gguf")
        artifact = export_dir / "model-Q4_1.gguf"
    export_format = "onnx" if folder_model else "gguf"
    (export_dir / "export.json").write_text(json.dumps({"format": export_format, "file": artifact.name}))
    (out / "report.json").write_text("{}")
    (out / "report.html").write_text("<html></html>")
    final = Attempt(
        attempt=1,
        plan=plan,
        compression={"layers_removed": []},
        checkpoint=model_dir,
        export_dir=export_dir,
        artifact=artifact,
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
    make_bundle(out, NAME, outcome, out / "report.json", out / "report.html", sign_key=sign_key)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    trusted, trusted_pub, _ = write_keypair(folder / "trusted")
    other, other_pub, _ = write_keypair(folder / "other")
    return {"private": trusted, "public": trusted_pub, "other": other, "other_pub": other_pub}


@pytest.fixture(scope="module")
def signed(tmp_path_factory, demo_model_dir, demo_gguf_path, keys) -> Path:
    out = tmp_path_factory.mktemp("signed")
    return build_bundle(out, demo_model_dir, demo_gguf_path, sign_key=load_private_key(keys["private"]))


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if verify loads or measures any model."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the model was loaded: {args}")

    monkeypatch.setattr(verify_module, "load_runner", refuse)
    monkeypatch.setattr(verify_module, "measure_in_child", refuse)


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """Record the model paths verify loads, without loading anything (the runtime checks then pass)."""
    loaded: list[Path] = []

    def fake_runtime_checks(folder, runtime, device_profile, n_threads):
        loaded.append(folder / runtime["model"])
        return [Check("load", True, None, None, "", detail="recorded")]

    monkeypatch.setattr(verify_module, "runtime_checks", fake_runtime_checks)
    return loaded


def copy_of(bundle_out: Path, tmp_path: Path) -> Path:
    target = tmp_path / NAME
    shutil.copytree(bundle_out / NAME, target)
    return target


def rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def failed(result) -> dict[str, Check]:
    return {check.name: check for check in result.checks if not check.passed}


# ---------------------------------------------------------------- archives


def _archive(path: Path, members: list[tuple], manifest: dict | None = None) -> Path:
    """A .tar.gz of (name, type, data-or-linkname) members; a manifest.json of `manifest` first when given."""
    with tarfile.open(path, "w:gz") as tar:

        def add(name, kind=tarfile.REGTYPE, payload=b""):
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload if isinstance(payload, str) else ""
                tar.addfile(info)

        add("bundle-x", tarfile.DIRTYPE)
        if manifest is not None:
            add("bundle-x/manifest.json", payload=json.dumps(manifest).encode())
        for member in members:
            add(*member)
    return path


def test_well_formed_archive_unpacks(tmp_path):
    archive = _archive(
        tmp_path / "ok.tar.gz",
        [("bundle-x/model", tarfile.DIRTYPE), ("bundle-x/model/m.gguf", tarfile.REGTYPE, b"weights")],
        manifest={"sizes": {"model/m.gguf": 7}},
    )
    with opened_bundle(archive) as folder:
        assert folder.name == "bundle-x"
        assert (folder / "model" / "m.gguf").read_bytes() == b"weights"
        assert stat.S_IMODE((folder / "model" / "m.gguf").stat().st_mode) == 0o644


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (("bundle-x/model.gguf", tarfile.SYMTYPE, "README.md"), "symlink"),
        (("bundle-x/model.gguf", tarfile.SYMTYPE, "/etc/hostname"), "symlink"),
        (("bundle-x/model.gguf", tarfile.LNKTYPE, "bundle-x/README.md"), "hard link"),
        (("bundle-x/fifo", tarfile.FIFOTYPE, b""), "fifo"),
        (("bundle-x/dev", tarfile.CHRTYPE, b""), "device"),
        (("bundle-x/../x", tarfile.REGTYPE, b"x"), "name"),
        (("/abs", tarfile.REGTYPE, b"x"), "name"),
        (("bundle-x/./a", tarfile.REGTYPE, b"x"), "name"),
        (("evil.txt", tarfile.REGTYPE, b"x"), "top folder"),
        (("other/x", tarfile.REGTYPE, b"x"), "top folder"),
        (("bundle-x/README.md/x", tarfile.REGTYPE, b"x"), "inside a file"),
        (("bundle-x/README.md", tarfile.REGTYPE, b"again"), "twice"),
    ],
)
def test_unsafe_archive_member_is_refused_naming_why(tmp_path, member, why):
    archive = _archive(tmp_path / "bad.tar.gz", [("bundle-x/README.md", tarfile.REGTYPE, b"readme"), member])
    with pytest.raises(BedsideError) as error, opened_bundle(archive):
        pass
    message = str(error.value)
    assert "refused" in message and why in message and "truncated or damaged" not in message


def test_nested_directory_symlink_trick_writes_nothing_outside(tmp_path):
    """CVE-2025-4517: symlinks whose real path passes PATH_MAX fool filter="data" of Python < 3.11.13."""
    outside = tmp_path / "outside"
    outside.mkdir()
    long_name = "d" * 247
    steps = "abcdefghijklmnop"
    members: list[tuple] = []
    path = "bundle-x"
    for step in steps:
        members.append((f"{path}/{long_name}", tarfile.DIRTYPE))
        members.append((f"{path}/{step}", tarfile.SYMTYPE, long_name))
        path = f"{path}/{long_name}"
    link = "/".join(steps) + "/" + "l" * 254
    members.append((f"bundle-x/{link}", tarfile.SYMTYPE, "../" * len(steps)))
    members.append(("bundle-x/escape", tarfile.SYMTYPE, link + "/.." * 17 + str(outside)))
    members.append(("bundle-x/escape/pwned.txt", tarfile.REGTYPE, b"written outside"))
    archive = _archive(tmp_path / "cve.tar.gz", members)
    with pytest.raises(BedsideError, match="symlink"), opened_bundle(archive):
        pass
    assert list(outside.iterdir()) == []


def test_archive_larger_than_its_manifest_is_refused(tmp_path):
    archive = _archive(
        tmp_path / "big.tar.gz",
        [("bundle-x/model.gguf", tarfile.REGTYPE, b"\0" * (3 << 20))],
        manifest={"files": {"model.gguf": "0" * 64}, "sizes": {"model.gguf": 1024}},
    )
    with pytest.raises(BedsideError, match="more than its manifest lists"), opened_bundle(archive):
        pass


def test_archive_beyond_the_absolute_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(verify_module, "MAX_ARCHIVE_BYTES", 1 << 20)
    archive = _archive(
        tmp_path / "huge.tar.gz", [("bundle-x/model.gguf", tarfile.REGTYPE, b"\0" * (2 << 20))]
    )
    with pytest.raises(BedsideError, match="more than the cap"), opened_bundle(archive):
        pass


# ---------------------------------------------------------------- symlinks in a bundle folder


@pytest.fixture(scope="module")
def unsigned(tmp_path_factory, demo_model_dir, demo_gguf_path) -> Path:
    return build_bundle(tmp_path_factory.mktemp("unsigned"), demo_model_dir, demo_gguf_path)


def test_symlinked_model_file_fails_and_is_not_loaded(unsigned, tmp_path, no_load):
    folder = copy_of(unsigned, tmp_path)
    model = folder / "model" / "model-Q4_1.gguf"
    outside = tmp_path / "outside.gguf"
    shutil.copy(model, outside)  # same bytes: the hash alone would pass
    model.unlink()
    model.symlink_to(outside)
    result = verify_bundle(folder)
    bad = failed(result)
    assert "symlink" in bad["sha256 model/model-Q4_1.gguf"].detail
    assert "model/model-Q4_1.gguf" in bad["symlinks and special files"].detail
    assert "not run" in bad["load"].detail


def test_symlinked_tokenizer_folder_fails(unsigned, tmp_path, no_load):
    folder = copy_of(unsigned, tmp_path)
    outside = tmp_path / "tokenizer-outside"
    shutil.move(folder / "tokenizer", outside)
    (folder / "tokenizer").symlink_to(outside, target_is_directory=True)
    bad = failed(verify_bundle(folder))
    assert "tokenizer" in bad["symlinks and special files"].detail
    assert "sha256 tokenizer/tokenizer.json" in bad and "load" in bad


# ---------------------------------------------------------------- manifest paths


@pytest.mark.parametrize("listed", ["../../outside.txt", "/etc/hostname", "model/../../outside.txt"])
def test_manifest_path_outside_the_bundle_fails_unread(unsigned, tmp_path, no_load, listed):
    folder = copy_of(unsigned, tmp_path)
    target = Path(listed) if listed.startswith("/") else (folder / listed)
    if not listed.startswith("/"):
        target.write_text("outside")
    from toolkit.core.hashing import file_sha256

    digest = file_sha256(target)
    rewrite_manifest(folder, lambda m: m["files"].__setitem__(listed, digest))
    bad = failed(verify_bundle(folder))
    assert "outside the bundle" in bad[f"sha256 {listed}"].detail
    assert "not run" in bad["load"].detail


def _point_runtime_model(folder: Path, model: str, in_manifest_only: bool = False) -> None:
    from toolkit.core.hashing import file_sha256

    runtime_path = folder / "runtime.json"
    if not in_manifest_only:
        runtime = json.loads(runtime_path.read_text())
        runtime["model"] = model
        runtime_path.write_text(json.dumps(runtime, indent=2))

    def change(manifest):
        manifest["runtime"]["model"] = model
        manifest["files"]["runtime.json"] = file_sha256(runtime_path)
        manifest["sizes"]["runtime.json"] = runtime_path.stat().st_size

    rewrite_manifest(folder, change)


@pytest.mark.parametrize("model", ["../outside.gguf", "/tmp/outside.gguf", "model/unlisted.gguf"])
def test_runtime_model_outside_or_unlisted_is_not_loaded(unsigned, tmp_path, no_load, model):
    folder = copy_of(unsigned, tmp_path)
    if model == "model/unlisted.gguf":
        shutil.copy(folder / "model" / "model-Q4_1.gguf", folder / model)
    else:
        shutil.copy(folder / "model" / "model-Q4_1.gguf", tmp_path / "outside.gguf")
    _point_runtime_model(folder, model)
    load = failed(verify_bundle(folder))["load"]
    assert "not run" in load.detail and model in load.detail


def test_runtime_settings_come_from_the_hashed_runtime_json(unsigned, tmp_path, loads):
    folder = copy_of(unsigned, tmp_path)
    shutil.copy(folder / "model" / "model-Q4_1.gguf", tmp_path / "outside.gguf")
    _point_runtime_model(folder, "../outside.gguf", in_manifest_only=True)  # the manifest's copy only
    result = verify_bundle(folder)
    assert result.passed, failed(result)
    assert loads == [folder / "model/model-Q4_1.gguf"]


def test_tampered_runtime_json_is_not_used(unsigned, tmp_path, no_load):
    folder = copy_of(unsigned, tmp_path)
    runtime = json.loads((folder / "runtime.json").read_text())
    runtime["model"] = "../outside.gguf"
    (folder / "runtime.json").write_text(json.dumps(runtime))
    bad = failed(verify_bundle(folder))
    assert set(bad) == {"sha256 runtime.json", "load"} and "not run" in bad["load"].detail


def test_runtime_json_must_be_listed(unsigned, tmp_path):
    folder = copy_of(unsigned, tmp_path)
    rewrite_manifest(folder, lambda m: m["files"].pop("runtime.json"))
    with pytest.raises(BedsideError, match="runtime.json"):
        verify_bundle(folder)


def test_folder_model_is_listed_file_by_file_and_an_unlisted_file_in_it_blocks_load(
    tmp_path, demo_model_dir, demo_gguf_path, monkeypatch
):
    out = build_bundle(tmp_path / "onnx", demo_model_dir, demo_gguf_path, folder_model=True)
    folder = out / NAME
    manifest = read_manifest(folder)
    runtime = json.loads((folder / "runtime.json").read_text())
    assert runtime["model"] == "model"
    assert {"model/model.onnx", "model/model.onnx_data", "model/export.json"} <= set(manifest["files"])
    assert all(check.passed for check in hash_checks(folder, manifest))
    loaded: list[Path] = []
    monkeypatch.setattr(
        verify_module, "runtime_checks", lambda f, r, p, t: loaded.append(f / r["model"]) or []
    )
    assert verify_bundle(folder).passed and loaded == [folder / "model"]
    (folder / "model" / "extra.onnx_data").write_bytes(b"unhashed weights")
    bad = failed(verify_bundle(folder))
    assert "model/extra.onnx_data" in bad["unlisted files"].detail and "not run" in bad["load"].detail
    assert len(loaded) == 1


# ---------------------------------------------------------------- signed bundles


def test_keygen_writes_a_private_0600_and_a_public_key_and_never_overwrites(tmp_path):
    key = tmp_path / "keys" / "bedside"
    result = run_bedside("keygen", "--out", str(key))
    assert result.returncode == 0, result.stdout + result.stderr
    public = tmp_path / "keys" / "bedside.pub"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    load_private_key(key), load_public_key(public)
    before = key.read_bytes()
    again = run_bedside("keygen", "--out", str(key))
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    assert key.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "keys").iterdir()) == ["bedside", "bedside.pub"]


def test_signed_bundle_holds_the_signature_in_folder_and_archive(signed):
    folder = signed / NAME
    assert (folder / SIGNATURE).is_file()
    with tarfile.open(signed / f"{NAME}.tar.gz") as tar:
        assert f"{NAME}/{SIGNATURE}" in tar.getnames()
    assert all(check.passed for check in hash_checks(folder, read_manifest(folder)))  # not "unlisted"


def test_signature_check_names_why(signed, unsigned, keys, tmp_path, no_load, loads):
    folder = copy_of(signed, tmp_path / "a")
    right = verify_bundle(folder, trusted_key=keys["public"])
    assert right.passed and [c.name for c in right.checks][0] == "signature"
    other = failed(verify_bundle(folder, trusted_key=keys["other_pub"]))
    assert "another key" in other["signature"].detail and "not run" in other["load"].detail
    none = failed(verify_bundle(copy_of(unsigned, tmp_path / "b"), trusted_key=keys["public"]))
    assert "unsigned" in none["signature"].detail
    rewrite_manifest(folder, lambda m: m.__setitem__("model", "attacker"))
    changed = failed(verify_bundle(folder, trusted_key=keys["public"]))
    assert set(changed) == {"signature", "load"} and "changed after signing" in changed["signature"].detail
    # re-signed by the attacker's key: another key
    sign_manifest(folder, load_private_key(keys["other"]))
    assert "another key" in failed(verify_bundle(folder, trusted_key=keys["public"]))["signature"].detail


def test_verify_cli_trusted_key_exit_codes(signed, keys, tmp_path):
    folder = copy_of(signed, tmp_path)
    rewrite_manifest(folder, lambda m: m["files"].__setitem__("model/model-Q4_1.gguf", "0" * 64))
    tampered = run_bedside("verify", str(folder), "--trusted-key", str(keys["public"]))
    assert tampered.returncode == 1 and "FAIL signature" in tampered.stdout
    assert "changed after signing" in tampered.stdout
    roomy = tmp_path / "roomy.yaml"
    text = TINY_PROFILE.read_text()
    start = text.index("capacity_gib:\n      value: ") + len("capacity_gib:\n      value: ")
    roomy.write_text(
        (text[:start] + "1.0" + text[text.index("\n", start) :]).replace("name: tiny-cpu", "name: roomy")
    )
    right = run_bedside(
        "verify", str(signed / f"{NAME}.tar.gz"), "--trusted-key", str(keys["public"]),
        "--profile", str(roomy), "--threads", "1",
    )  # fmt: skip
    assert right.returncode == 0, right.stdout + right.stderr
    assert "PASS signature" in right.stdout and "FAIL" not in right.stdout


def test_bad_key_files_are_one_line_errors(tmp_path, keys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    junk = tmp_path / "junk.pem"
    junk.write_text("not a key\n")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_private = tmp_path / "rsa.pem"
    rsa_private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    rsa_public = tmp_path / "rsa.pub"
    rsa_public.write_bytes(
        rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for path, message in [
        (junk, "not a PEM"),
        (rsa_private, "not an Ed25519"),
        (keys["public"], "is a public key"),
        (tmp_path / "missing", "not found"),
    ]:
        with pytest.raises(BedsideError, match=message):
            load_private_key(path)
    for path, message in [
        (junk, "not a PEM"),
        (rsa_public, "not an Ed25519"),
        (keys["private"], "is a private key"),
    ]:
        with pytest.raises(BedsideError, match=message):
            load_public_key(path)
    cli = run_bedside("verify", str(tmp_path), "--trusted-key", str(rsa_public))
    assert (
        cli.returncode == 2 and "not an Ed25519" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
    )


def test_deploy_refuses_a_bad_sign_key_before_any_work(tmp_path, keys):
    from toolkit.deploy.pipeline import DeployOptions, run_deploy

    out = tmp_path / "deploy"
    with pytest.raises(BedsideError, match="is a public key"):
        run_deploy(DeployOptions(profile=str(TINY_PROFILE), out=out, sign_key=keys["public"]))
    cli = run_bedside(
        "deploy", "--profile", str(TINY_PROFILE), "--out", str(out), "--sign-key", str(tmp_path / "none")
    )
    assert cli.returncode == 2 and "signing key" in cli.stderr and "not found" in cli.stderr
    assert not out.exists()


# ---------------------------------------------------------------- launch files in the runtime's terms


def front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text[4 : text.index("\n---\n", 4)])


def test_gguf_bundle_speaks_llama_cpp_and_ollama(unsigned, tmp_path, loads):
    folder = copy_of(unsigned, tmp_path)
    runtime = json.loads((folder / "runtime.json").read_text())
    assert (
        runtime["runtime"] == "llama.cpp"
        and runtime["stop"] == ["<|im_end|>"]
        and runtime["temperature"] == 0
    )
    readme = (folder / "README.md").read_text()
    assert f"llama-server -m {runtime['model']} -c {runtime['context']}" in readme
    assert f"ollama create {NAME} -f {MODELFILE}" in readme
    assert "onnx" not in readme.lower()
    text = (folder / MODELFILE).read_text()
    assert f"FROM ./{runtime['model']}\n" in text
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}' in text  # ChatML in Go-template form
    parameters = parse_modelfile(text)
    assert [int(value) for value in parameters["num_ctx"]] == [runtime["context"]]
    assert parameters["stop"] == runtime["stop"]
    assert [float(value) for value in parameters["temperature"]] == [runtime["temperature"]]
    card = (folder / MODEL_CARD).read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0"  # the demo recipe's license
    assert meta["base_model"] == "SmolLM2-135M-Instruct" and meta["quantized_by"] == "Bedside"
    assert {"medical", "quantized", "gguf"} <= set(meta["tags"]) and "onnx" not in meta["tags"]
    assert "Peak memory: 170.0 MiB measured against a budget of" in card
    assert "Perplexity increase" in card and "KL divergence" in card
    manifest = read_manifest(folder)
    assert {MODELFILE, MODEL_CARD} <= set(manifest["files"])
    assert verify_bundle(folder).passed and loads == [folder / runtime["model"]]


def test_onnx_bundle_speaks_onnx_runtime(tmp_path, demo_model_dir, demo_gguf_path, loads):
    out = build_bundle(tmp_path / "onnx", demo_model_dir, demo_gguf_path, folder_model=True)
    folder = out / NAME
    runtime = json.loads((folder / "runtime.json").read_text())
    assert runtime["runtime"] == "onnxruntime" and runtime["stop"] == ["<|im_end|>"]
    readme = (folder / "README.md").read_text()
    assert "import onnxruntime as ort" in readme and 'ort.InferenceSession("model/model.onnx"' in readme
    assert "<|im_start|>user" in readme  # the prompt follows the model's chat template
    assert "llama" not in readme.lower() and "ollama" not in readme.lower() and MODELFILE not in readme
    assert not (folder / MODELFILE).exists()
    meta = front_matter((folder / MODEL_CARD).read_text())
    assert {"license", "base_model", "tags", "quantized_by"} <= set(meta)
    assert {"medical", "quantized", "onnx"} <= set(meta["tags"]) and "gguf" not in meta["tags"]
    manifest = read_manifest(folder)
    assert MODEL_CARD in manifest["files"] and MODELFILE not in manifest["files"]
    assert verify_bundle(folder).passed and loads == [folder / "model"]


@pytest.mark.parametrize(
    ("template", "translated", "stop"),
    [
        (
            "{{ '<|start_header_id|>' + m['role'] }}",
            "<|start_header_id|>{{ .Role }}<|end_header_id|>",
            "<|eot_id|>",
        ),
        ("{{ '<start_of_turn>' + role }}", "<start_of_turn>{{ if eq .Role", "<end_of_turn>"),
        ("{{ '[INST] ' + message['content'] + ' [/INST]' }}", None, None),
    ],
)
def test_modelfile_template_translates_known_families_and_says_so_otherwise(
    tmp_path, template, translated, stop
):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "</s>"})
    )
    chat = chat_info(tmp_path)
    runtime = {
        "model": "model/m.gguf",
        "context": 512,
        "stop": chat.stop,
        "temperature": 0.0,
        "threads": None,
    }
    text = modelfile(runtime, chat, "b")
    if translated is None:
        assert "\nTEMPLATE " not in text and "write a TEMPLATE line here by hand" in text
        assert chat.stop == ["</s>"]
    else:
        assert translated in text and chat.stop == [stop, "</s>"]
    assert parse_modelfile(text)["stop"] == chat.stop
