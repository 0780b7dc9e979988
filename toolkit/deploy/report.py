"""The deploy report: report.json (schema-versioned, `checks` as {name, passed, value, threshold, ...}) and a
self-contained report.html (plots as base64 PNG, no external files), plus the short terminal summary.

Why: hospital IT and the model owner need one file that says what was deployed, whether every check
passed, and why; the JSON is for machines (verify, CI), the HTML for people.

Plots (matplotlib, Agg backend): memory breakdown against the budget (estimate terms and the measured
peak), the planner's candidates (estimated memory vs predicted perplexity increase, chosen and tried
marked), per-layer selection scores (removed layers highlighted), quality per stage (perplexity of
original, pruned, healed, quantized on the compress evaluation blocks in torch; reference and exported
on the target runtime over the validation tokens).
"""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit import __version__
from toolkit.core.atomic import write_json_atomic, write_text_atomic
from toolkit.core.records import SCHEMA_VERSION
from toolkit.core.units import MIB
from toolkit.deploy.outcome import (
    Attempt,
    BundleNames,
    DeployOutcome,
    MemoryFigures,
    ModelSummary,
    StageRecord,
)
from toolkit.plan.schema import Candidate, Plan
from toolkit.validate.checks import Check, Number, Record, format_number
from toolkit.validate.target_speed import describe

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
SPEED_TARGET = "not predicted"
QUALITY_NOTE = (
    "original..quantized: torch on the compress evaluation blocks; exported: the target runtime "
    "on the validation tokens (the same held-apart documents)"
)


class ReportProfile(Record):
    """The device profile's figures the checks compare with."""

    name: str
    context_length: int
    budget_bytes: int
    max_perplexity_increase_pct: float
    min_accuracy_retention_pct: float
    min_decode_tokens_per_s: float


class ReportAttempt(Record):
    """One attempt of the re-plan loop as report.json lists it."""

    attempt: int
    candidate: dict[str, Any]  # the candidate tried, without the planner's reason
    plan_reason: str
    checks: list[Check]
    passed: bool
    corrections: dict[str, Any] | None
    next: str | None
    layers_removed: list[int] | None
    quality: dict[str, Any]
    evaluation: dict[str, Any]

    @classmethod
    def of(cls, attempt: Attempt) -> ReportAttempt:
        return cls(
            attempt=attempt.attempt,
            candidate=attempt.candidate.model_dump(exclude={"reason"}),
            plan_reason=attempt.plan.reason,
            checks=attempt.checks,
            passed=attempt.passed,
            corrections=attempt.corrections,
            next=attempt.next,
            layers_removed=attempt.layers_removed,
            quality=attempt.quality,
            evaluation=attempt.evaluation,
        )


class CandidateSummary(Record):
    """One planner candidate, for the candidates plot."""

    format: str
    quant: str
    runtime: str
    layers_removed: int
    total_bytes: int
    predicted_quality_loss: float
    fits: bool
    passes: bool  # fits and the planner's reason lists no memory/speed miss
    reason: str

    @classmethod
    def of(cls, candidate: Candidate) -> CandidateSummary:
        return cls(
            format=candidate.format,
            quant=candidate.quant,
            runtime=candidate.runtime,
            layers_removed=candidate.layers_removed,
            total_bytes=candidate.memory.total_bytes,
            predicted_quality_loss=candidate.predicted_quality_loss,
            fits=candidate.fits,
            passes=candidate.fits and not candidate.reason,
            reason=candidate.reason,
        )


class ReportPlan(Record):
    """The plan the deploy ended with, the first plan's reason and its candidates."""

    reason: str
    first_reason: str
    budget_bytes: int
    fp16_bytes: int
    chosen: Candidate | None
    candidates: list[CandidateSummary]


class ReportSpeed(Record):
    """Decode and prefill speed measured on this host, and the simulator's prediction on the target."""

    host_decode_tokens_per_s: Number | None
    host_prefill_tokens_per_s: Number | None
    threads: int | None
    target: str = SPEED_TARGET  # one line: the prediction, or why there is none
    target_prediction: dict[str, Any] | None = None  # toolkit.validate.target_speed.predict_target_speed


class QualityStages(Record):
    """Perplexity after each stage."""

    original: Any
    pruned: Any
    healed: Any
    quantized: Any
    exported: Any


class ReportQuality(Record):
    """Perplexity per stage and the runtime's comparison with the reference."""

    metric: Literal["perplexity"] = "perplexity"
    stages: QualityStages
    reference_runtime_perplexity: Any
    kl_divergence: Any
    top1_agreement: Any
    accuracy: Any
    reference_accuracy: Any = None  # the uncompressed model's accuracy on the same items (torch)
    prior_vs_measured: list[PriorVsMeasured] = []
    note: str = QUALITY_NOTE


class PriorVsMeasured(Record):
    """One quality term: the planner's prediction (percent perplexity increase, with its source) beside the
    measured value, where a stage measured it (see prior_vs_measured for the formulas)."""

    term: str
    predicted_pct: float
    source: str
    measured_pct: float | None


def prior_vs_measured(
    chosen: Candidate | None, quality: QualityStages, reference: float | None
) -> list[PriorVsMeasured]:
    """The chosen candidate's predicted terms beside what compression and validation measured:

    depth = 100 * (ppl(healed, else pruned) / ppl(original) - 1)   (torch, the compression's held-apart blocks)
    quantization = 100 * (ppl(quantized) / ppl(healed, else pruned, else original) - 1)
    total = 100 * (ppl(exported on the target runtime) / ppl(reference runtime) - 1)   (validation windows)
    KV cache and vision have no stage of their own: their measured value is part of the total.
    """
    if chosen is None or chosen.predicted is None:
        return []
    terms = chosen.predicted

    def ratio(numerator: Any, denominator: Any) -> float | None:
        if not numerator or not denominator:
            return None
        return round(100.0 * (float(numerator) / float(denominator) - 1.0), 3)

    before_quant = quality.healed or quality.pruned or quality.original
    rows = [
        PriorVsMeasured(
            term="depth",
            predicted_pct=terms.depth_pct,
            source=f"{terms.depth_source}{': ' + terms.depth_prior if terms.depth_prior else ''}",
            measured_pct=ratio(quality.healed or quality.pruned, quality.original)
            if chosen.layers_removed
            else 0.0,
        ),
        PriorVsMeasured(
            term=f"quantization {chosen.quant}",
            predicted_pct=terms.quant_pct,
            source=terms.quant_source,
            measured_pct=ratio(quality.quantized, before_quant),
        ),
    ]
    if chosen.kv_cache_dtype:
        rows.append(
            PriorVsMeasured(
                term=f"KV cache {chosen.kv_cache_dtype}",
                predicted_pct=terms.kv_pct,
                source=terms.kv_source,
                measured_pct=None,
            )
        )
    rows.append(
        PriorVsMeasured(
            term="total (target runtime)",
            predicted_pct=terms.total_pct,
            source="product of the terms",
            measured_pct=ratio(quality.exported, reference),
        )
    )
    return rows


class LayerSelection(Record):
    """Per-layer selection scores (per original layer) and the layers removed."""

    method: str | None
    scores: list[float | None]
    layers_removed: list[int]


class ReportData(Record):
    """The calibration and evaluation data records of compress (hashes and counts, never text)."""

    calibration: Any
    eval: Any


class DeployReport(Record):
    """report.json."""

    schema_version: Literal[1] = SCHEMA_VERSION
    kind: Literal["bedside-deploy-report"] = "bedside-deploy-report"
    bedside_version: str = __version__
    created_utc: str
    passed: bool
    status: Literal["PASS", "FAIL"]
    reason: str
    model: ModelSummary
    profile: ReportProfile
    checks: list[Check]
    attempts: list[ReportAttempt]
    plan: ReportPlan
    memory: MemoryFigures
    speed: ReportSpeed
    quality: ReportQuality
    layer_selection: LayerSelection | None
    data: ReportData
    stages: dict[str, StageRecord]
    disk_estimate_bytes: int
    bundle: BundleNames | None
    seconds: float


def layer_scores(compression: dict[str, Any]) -> LayerSelection | None:
    """Per-layer scores and the layers removed, from a compression record (compression.json), or None."""
    raw = compression.get("layer_scores") or {}
    scores = raw.get("scores") if isinstance(raw, dict) else raw
    if isinstance(scores, dict):
        scores = [scores[key] for key in sorted(scores, key=lambda k: int(k))]
    if not scores:
        return None
    return LayerSelection(
        method=raw.get("method") if isinstance(raw, dict) else None,
        scores=[None if s is None else float(s) for s in scores],
        layers_removed=list(compression.get("layers_removed") or []),
    )


def _profile(outcome: DeployOutcome) -> ReportProfile:
    profile = outcome.profile
    return ReportProfile(
        name=profile.name,
        context_length=profile.context_length,
        budget_bytes=outcome.first_plan.budget_bytes,
        max_perplexity_increase_pct=profile.quality_floor.max_perplexity_increase_pct.value,
        min_accuracy_retention_pct=profile.quality_floor.min_accuracy_retention_pct.value,
        min_decode_tokens_per_s=profile.min_decode_tokens_per_s.value,
    )


def _plan(plan: Plan, first_plan: Plan) -> ReportPlan:
    return ReportPlan(
        reason=plan.reason,
        first_reason=first_plan.reason,
        budget_bytes=first_plan.budget_bytes,
        fp16_bytes=first_plan.fp16_bytes,
        chosen=plan.chosen,
        candidates=[CandidateSummary.of(c) for c in first_plan.candidates],
    )


def _quality(final: Attempt) -> ReportQuality:
    evaluation = final.evaluation
    quality = final.quality
    reference = evaluation.get("reference") if isinstance(evaluation.get("reference"), dict) else {}
    stages = QualityStages(
        original=quality.get("original"),
        pruned=quality.get("pruned"),
        healed=quality.get("healed"),
        quantized=quality.get("quantized"),
        exported=evaluation.get("perplexity"),
    )
    reference_perplexity = reference.get("perplexity") or evaluation.get("reference_perplexity")
    return ReportQuality(
        stages=stages,
        reference_runtime_perplexity=reference_perplexity,
        kl_divergence=evaluation.get("kl_divergence"),
        top1_agreement=evaluation.get("top1_agreement"),
        accuracy=evaluation.get("accuracy"),
        reference_accuracy=evaluation.get("reference_accuracy"),
        prior_vs_measured=prior_vs_measured(final.plan.chosen, stages, reference_perplexity),
    )


def build_report(outcome: DeployOutcome, seconds: float) -> DeployReport:
    """The report.json record of a deploy's outcome (see `toolkit.deploy.pipeline.run_deploy`)."""
    final = outcome.final
    evaluation = final.evaluation
    return DeployReport(
        created_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        passed=outcome.passed,
        status="PASS" if outcome.passed else "FAIL",
        reason=outcome.reason,
        model=outcome.model,
        profile=_profile(outcome),
        checks=final.checks,
        attempts=[ReportAttempt.of(attempt) for attempt in outcome.attempts],
        plan=_plan(final.plan, outcome.first_plan),
        memory=outcome.memory,
        speed=ReportSpeed(
            host_decode_tokens_per_s=evaluation.get("decode_tokens_per_s"),
            host_prefill_tokens_per_s=evaluation.get("prefill_tokens_per_s"),
            threads=outcome.threads,
            target=describe(final.target_speed),
            target_prediction=final.target_speed,
        ),
        quality=_quality(final),
        layer_selection=layer_scores(final.compression),
        data=ReportData(calibration=final.compression.get("calibration"), eval=final.compression.get("eval")),
        stages=outcome.stages,
        disk_estimate_bytes=outcome.disk_estimate_bytes,
        bundle=outcome.bundle,
        seconds=round(seconds, 2),
    )


# ------------------------------------------------------------------------------------------------
# Plots


def _png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_memory(report: dict[str, Any]) -> str | None:
    """Stacked estimate terms and the measured peak against the budget line."""
    estimate = report["memory"]["estimate"]
    if not estimate:
        return None
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 2.6))
    left = 0.0
    for key, label in (
        ("weights_bytes", "weights"),
        ("kv_cache_bytes", "KV cache"),
        ("vision_bytes", "vision"),
        ("overhead_bytes", "overhead"),
    ):
        width = estimate[key] / MIB
        axis.barh("estimate", width, left=left, label=label)
        left += width
    measured = report["memory"]["measured_peak_bytes"]
    if measured is not None:
        axis.barh("measured peak", measured / MIB, color="tab:gray", label="measured")
    axis.axvline(report["memory"]["budget_bytes"] / MIB, color="red", linestyle="--", label="budget")
    axis.set_xlabel("MiB")
    axis.legend(loc="lower right", fontsize=7)
    axis.set_title("Memory against the budget")
    return _png(figure)


def plot_candidates(report: dict[str, Any]) -> str | None:
    """Planner candidates: estimated memory vs predicted perplexity increase; chosen and tried marked."""
    candidates = report["plan"]["candidates"]
    if not candidates:
        return None
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    passing = [c for c in candidates if c["passes"]]
    misses = [c for c in candidates if not c["passes"]]
    for group, colour, label in (
        (passing, "tab:blue", "passes"),
        (misses, "tab:gray", "over budget or too slow"),
    ):
        if group:
            axis.scatter(
                [c["total_bytes"] / MIB for c in group],
                [c["predicted_quality_loss"] for c in group],
                s=14,
                color=colour,
                label=label,
            )
    for attempt in report["attempts"]:
        c = attempt["candidate"]
        axis.scatter(
            [c["memory"]["total_bytes"] / MIB],
            [c["predicted_quality_loss"]],
            marker="*",
            s=180,
            color="tab:green" if attempt["passed"] else "tab:red",
            label=f"attempt {attempt['attempt']} ({c['quant']}, -{c['layers_removed']} layers)",
        )
    axis.axvline(report["plan"]["budget_bytes"] / MIB, color="red", linestyle="--", label="budget")
    axis.axhline(
        report["profile"]["max_perplexity_increase_pct"], color="orange", linestyle=":", label="floor"
    )
    axis.set_xlabel("estimated peak memory (MiB)")
    axis.set_ylabel("predicted perplexity increase (%)")
    axis.set_yscale("symlog", linthresh=1.0)
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=7)
    axis.set_title("Planner candidates")
    return _png(figure)


def plot_layer_scores(report: dict[str, Any]) -> str | None:
    """Per-layer selection scores; removed layers in red."""
    selection = report.get("layer_selection")
    if not selection or all(score is None for score in selection["scores"]):
        return None  # no layer was scored (nothing removed): the page says the stage was skipped
    import matplotlib.pyplot as plt

    scores = selection["scores"]
    removed = set(selection["layers_removed"])
    figure, axis = plt.subplots(figsize=(7, 3))
    axis.bar(
        range(len(scores)),
        [s if s is not None else 0.0 for s in scores],
        color=["tab:red" if i in removed else "tab:blue" for i in range(len(scores))],
    )
    axis.set_xlabel("decoder layer (original index); red = removed")
    axis.set_ylabel("score")
    axis.set_title(f"Layer selection scores ({selection.get('method') or 'method not recorded'})")
    return _png(figure)


def plot_quality(report: dict[str, Any]) -> str | None:
    """Perplexity increase per stage, each against the reference scored the same way.

    increase(stage) = 100 * (ppl(stage) / ppl(reference) - 1). The compress stages (pruned, healed,
    quantized) are torch on the compression's held-apart blocks, against ``original`` on those
    blocks; ``exported`` is the target runtime on the validation windows, against the uncompressed
    model on the same windows. The two perplexity scales differ (other texts and windows), so only
    the relative increases share an axis.
    """
    quality = report["quality"]
    stages = {name: value for name, value in quality["stages"].items() if value is not None}
    original = stages.get("original")
    reference = quality["reference_runtime_perplexity"]
    increases: dict[str, float] = {}
    for name, value in stages.items():
        if name == "exported":
            if reference:
                increases["exported (runtime)"] = 100.0 * (value / reference - 1.0)
        elif original and name != "original":
            increases[name] = 100.0 * (value / original - 1.0)
    if not increases:
        return None
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3))
    names = list(increases)
    colours = ["tab:purple" if "runtime" in name else "tab:blue" for name in names]
    axis.bar(names, [increases[name] for name in names], color=colours)
    for index, name in enumerate(names):
        axis.text(index, increases[name], f"{increases[name]:+.1f} %", ha="center", va="bottom", fontsize=8)
    floor = report["profile"].get("max_perplexity_increase_pct")
    if floor is not None:
        axis.axhline(floor, color="tab:red", linestyle="--", label=f"floor {floor:g} %")
        axis.legend(fontsize=7)
    axis.axhline(0.0, color="black", linewidth=0.5)
    axis.set_ylabel("perplexity increase vs original (%)")
    axis.set_title("Quality per stage")
    return _png(figure)


# ------------------------------------------------------------------------------------------------
# HTML


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _prior_table(report: dict[str, Any]) -> str:
    """The planner's predicted perplexity terms beside the measured ones ("no stage" where none measures it)."""
    rows = [
        [
            html.escape(row["term"]),
            f"{row['predicted_pct']:+.2f} %",
            "no stage" if row["measured_pct"] is None else f"{row['measured_pct']:+.2f} %",
            html.escape(row["source"]),
        ]
        for row in report["quality"].get("prior_vs_measured") or []
    ]
    if not rows:
        return "<p>no prediction recorded for the deployed candidate (a plan records the terms of the candidates that pass it)</p>"
    return _table(["term", "predicted", "measured", "prediction's source"], rows)


ACCURACY_ROWS = (
    ("overall", "value", "multiple choice (text)"),
    ("closed", "value", "closed image questions (option log-likelihood)"),
    ("open", "value", "open image questions (exact match)"),
    ("open", "recall", "open image questions (token recall)"),
)


def accuracy_rows(quality: dict[str, Any]) -> list[dict[str, Any]]:
    """Accuracy before compression (the uncompressed model) and after (the export on its runtime), per kind.

    "before" is the reference's figure from the same evaluation run when it scored the items with a
    reference, else the uncompressed model's own evaluation (`reference_accuracy`).
    """
    after = quality.get("accuracy") or {}
    before = quality.get("reference_accuracy") or {}
    rows = []
    for kind, key, label in ACCURACY_ROWS:
        measured = after.get(kind)
        if kind == "overall":
            value = measured
            reference = before.get("overall") if isinstance(before, dict) else None
            n = after.get("n")
        else:
            if not isinstance(measured, dict):
                continue
            value = measured.get(key)
            reference = measured.get("reference") if key == "value" else None
            if reference is None and isinstance(before.get(kind), dict):
                reference = before[kind].get(key)
            n = measured.get("n")
        if value is None:
            continue
        rows.append({"kind": label, "before": reference, "after": value, "n": n})
    return rows


def _accuracy_table(report: dict[str, Any]) -> str:
    rows = [
        [
            html.escape(row["kind"]),
            "-" if row["before"] is None else f"{row['before']:.3f}",
            f"{row['after']:.3f}",
            str(row["n"]),
        ]
        for row in accuracy_rows(report["quality"])
    ]
    if not rows:
        return "<p>the evaluation data has no questions with answers: perplexity only</p>"
    return _table(["task", "before (uncompressed)", "after (deployed)", "n"], rows)


def _check_rows(checks: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for data in checks:
        check = Check(**data)
        status = "PASS" if check.passed else "FAIL"
        css = "pass" if check.passed else ("fail" if check.blocking else "warn")
        rows.append(
            [
                f'<span class="{css}">{status}</span>',
                html.escape(check.name),
                html.escape(format_number(check.value, check.unit)),
                html.escape(f"{check.comparison} {format_number(check.threshold, check.unit)}"),
                "yes" if check.blocking else "reported only",
                html.escape(check.detail),
            ]
        )
    return rows


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page: status, checks, attempts, stages, data hashes and the four plots."""
    plots = [
        ("Memory", plot_memory(report)),
        ("Planner candidates", plot_candidates(report)),
        ("Layer selection", plot_layer_scores(report)),
        ("Quality per stage", plot_quality(report)),
    ]
    figures = "".join(
        f'<h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">'
        if data
        else f"<h2>{html.escape(title)}</h2><p>no data (stage skipped)</p>"
        for title, data in plots
    )
    attempts = _table(
        ["attempt", "candidate", "passed", "next"],
        [
            [
                str(a["attempt"]),
                html.escape(
                    f"{a['candidate']['format']} {a['candidate']['quant']}, "
                    f"{a['candidate']['layers_removed']} layers removed"
                    + (f" ({', '.join(map(str, a['layers_removed']))})" if a.get("layers_removed") else "")
                ),
                "yes" if a["passed"] else "no",
                html.escape(a.get("next") or ""),
            ]
            for a in report["attempts"]
        ],
    )
    stages = _table(
        ["stage", "seconds", "resumed", "note"],
        [
            [
                html.escape(name),
                html.escape(str(value.get("seconds", ""))),
                "yes" if value.get("resumed") else "no",
                html.escape(_stage_note(value)),
            ]
            for name, value in report["stages"].items()
        ],
    )
    data = report["data"]
    data_rows = [
        [html.escape(name), key, html.escape(str((value or {}).get(key)))]
        for name, value in data.items()
        for key in ("source", "sha256", "documents", "tokens")
        if value
    ]
    status_css = "pass" if report["passed"] else "fail"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Bedside deploy report: {html.escape(report["model"]["name"])}
on {html.escape(report["profile"]["name"])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;font-size:90%}}.pass{{color:#080;font-weight:bold}}
.fail{{color:#b00;font-weight:bold}}.warn{{color:#a60;font-weight:bold}}img{{max-width:100%}}</style></head><body>
<h1>Bedside deploy: {html.escape(report["model"]["name"])} on {html.escape(report["profile"]["name"])}</h1>
<p>Status: <span class="{status_css}">{report["status"]}</span>. {html.escape(report["reason"])}</p>
<p>Bedside {html.escape(report["bedside_version"])}, {html.escape(report["created_utc"])}; speed on the target:
{html.escape(report["speed"]["target"])}; other speeds were measured on this host.</p>
<h2>Checks</h2>{_table(["", "check", "value", "threshold", "blocking", "detail"], _check_rows(report["checks"]))}
<h2>Attempts</h2>{attempts}
<h2>Plan</h2><p>{html.escape(report["plan"]["reason"])}</p>
<h2>Accuracy before and after compression</h2>{_accuracy_table(report)}
<h2>Predicted and measured quality</h2>{_prior_table(report)}
<h2>Stages</h2>{stages}
<h2>Data (hashes and counts only)</h2>{_table(["set", "field", "value"], data_rows)}
{figures}
</body></html>
"""


def write_reports(out: Path, outcome: DeployOutcome, seconds: float) -> tuple[dict[str, Any], Path, Path]:
    """Write out/report.json and out/report.html atomically; returns (report.json content, json path, html path)."""
    import matplotlib

    matplotlib.use("Agg")
    report = build_report(outcome, seconds).model_dump(mode="json")
    json_path, html_path = out / REPORT_JSON, out / REPORT_HTML
    write_json_atomic(json_path, report)
    write_text_atomic(html_path, render_html(report))
    return report, json_path, html_path


def print_summary(console: Console, report: dict[str, Any], out: Path) -> None:
    """The short terminal summary: status, the checks, where the report and bundle are."""
    table = Table(
        title=f"deploy {report['model']['name']} on {report['profile']['name']}: {report['status']}"
    )
    for column in ("", "check", "value", "threshold"):
        table.add_column(column)
    for data in report["checks"]:
        check = Check(**data)
        mark = (
            "[green]PASS[/]" if check.passed else ("[red]FAIL[/]" if check.blocking else "[yellow]FAIL*[/]")
        )
        table.add_row(
            mark,
            check.name,
            format_number(check.value, check.unit),
            f"{check.comparison} {format_number(check.threshold, check.unit)}",
        )
    console.print(table)
    console.print(f"[dim]* reported only; speed on the target: {escape(report['speed']['target'])}[/]")
    console.print(f"{report['reason']}")
    console.print(f"report: {out / REPORT_JSON}, {out / REPORT_HTML}")
    if report.get("bundle"):
        console.print(f"bundle: {out / report['bundle']['folder']} and {out / report['bundle']['tarball']}")


def _stage_note(value: dict[str, Any]) -> str:
    """What a deploy stage's record says beside its time: why compress did not heal (--no-heal, or a host too small),
    or that the stage (the bundle) was still running when the report was written."""
    heal = (value.get("stages") or {}).get("heal") if isinstance(value.get("stages"), dict) else None
    if isinstance(heal, dict) and heal.get("skipped"):
        return f"not healed: {heal['skipped']}"
    if value.get("seconds") is None:
        return "running when this report was written (the report goes into the bundle)"
    return ""
