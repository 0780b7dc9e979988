"""`bedside deploy`: plan -> compress -> export -> validate -> report + bundle, resumable, re-planning on failure.

Why: one command takes a model and a device profile to a bundle that provably fits and works, or
to a report that says why nothing passed.

Layout of `--out DIR`:
    DIR/plan.json                     the first plan
    DIR/work/compress/                toolkit.compress.pipeline output and its stage cache (resumes itself)
    DIR/work/exports/<fmt>-<quant>-<hash12>/   one finished export per input hash (renamed in when complete)
    DIR/work/validate/<hash12>.json   one evaluation per (artifact, reference, data, context, tokens)
    DIR/report.json, DIR/report.html  written atomically at the end, pass or fail
    DIR/bundle-<profile>/ and DIR/bundle-<profile>.tar.gz   only when every blocking check passed

Re-plan loop (at most `max_attempts`): validate the chosen candidate; when a blocking check fails
(quality floor, memory budget), fold the measurements into `toolkit.validate.replan.Corrections`
and try the next candidate they allow. Export and validation hashes cover everything they read, so
a re-run after an interruption reuses every finished stage and says so in the report (`resumed`).

Every attempt becomes a typed `outcome.Attempt`; the run ends in one `outcome.DeployOutcome` that report and
bundle read. Each record has one writer: export.json is the exporter's, the pipeline never rewrites it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

import exporters
from exporters.base import read_record
from runtimes.llamacpp_runner import runner_options
from runtimes.results import RuntimeLoadError
from toolkit.compress.pipeline import (
    MAX_CALIBRATION_SEQUENCES,
    QUANT_METHODS,
    compress,
    options_from_plan,
)
from toolkit.compress.prune import get_selection_method
from toolkit.compress.prune.replace import check_replace_mode
from toolkit.core.atomic import building_folder, remove_stale_temporaries, write_json_atomic
from toolkit.core.errors import BedsideError, NothingFitsError
from toolkit.core.hashing import file_sha256, sha256_json, weights_sha256
from toolkit.core.output_dir import make_out_dir
from toolkit.core.records import DEFAULT_DATA, EVAL_FRACTION, EXPORT_RECORD, PLAN_RECORD, default_data
from toolkit.data import data_sha256, split_calibration_eval
from toolkit.deploy.bundle import make_bundle, remove_bundle
from toolkit.deploy.outcome import Attempt, BundleNames, DeployOutcome, ModelSummary, StageRecord
from toolkit.deploy.preflight import (
    check_data,
    check_disk,
    check_model_config,
    check_model_weights,
    check_threads,
    check_writable,
)
from toolkit.deploy.report import print_summary, write_reports
from toolkit.deploy.signing import load_private_key
from toolkit.plan.memory import deployment_of, flash_attention, kv_cache_dtype_of
from toolkit.plan.planner import make_plan
from toolkit.plan.schema import Candidate, Plan, write_plan
from toolkit.target.profiles import DeviceProfile, load_profile
from toolkit.validate.checks import (
    HOST_PROFILE,
    HOST_SPEED_CHECK,
    Check,
    build_checks,
    explain_failures,
    measured_memory_bytes,
    perplexity_increase_pct,
)
from toolkit.validate.evaluate import evaluate
from toolkit.validate.replan import Corrections, next_candidate, with_chosen
from toolkit.validate.target_speed import predict_target_speed

if TYPE_CHECKING:
    from toolkit.compress.pipeline import CompressResult

STAGE_NAMES = ("plan", "compress", "export", "validate", "bundle")


@dataclass(frozen=True)
class DeployOptions:
    """Everything `bedside deploy` takes; the speed knobs trade accuracy of the figures for time."""

    profile: str
    model: str = "demo"
    calib: str | None = None
    eval_data: str | None = None
    out: Path = Path("out/deploy")
    max_attempts: int = 3
    calib_sequences: int = 64
    heal_steps: int = 40
    heal: bool = True  # False: --no-heal; healing is also skipped when the host cannot hold it (host_can_heal)
    eval_tokens: int = 4096
    seq_len: int = 256
    prune_method: str = "activation"
    quant_method: str = "auto"  # awq-gptq for GGUF, awq for ONNX; "rtn" skips the search (faster, lower quality)
    replace: str = "linear"  # fit and fold a linear map for each removed span ("none": plain removal)
    threads: int | None = None
    kv_cache_dtype: str | None = None  # pins llama.cpp's KV-cache precision (make_plan's kv_cache_dtype)
    format: str | None = None  # pins of the plan, as `bedside plan --format/--quant/--prune-layers`
    quant: str | None = None
    prune_layers: int | None = None
    allow_pickle: bool = False
    seed: int = 0
    progress: bool = True
    sign_key: Path | None = None  # Ed25519 private key (PEM, `bedside keygen`): signs the bundle's manifest


@dataclass
class DeployResult:
    """What a deploy produced: pass/fail, the report (content and paths), its outcome and, when it passed, the bundle."""

    passed: bool
    reason: str
    report_json: Path
    report_html: Path
    report: dict[str, Any]
    bundle_dir: Path | None = None
    tarball: Path | None = None
    attempts: list[Attempt] = field(default_factory=list)
    outcome: DeployOutcome | None = None


def _check_options(options: DeployOptions) -> None:
    """Every option of deploy that needs no file: refused before anything is read or written."""
    if options.max_attempts < 1:
        raise BedsideError(f"--max-attempts must be 1 or more, got {options.max_attempts}")
    if options.eval_tokens < 2 * 16:
        raise BedsideError(f"--eval-tokens must be at least 32, got {options.eval_tokens}")
    if options.heal_steps < 1:
        raise BedsideError(f"--heal-steps must be 1 or more, got {options.heal_steps}")
    if not 1 <= options.calib_sequences <= MAX_CALIBRATION_SEQUENCES:
        raise BedsideError(
            f"--calib-sequences must be between 1 and {MAX_CALIBRATION_SEQUENCES}, got {options.calib_sequences}"
        )
    if options.seq_len < 2:
        raise BedsideError(f"--seq-len must be at least 2 tokens, got {options.seq_len}")
    if options.seed < 0:
        raise BedsideError(f"--seed must be 0 or more, got {options.seed}")
    try:
        get_selection_method(options.prune_method)
    except BedsideError as error:
        raise BedsideError(f"--prune-method: {error}") from None
    if options.quant_method not in QUANT_METHODS:
        raise BedsideError(
            f"--quant-method: unknown method {options.quant_method!r}: choose one of {', '.join(QUANT_METHODS)}"
        )
    check_replace_mode(options.replace)
    check_threads(options.threads)


def _eval_documents(options: DeployOptions, calib_docs: list[Any]) -> list[Any]:
    """The held-apart documents validation scores: --eval minus anything in the calibration data, else
    the same split compress holds apart (same fraction and seed, so no calibration document is scored)."""

    source = options.calib or DEFAULT_DATA  # run_deploy has filled in the model's default
    if options.eval_data is None:
        _, eval_docs, _ = split_calibration_eval(calib_docs, EVAL_FRACTION, options.seed, source=source)
        return list(eval_docs)
    keys = {document.content_key() for document in calib_docs}
    eval_docs = [d for d in check_data(options.eval_data, "--eval") if d.content_key() not in keys]
    if not eval_docs:
        raise BedsideError(
            f"every document of --eval '{options.eval_data}' is also in the calibration data: pass different data"
        )
    return eval_docs


class _Stages:
    """Prints one header per stage and records its seconds and whether it was resumed."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.records: dict[str, StageRecord] = {}

    def start(self, name: str, attempt: int, text: str) -> float:
        index = STAGE_NAMES.index(name) + 1
        self.console.rule(f"[bold]{index}/{len(STAGE_NAMES)} {name}[/] (attempt {attempt}): {text}")
        return time.perf_counter()

    def done(self, name: str, started: float, resumed: bool, **extra: Any) -> None:
        seconds = round(time.perf_counter() - started, 2)
        self.records[name] = StageRecord(seconds=seconds, resumed=resumed, **extra)
        note = "resumed from a finished run" if resumed else "done"
        self.console.print(f"  {name}: {note} in {seconds:.1f} s")


def host_can_heal(model_arg: str, options: DeployOptions) -> tuple[bool, str | None]:
    """Whether this host holds healing's peak (`toolkit.plan.compression_memory.heal_memory`) in its
    memory; the reason (estimate against the host's memory) when it does not."""
    import psutil

    from toolkit.model.facts import read_facts
    from toolkit.plan.compression_memory import heal_memory, heals_in_sixteen_bits, streams_by_default

    facts = read_facts(model_arg)
    sixteen_bit = heals_in_sixteen_bits(streams_by_default(facts), str(facts.extra.get("dtype")))
    needed = heal_memory(
        facts, calib_sequences=options.calib_sequences, seq_len=options.seq_len, sixteen_bit=sixteen_bit
    )
    total = int(psutil.virtual_memory().total)
    if needed <= total:
        return True, None
    precision = "16 bits with gradient checkpointing" if sixteen_bit else "float32"
    return False, (
        f"the host cannot heal: healing needs about {needed / 2**30:.1f} GiB (whole model in {precision}, LoRA, "
        f"activations) and the host has {total / 2**30:.1f} GiB; compressed without healing"
    )


def _compress(options: DeployOptions, model_arg: str, plan: Plan, work: Path) -> tuple[CompressResult, bool]:
    heal, reason = (True, None) if not options.heal else host_can_heal(model_arg, options)
    compress_options = options_from_plan(
        plan,
        heal=options.heal and heal,
        heal_skip_reason=reason,
        calib=options.calib,
        eval_data=options.eval_data,
        calib_sequences=options.calib_sequences,
        heal_steps=options.heal_steps,
        seq_len=options.seq_len,
        method=options.prune_method,
        quant_method=options.quant_method,
        replace=options.replace,
        eval_sequences=max(1, min(16, options.eval_tokens // options.seq_len)),  # per-stage perplexity
        seed=options.seed,
    )
    result = compress(model_arg, work / "compress", compress_options, plan=plan, progress=options.progress)
    stages = result.record.get("stages", {})
    ran = [record for record in stages.values() if isinstance(record, dict) and not record.get("skipped")]
    resumed = bool(ran) and all(record.get("resumed") for record in ran)
    return result, resumed


def _export(
    compressed: CompressResult, candidate: Candidate, plan: Plan, work: Path
) -> tuple[Path, dict[str, Any], bool]:
    """Export the compressed checkpoint (cached by input hash); returns (folder, export record, resumed)."""

    record = compressed.record
    imatrix = compressed.imatrix
    inputs = {
        "checkpoint": record.get("checkpoint", {}).get("sha256") or weights_sha256(compressed.checkpoint),
        "format": candidate.format,
        "quant": candidate.quant,
        "imatrix": file_sha256(imatrix) if imatrix is not None else None,
        "layers_removed": record.get("layers_removed"),
        "vision_dtype": candidate.vision_dtype,
    }
    folder = work / "exports" / f"{candidate.format}-{candidate.quant}-{sha256_json(inputs)[:12]}"
    if (folder / EXPORT_RECORD).is_file():
        return folder, read_record(folder), True
    metadata = {
        "plan": {"profile": plan.profile, **candidate.model_dump(exclude={"memory"})},
        "layers_removed": list(record.get("layers_removed") or []),
        "source_sha256": compressed.source_sha256,
    }
    with building_folder(folder) as building:  # the exporter writes export.json; it is not rewritten here
        result = exporters.export(
            compressed.checkpoint,
            candidate.format,
            candidate.quant,
            building,
            imatrix=imatrix,
            metadata=metadata,
            **({"vision_dtype": candidate.vision_dtype} if candidate.vision_dtype is not None else {}),
        )
    return folder, result.record, False


def deployed_runner_options(candidate: Candidate, profile: DeviceProfile) -> dict[str, Any]:
    """The Runner options the candidate deploys with: runtime.json's KV precision and placement (llama.cpp), as
    `bedside verify` loads them (runtimes.llamacpp_runner.runner_options); {} for other runtimes."""
    if candidate.runtime != "llama.cpp":
        return {}
    deployment = deployment_of(candidate)
    settings = {
        "kv_cache_dtype": kv_cache_dtype_of(deployment, profile),
        "flash_attn": flash_attention(deployment, profile),
        "kv_offload": not candidate.kv_on_host,
        "gpu_layers": candidate.gpu_layers,
    }
    return runner_options(settings)


def model_file_of(folder: Path, export_record: dict[str, Any]) -> Path:
    """The file (GGUF) or folder (ONNX) a runtime loads from an export folder (export.json `file`)."""
    name = export_record.get("file") or export_record.get("model_file")  # model_file: earlier exports
    if export_record.get("format") == "onnx":
        return folder
    if not name:
        raise BedsideError(f"export record in {folder} names no model file: delete the folder and re-run")
    return folder / str(name)


def _validate(
    options: DeployOptions,
    artifact: Path,
    export_record: dict[str, Any],
    candidate: Candidate,
    plan: Plan,
    source_dir: Path,
    source_sha: str,
    eval_docs: list[Any],
    work: Path,
    profile: DeviceProfile,
) -> tuple[dict[str, Any], bool]:
    """Evaluate the artifact against the reference on the held-apart data (cached by input hash), with the
    runtime settings it will be deployed with (the candidate's KV precision and placement, as runtime.json)."""

    seq_len = min(512, plan.context_length)
    runner_settings = deployed_runner_options(candidate, profile)
    inputs = {
        "artifact": export_record.get("sha256") or file_sha256(artifact),
        "runtime": candidate.runtime,
        "reference": source_sha,
        "data": data_sha256(eval_docs),
        "context": plan.context_length,
        "max_tokens": options.eval_tokens,
        "seq_len": seq_len,
        "threads": options.threads,
        "runner_options": runner_settings,
    }
    path = work / "validate" / f"{sha256_json(inputs)[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8")), True

    evaluation = evaluate(
        artifact,
        runtime=candidate.runtime,
        reference=source_dir,
        context=plan.context_length,
        max_tokens=options.eval_tokens,
        seq_len=seq_len,
        n_threads=options.threads,
        documents=eval_docs,
        progress=options.progress,
        runner_options=runner_settings,
    )
    reference = _reference_evaluation(options, source_dir, inputs, seq_len, eval_docs, work)
    evaluation["reference_perplexity"] = reference.get("perplexity")
    evaluation["reference_accuracy"] = reference.get("accuracy")
    write_json_atomic(path, evaluation)
    return evaluation, False


def _reference_evaluation(
    options: DeployOptions,
    source_dir: Path,
    inputs: dict[str, Any],
    seq_len: int,
    eval_docs: list[Any],
    work: Path,
) -> dict[str, Any]:
    """The uncompressed model scored alone on the same tokens (its perplexity and accuracy), cached."""

    key = {k: inputs[k] for k in ("reference", "data", "max_tokens", "seq_len", "threads")}
    path = work / "validate" / f"reference-{sha256_json(key)[:12]}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    reference = evaluate(
        source_dir,
        context=seq_len,
        max_tokens=options.eval_tokens,
        seq_len=seq_len,
        n_threads=options.threads,
        documents=eval_docs,
        progress=options.progress,
    )
    write_json_atomic(path, reference)
    return reference


def run_deploy(options: DeployOptions, console: Console | None = None) -> DeployResult:
    """Run the whole job (see the module docstring); BedsideError for bad input, NothingFitsError when nothing fits."""

    console = console or Console(stderr=True)
    started = time.perf_counter()
    _check_options(options)
    signing_key = load_private_key(Path(options.sign_key)) if options.sign_key is not None else None
    profile = load_profile(options.profile)
    if options.kv_cache_dtype is not None and options.kv_cache_dtype not in profile.kv_cache_dtypes:
        raise BedsideError(
            f"--kv-cache {options.kv_cache_dtype}: profile '{profile.name}' allows "
            f"{', '.join(profile.kv_cache_dtypes)}"
        )
    model_dir, facts = check_model_config(options.model)
    if options.calib is None:
        options = dataclasses.replace(options, calib=default_data(facts.vision is not None))
    calib_docs = check_data(options.calib, "--calib")
    eval_docs = _eval_documents(options, calib_docs)
    out = Path(options.out)
    disk_estimate = check_disk(check_writable(out), facts.total_params)  # nothing created yet
    work = out / "work"
    # --allow-pickle: the pickle is loaded (and refused in one line) before anything is written
    source_dir = check_model_weights(options.model, model_dir, work, options.allow_pickle)
    make_out_dir(out)  # only now: a refused deploy leaves no --out folder behind
    for folder in (out, work / "exports"):
        remove_stale_temporaries(folder)  # left by a killed run: never a half bundle or export
    model_arg = options.model if source_dir == model_dir else str(source_dir)  # converted pickle weights

    stages = _Stages(console)
    begin = stages.start("plan", 1, f"{options.model} on {profile.name}")
    plan = make_plan(
        facts,
        profile,
        str(options.model),
        format=options.format,
        quant=options.quant,
        prune_layers=options.prune_layers,
        kv_cache_dtype=options.kv_cache_dtype,
    )
    if not plan.fits or plan.chosen is None:
        raise NothingFitsError(plan.reason)
    write_plan(plan, out / PLAN_RECORD)
    first_plan = plan
    stages.done("plan", begin, False, chosen=plan.reason)

    corrections = Corrections()
    floor = profile.quality_floor.max_perplexity_increase_pct.value
    attempts: list[Attempt] = []
    passed = False
    reason = ""
    for number in range(1, options.max_attempts + 1):
        candidate = plan.chosen
        assert candidate is not None
        label = f"{candidate.format} {candidate.quant}, {candidate.layers_removed} layers removed"
        begin = stages.start("compress", number, label)
        compressed, resumed = _compress(options, model_arg, plan, work)
        stages.done("compress", begin, resumed, stages=compressed.record.get("stages"))
        begin = stages.start("export", number, f"{candidate.format} {candidate.quant}")
        with console.status(f"exporting {candidate.format} {candidate.quant}", spinner="dots"):
            export_dir, export_record, resumed = _export(compressed, candidate, plan, work)
        stages.done("export", begin, resumed, folder=str(export_dir))
        artifact = model_file_of(export_dir, export_record)
        begin = stages.start("validate", number, f"{candidate.runtime}, context {plan.context_length}")
        try:
            evaluation, resumed = _validate(
                options,
                artifact,
                export_record,
                candidate,
                plan,
                source_dir,
                compressed.source_sha256,
                eval_docs,
                work,
                profile,
            )
            target_speed = predict_target_speed(artifact, candidate, profile, plan.context_length)
            checks = build_checks(evaluation, profile, candidate, plan.budget_bytes, target_speed)
        except (
            RuntimeLoadError
        ) as error:  # the runtime crashed or refused the export: a failed check, not bad input
            evaluation, resumed = {"error": str(error)}, False
            target_speed = None
            checks = [Check("runtime_runs", False, None, None, "", detail=str(error))]
        stages.done("validate", begin, resumed)
        attempt = Attempt(
            attempt=number,
            plan=plan,
            compression=compressed.record,
            checkpoint=compressed.checkpoint,
            export_dir=export_dir,
            export=export_record,
            artifact=artifact,
            evaluation=evaluation,
            target_speed=target_speed,
            checks=checks,
            stages=dict(stages.records),
        )
        attempts.append(attempt)
        _print_checks(console, checks)
        if attempt.passed:
            passed = True
            reason = f"attempt {number} passed every blocking check ({label})"
            break
        failures = attempt.failures
        reason = f"attempt {number} ({label}): {explain_failures(checks)}"
        if attempt.runtime_failed:
            reason += "; not re-planned: the runtime could not run the export"
            break
        corrections.learn(
            candidate,
            measured_memory_bytes(evaluation, profile),
            perplexity_increase_pct(evaluation),
            quality_failed=any(c.name not in ("peak_memory_bytes", HOST_SPEED_CHECK) for c in failures),
            memory_failed=any(c.name == "peak_memory_bytes" for c in failures),
            target_speed=evaluation.get("decode_tokens_per_s") if profile.name == HOST_PROFILE else None,
            speed_failed=any(c.name == HOST_SPEED_CHECK for c in failures),
        )
        attempt.corrections = corrections.to_dict()
        if number == options.max_attempts:
            reason += f"; stopped after --max-attempts {options.max_attempts}"
            break
        following, why = next_candidate(first_plan, corrections, floor, profile.min_decode_tokens_per_s.value)
        attempt.next = why
        console.print(f"[yellow]re-plan:[/] {reason}; next: {why}")
        if following is None:
            reason += f"; {why}"
            break
        plan = with_chosen(first_plan, following, f"re-planned after attempt {number}: {why}")

    bundle_name = f"bundle-{profile.name}"
    bundle = BundleNames(folder=bundle_name, tarball=f"{bundle_name}.tar.gz") if passed else None
    if bundle is not None:
        begin = stages.start("bundle", len(attempts), str(out / bundle.folder))
        stages.records["bundle"] = StageRecord(resumed=False, folder=bundle.folder, tarball=bundle.tarball)
    outcome = DeployOutcome(
        model=ModelSummary(
            name=str(options.model),
            source_sha256=compressed.source_sha256,  # of the last compress run: every attempt's source
            num_layers=facts.num_layers,
            total_params=facts.total_params,
        ),
        threads=options.threads,
        profile=profile,
        first_plan=first_plan,
        attempts=attempts,
        passed=passed,
        reason=reason,
        stages=stages.records,
        disk_estimate_bytes=disk_estimate,
        bundle=bundle,
    )
    report, report_json, report_html = write_reports(out, outcome, seconds=time.perf_counter() - started)
    if bundle is not None:
        make_bundle(
            out, bundle.folder, outcome, report_json, report_html, console=console, sign_key=signing_key
        )
        stages.done("bundle", begin, False, folder=bundle.folder, tarball=bundle.tarball)
    else:
        remove_bundle(out, bundle_name)  # a bundle of an earlier run would contradict this report
    print_summary(console, report, out)
    return DeployResult(
        passed,
        reason,
        report_json,
        report_html,
        report,
        out / bundle.folder if bundle else None,
        out / bundle.tarball if bundle else None,
        attempts,
        outcome,
    )


def _print_checks(console: Console, checks: list[Check]) -> None:
    for check in checks:
        mark = "[green]PASS[/]" if check.passed else ("[red]FAIL[/]" if check.blocking else "[yellow]FAIL[/]")
        note = "" if check.blocking else " (reported only)"
        console.print(f"  {mark} {check.name}: {check.describe()}{note}")


def default_threads() -> int:
    """Threads for runtimes when --threads is not given: every CPU of this host."""
    return os.cpu_count() or 1
