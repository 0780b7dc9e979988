"""The deployment bundle: a folder and a .tar.gz with the model, tokenizer, runtime config, report, README
and manifest.json.

Why: hospital IT receives one archive, checks it with `bedside verify`, and runs it; nothing in it
may hold patient text, so the manifest records the calibration/eval data by sha256 and counts only.

Layout of `bundle-<profile>/`:
    model/            the exported model file(s) and export.json
    tokenizer/        tokenizer files and chat template of the compressed checkpoint
    runtime.json      runtime, model path, context, threads, GPU layers, batch size, KV cache type, flash
                      attention, KV cache offload, stop tokens and temperature (the plan's KV precision
                      and placement: what validation ran and `bedside verify` loads)
    report.json, report.html
    README.md         for hospital IT, in the runtime's terms (llama-server and Ollama, or ONNX Runtime)
    Modelfile         GGUF only: Ollama's Modelfile with runtime.json's settings (toolkit.deploy.launch)
    MODEL_CARD.md     YAML front matter (license, base_model, tags, quantized_by) and validation figures
    manifest.json     files {relative path: sha256}, profile, plan, versions, source_model_sha256,
                      calibration/eval hashes and counts, measured peak memory
    manifest.json.sig with `--sign-key`: Ed25519 signature of manifest.json's bytes (toolkit.deploy.signing)

Atomicity: the folder and the archive are built under temporary names and renamed in at the end,
so an interrupted deploy leaves no half bundle.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shutil
import tarfile
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import Field
from rich.console import Console

from exporters.base import TOKENIZER_FILES
from toolkit import __version__
from toolkit.core.atomic import building_folder, write_json_atomic
from toolkit.core.errors import BedsideError
from toolkit.core.hashing import file_sha256
from toolkit.core.records import SCHEMA_VERSION
from toolkit.deploy.launch import (
    MODEL_CARD,
    MODELFILE,
    TEMPERATURE,
    ChatInfo,
    chat_info,
    llama_cpp_section,
    model_card,
    modelfile,
    onnx_section,
    source_facts,
)
from toolkit.deploy.outcome import DeployOutcome
from toolkit.deploy.signing import SIGNATURE, key_fingerprint, sign_manifest
from toolkit.model.llava import is_vision_language
from toolkit.plan.memory import deployment_of, flash_attention, kv_cache_dtype_of
from toolkit.plan.schema import Candidate
from toolkit.target.profiles import DeviceProfile
from toolkit.validate.checks import Number, Record
from toolkit.validate.target_speed import describe

MANIFEST = "manifest.json"
RUNTIME_CONFIG = "runtime.json"
README = "README.md"
VERSIONED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "llama_cpp_python",
    "gguf",
    "onnxruntime",
    "onnxruntime-gpu",
    "optimum",
    "numpy",
)
SMOKE_PROMPT = "Summarise in one sentence: Heart size is normal. The lungs are clear. No pleural effusion."
SMOKE_IMAGE_PROMPT = "What organ is shown in this image?"
SMOKE_IMAGE = "smoke/phantom.png"  # synthetic, never patient data: see write_smoke_image


def library_versions() -> dict[str, str]:
    """Versions of bedside, Python and the libraries that produced the bundle (installed ones only)."""
    versions = {"bedside": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


class RuntimeConfig(Record):
    """runtime.json: how to run the model on the target (from the profile and the chosen candidate)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    runtime: str
    format: str
    quant: str
    model: str  # path of the model file (GGUF) or folder (ONNX) inside the bundle
    context: int
    threads: int | None  # None on a GPU
    gpu_layers: (
        int  # -1: every layer on the GPU, 0: CPU; N: llama.cpp's -ngl N (head and N - 1 layers on the GPU)
    )
    mmap: bool | None  # llama.cpp only: False = read the file (weights the CPU repacks)
    batch_size: int
    kv_cache_dtype: str  # llama.cpp -ctk/-ctv (f16, q8_0, q4_0); ONNX: the graph's float type, for the record
    flash_attn: bool | None = (
        None  # llama.cpp only: on for a quantized KV cache (quantized V needs it) and on CUDA
    )
    kv_offload: bool | None = None  # llama.cpp only: False = the KV cache in host memory (--no-kv-offload)
    smoke_prompt: str = SMOKE_PROMPT
    smoke_image: str | None = None  # vision-language bundles: the image `verify` asks the smoke question about
    mmproj: str | None = None  # GGUF vision-language bundles: the vision tower + projector file beside the model
    stop: list[str] = Field(default_factory=list)  # end-of-turn strings of the chat template and tokenizer
    temperature: float = TEMPERATURE  # 0: greedy, as validated


def runtime_config(outcome: DeployOutcome, model_path: str, stop: list[str] | None = None) -> RuntimeConfig:
    """runtime.json of the deployed candidate on the outcome's profile (`stop`: `launch.ChatInfo.stop`)."""
    profile = outcome.profile
    candidate = outcome.candidate
    on_gpu = profile.compute.accelerator == "cuda"
    llama = candidate.runtime == "llama.cpp"
    deployment = deployment_of(candidate)
    # llama.cpp: read rather than map a file whose weights the CPU repacks (memory.RuntimeSettings.mmap)
    mmap = bool(candidate.memory.detail.get("param.mmap", 1)) if llama else None
    all_layers = -1 if candidate.gpu_layers is None else candidate.gpu_layers
    gpu_layers = all_layers if on_gpu else 0
    return RuntimeConfig(
        runtime=candidate.runtime,
        format=candidate.format,
        quant=candidate.quant,
        model=model_path,
        context=profile.context_length,
        threads=int(profile.compute.cores.value) if not on_gpu else None,
        gpu_layers=gpu_layers,
        mmap=mmap,
        batch_size=profile.batch_size,
        kv_cache_dtype=candidate.kv_cache_dtype or kv_cache_dtype_of(deployment, profile),
        flash_attn=flash_attention(deployment, profile) if llama else None,
        kv_offload=(not candidate.kv_on_host) if llama else None,
        stop=list(stop or []),
    )


class ManifestPlan(Record):
    """The plan the bundle's model follows."""

    reason: str
    budget_bytes: int
    context_length: int
    chosen: Candidate | None


class ManifestData(Record):
    """Calibration and evaluation data by hashes and counts (`_data_summary`), never text."""

    calibration: dict[str, Any] | None
    eval: dict[str, Any] | None


class ManifestValidation(Record):
    """What validation measured on the build host."""

    peak_memory_bytes: Number | None
    context: int


class Manifest(Record):
    """manifest.json: every file's sha256 and size, the profile, the plan, versions and data hashes."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["bedside-bundle"] = "bedside-bundle"
    created_utc: str
    model: str
    files: dict[str, str]  # relative path: sha256
    sizes: dict[str, int]  # relative path: bytes
    profile: DeviceProfile
    plan: ManifestPlan
    versions: dict[str, str]
    source_model_sha256: str
    layers_removed: list[int]
    data: ManifestData
    validation: ManifestValidation
    runtime: RuntimeConfig


def write_smoke_image(path: Path, size: int = 128) -> Path:
    """A synthetic grey-scale phantom (two nested ellipses and two dark "lungs"), written as PNG.

    Why synthetic: the bundle travels to other machines and must never carry a patient's image; the
    smoke question checks that the vision part loads and answers, not what it answers.
    """
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    pixels = np.zeros((size, size), np.float32)
    pixels[(x / 0.85) ** 2 + (y / 0.95) ** 2 <= 1] = 0.7
    for centre in (-0.35, 0.35):
        pixels[((x - centre) / 0.25) ** 2 + (y / 0.55) ** 2 <= 1] = 0.15
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels * 255).astype(np.uint8), mode="L").convert("RGB").save(path)
    return path


def _data_summary(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Hashes and counts of a data set; never text."""
    if not record:
        return None
    keys = ("source", "sha256", "blocks_sha256", "documents", "sequences", "seq_len", "tokens")
    return {key: record.get(key) for key in keys if key in record}


def _is_gguf(runtime: RuntimeConfig) -> bool:
    return runtime.format.lower() == "gguf" or runtime.runtime == "llama.cpp"


def _readme(outcome: DeployOutcome, runtime: RuntimeConfig, name: str, chat: ChatInfo) -> str:
    profile = outcome.profile
    candidate = outcome.candidate
    checks = "\n".join(
        f"- {'PASS' if c.passed else 'FAIL'} {c.name}: {c.describe()}{'' if c.blocking else ' (reported only)'}"
        for c in outcome.checks
    )
    settings = runtime.model_dump(mode="json")
    if _is_gguf(runtime):
        run_section = llama_cpp_section(settings, name, _mmap_note(runtime))
        tokenizer_note = "tokenizer and chat template (the GGUF carries its own copy)"
        launch_rows = f"| `{MODELFILE}` | Ollama Modelfile: the model file, chat template and `{RUNTIME_CONFIG}`'s settings |\n"
    else:
        run_section = onnx_section(settings, chat)
        tokenizer_note = "tokenizer and chat template (the ONNX folder holds the tokenizer it loads)"
        launch_rows = ""
    return f"""# {name}: a compressed language model for {profile.name}

Produced by Bedside {__version__} from model `{outcome.model.name}` for the device profile
`{profile.name}` ({profile.description}).

## What is inside

| path | what |
| --- | --- |
| `{runtime.model}` | the model ({candidate.format} {candidate.quant}, {candidate.layers_removed} decoder layers removed) |
| `tokenizer/` | {tokenizer_note} |
| `{RUNTIME_CONFIG}` | runtime settings: context {runtime.context} tokens, threads, GPU layers, KV cache {runtime.kv_cache_dtype}{_placement_note(runtime)}, stop tokens, temperature |
{launch_rows}| `{MODEL_CARD}` | model card: license, base model, tags and the validation figures |
| `report.html`, `report.json` | the validation report: every check with its number and threshold |
| `{MANIFEST}` | sha256 of every file, the profile, the plan, library versions, data hashes |

No patient data is in this bundle: calibration and evaluation data are recorded by sha256 and counts only.

## 1. Check the bundle before installing

```bash
bedside verify {name}.tar.gz --profile {profile.name}
```

It checks every file's sha256 against `{MANIFEST}`, loads the model on the local runtime
({candidate.runtime}), runs a short prompt, and measures peak memory with the KV cache filled to
{runtime.context} tokens against the profile's budget. Exit code 0 = all checks pass, 1 = a check
failed (the output names it), 2 = the bundle or profile could not be read.

## 2. Run it on {candidate.runtime}

{run_section}
Memory: measured peak {_mib(outcome.memory.measured_peak_bytes)} on the validation host,
budget {profile.name}: {outcome.first_plan.budget_bytes / 2**20:.0f} MiB. Keep the context at
{runtime.context} tokens or below; a longer context needs more memory than was validated.

## Checks at build time

{checks}

Speed on the target device: {describe(outcome.final.target_speed)}. Speeds in the checks above were
measured on the build host.

## Intended use

A decision-support aid for clinicians; outputs must be reviewed by a qualified person. It is not a
medical device. Report problems to whoever gave you this bundle, quoting `{MANIFEST}`'s
`source_model_sha256`.
"""


def _source_folders(outcome: DeployOutcome) -> list[Path]:
    """The source model's folder (if it still resolves) and the compressed checkpoint, for license and name."""
    from toolkit.model.source import resolve_model_dir

    folders: list[Path] = []
    with contextlib.suppress(BedsideError):  # a moved or removed source: the checkpoint alone
        folders.append(resolve_model_dir(outcome.model.name))
    return [*folders, outcome.final.checkpoint]


def _model_card(outcome: DeployOutcome, runtime: RuntimeConfig, name: str) -> str:
    license_name, base_model = source_facts(_source_folders(outcome), outcome.model.name)
    return model_card(
        name=name,
        runtime=runtime.model_dump(mode="json"),
        license_name=license_name,
        base_model=base_model,
        profile=outcome.profile.name,
        layers_removed=outcome.candidate.layers_removed,
        checks=outcome.checks,
        budget_bytes=outcome.first_plan.budget_bytes,
        peak_bytes=outcome.memory.measured_peak_bytes,
        version=__version__,
    )


def _placement_note(runtime: RuntimeConfig) -> str:
    parts = []
    if runtime.gpu_layers > 0:
        parts.append(f"{runtime.gpu_layers} GPU layers (-ngl)")
    if runtime.kv_offload is False:
        parts.append("KV cache in host memory")
    return f" ({', '.join(parts)})" if parts else ""


def _mmap_note(runtime: RuntimeConfig) -> str:
    if runtime.mmap is not False:
        return ""
    return (
        "\n`--no-mmap`: llama.cpp's CPU kernels keep a repacked copy of the quantized weights; with the file mapped,\n"
        "its pages would stay resident beside that copy and the weights would count twice against memory.\n"
    )


def _mib(value: Number | None) -> str:
    return f"{value / 2**20:.0f} MiB" if value is not None else "not measured"


def _copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _manifest(outcome: DeployOutcome, folder: Path, runtime: RuntimeConfig) -> Manifest:
    final = outcome.final
    plan = final.plan
    compression = final.compression
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    return Manifest(
        created_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        model=outcome.model.name,
        files={p.relative_to(folder).as_posix(): file_sha256(p) for p in files},
        sizes={p.relative_to(folder).as_posix(): p.stat().st_size for p in files},
        profile=outcome.profile,
        plan=ManifestPlan(
            reason=plan.reason,
            budget_bytes=plan.budget_bytes,
            context_length=plan.context_length,
            chosen=plan.chosen,
        ),
        versions=library_versions(),
        source_model_sha256=outcome.model.source_sha256,
        layers_removed=list(final.layers_removed or []),
        data=ManifestData(
            calibration=_data_summary(compression.get("calibration")),
            eval=_data_summary(compression.get("eval")),
        ),
        validation=ManifestValidation(
            peak_memory_bytes=outcome.memory.measured_peak_bytes, context=runtime.context
        ),
        runtime=runtime,
    )


def make_bundle(
    out: Path,
    name: str,
    outcome: DeployOutcome,
    report_json: Path,
    report_html: Path,
    console: Console | None = None,
    sign_key: Ed25519PrivateKey | None = None,
) -> tuple[Path, Path]:
    """Build out/<name>/ and out/<name>.tar.gz atomically from the outcome's final attempt; returns (folder, archive).

    With `sign_key` the manifest's bytes are signed into manifest.json.sig beside it (toolkit.deploy.signing).
    """
    final = outcome.final
    export_dir = final.export_dir
    artifact = final.artifact
    checkpoint = final.checkpoint
    folder = out / name
    archive = out / f"{name}.tar.gz"
    temporary_archive = out / f".tmp-{name}.tar.gz-{os.getpid()}"  # pid last: remove_stale_temporaries
    with building_folder(folder) as building:
        for path in sorted(export_dir.rglob("*")):
            if path.is_file():
                _copy(path, building / "model" / path.relative_to(export_dir))
        model_path = "model" if artifact.is_dir() else f"model/{artifact.relative_to(export_dir).as_posix()}"
        for file_name in TOKENIZER_FILES:
            if (checkpoint / file_name).is_file():
                _copy(checkpoint / file_name, building / "tokenizer" / file_name)
        chat = chat_info(checkpoint)
        runtime = runtime_config(outcome, model_path, chat.stop)
        if is_vision_language(checkpoint):
            write_smoke_image(building / SMOKE_IMAGE)
            mmproj = (final.export or {}).get("mmproj") or {}
            runtime = runtime.model_copy(
                update={
                    "smoke_image": SMOKE_IMAGE,
                    "smoke_prompt": SMOKE_IMAGE_PROMPT,
                    "mmproj": f"model/{mmproj['file']}" if mmproj.get("file") else None,
                }
            )
        write_json_atomic(building / RUNTIME_CONFIG, runtime.model_dump(mode="json"))
        shutil.copy2(report_json, building / report_json.name)
        shutil.copy2(report_html, building / report_html.name)
        (building / README).write_text(_readme(outcome, runtime, name, chat), encoding="utf-8")
        if _is_gguf(runtime):
            text = modelfile(runtime.model_dump(mode="json"), chat, name)
            (building / MODELFILE).write_text(text, encoding="utf-8")
        (building / MODEL_CARD).write_text(_model_card(outcome, runtime, name), encoding="utf-8")
        for path in building.rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)  # readable by the IT staff who install it
        write_json_atomic(building / MANIFEST, _manifest(outcome, building, runtime).model_dump(mode="json"))
        if sign_key is not None:
            sign_manifest(building, sign_key)
        try:
            with tarfile.open(temporary_archive, "w:gz", compresslevel=6) as tar:
                tar.add(building, arcname=name)
            os.replace(temporary_archive, archive)
        finally:
            temporary_archive.unlink(missing_ok=True)
    if console is not None:
        console.print(f"  bundle: {folder} ({archive.stat().st_size / 2**20:.1f} MiB archive)")
        if sign_key is not None:
            console.print(f"  signed: {SIGNATURE} by key {key_fingerprint(sign_key.public_key())[:16]}")
    return folder, archive


def remove_bundle(out: Path, name: str) -> None:
    """Remove a bundle of an earlier run (folder and archive)."""
    shutil.rmtree(out / name, ignore_errors=True)
    (out / f"{name}.tar.gz").unlink(missing_ok=True)
