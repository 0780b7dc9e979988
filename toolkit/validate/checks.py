"""Validation checks of an exported model on the target runtime: every one PASS/FAIL with number and threshold.

Why: the planner's memory and quality figures are estimates; a deployment ships only when what was
measured on the runtime holds against the device profile. Inputs are the `toolkit.validate.evaluate.evaluate`
result (compressed artifact scored against the uncompressed reference on held-apart domain data,
then loaded with its KV cache filled to the profile's context) and the plan's chosen candidate.

Checks (`blocking` ones decide whether deploy re-plans; the others are reported):

- perplexity_increase_pct = (ppl_compressed / ppl_reference - 1) * 100
  <= profile.quality_floor.max_perplexity_increase_pct                              (blocking)
- kl_divergence = mean over scored positions t of sum_v p_ref(v|t) * (log p_ref(v|t) - log p_cmp(v|t))
  <= ln(1 + floor / 100) nats                                                        (blocking)
  Why that threshold: on text drawn from the reference model, E[-log p_cmp] = H(p_ref) + KL, so a
  KL of ln(1 + f) is exactly a perplexity increase of f; the profile's floor carries over.
- top1_agreement (share of positions where both models rank the same token first)
  >= TOP1_AGREEMENT_MIN                                                           (reported only;
  a Bedside policy figure, the profile has none)
- accuracy_retention_pct = accuracy_compressed / accuracy_reference * 100
  >= profile.quality_floor.min_accuracy_retention_pct  (blocking; only when the eval data has answers;
  multiple-choice `overall`, or closed-question accuracy on image QA)
- peak_memory_bytes: peak memory of the runtime with the model loaded and the KV cache filled to
  the profile's context (RSS; plus VRAM on a unified-memory device; VRAM alone on a discrete
  GPU) <= the profile's budget, the planner's estimate shown beside it (blocking). On a profile
  whose model tier is GPU memory (kind "device") an RSS figure is not a measurement of that tier:
  without a VRAM figure the check fails instead of passing on the wrong memory.
- peak_host_memory_bytes (only when the plan puts layers or the KV cache in host memory beside a GPU, and the
  run was on the GPU): peak RSS <= the host tier's budget (toolkit.plan.memory.host_budget), the estimate's
  host_bytes beside it (blocking)
- runtime_device (profiles with a GPU-memory model tier only): the runtime ran on the GPU, not
  on a CPU fallback (blocking)
- decode_tokens_per_s_host: decode speed measured on this host >= profile.min_decode_tokens_per_s; reported
  only, except on the "host" profile, where this host is the target and the measurement is the target's speed
  (blocking)
- decode_tokens_per_s_target, when a prediction is given: the simulator's decode speed for the same file on the
  profile (toolkit.validate.target_speed, with its error band in the detail) >= profile.min_decode_tokens_per_s
  (reported only: a prediction; on the "host" profile the measurement above decides)
- decode_prediction_error_pct, on the "host" profile with a prediction and a measurement: the prediction checked
  against the measurement, |predicted / measured - 1| x 100 <= the simulator's measured 90th-percentile decode
  error (toolkit.plan.calibration.decode_error_band; PREDICTION_ERROR_TARGET_PCT, the issue's target, without an
  accuracy record). Reported only: it grades the simulator, not the deployment.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from toolkit.plan.memory import host_budget
from toolkit.plan.schema import Candidate
from toolkit.target.profiles import DeviceProfile
from toolkit.validate.target_speed import describe

TOP1_AGREEMENT_MIN = 0.6
HOST_SPEED_NOTE = "measured on this host, which is not the target (see decode_tokens_per_s_target)"
HOST_IS_TARGET_NOTE = "measured on this host, which is the target (profile 'host'): blocking"
HOST_PROFILE = "host"  # toolkit.target.host.detect_host_profile's name
HOST_SPEED_CHECK = "decode_tokens_per_s_host"
PREDICTION_ERROR_TARGET_PCT = 15.0  # issue 15's accuracy target, used when there is no accuracy record


Number = int | float  # kept as given: a byte count stays an int in the JSON, a ratio a float


class Record(BaseModel):
    """Base of the validate and deploy records (checks, report.json, the bundle's manifest.json and runtime.json).

    One style for all of them: a pydantic model, written with `model_dump(mode="json")`; the top-level
    records carry `schema_version`. Unknown fields are errors; NaN and infinity are written as JSON's
    `NaN`/`Infinity` (as `json.dumps` always did), not turned into null.
    """

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class Check(Record):
    """One PASS/FAIL line of a report: `passed` is value compared with threshold by `comparison`.

    `model_dump(mode="json")` is a report.json `checks` item (name, passed, value, threshold, ...).
    Positional arguments as well as keywords: `Check("load", True, None, None, "")`.
    """

    name: str
    passed: bool
    value: Number | None
    threshold: Number | None
    comparison: str = "<="  # "<=" or ">="
    unit: str = ""
    blocking: bool = True
    detail: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    def __init__(
        self,
        name: str,
        passed: bool,
        value: Number | None,
        threshold: Number | None,
        comparison: str = "<=",
        unit: str = "",
        blocking: bool = True,
        detail: str = "",
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            name=name,
            passed=passed,
            value=value,
            threshold=threshold,
            comparison=comparison,
            unit=unit,
            blocking=blocking,
            detail=detail,
            extra={} if extra is None else extra,
        )

    def describe(self) -> str:
        """`value <= threshold unit` as text, for terminals and the HTML report."""
        return f"{format_number(self.value, self.unit)} {self.comparison} {format_number(self.threshold, self.unit)}"


def format_number(value: float | None, unit: str = "") -> str:
    """Human text of a figure: bytes as MiB, percentages with 2 decimals, others with 4 significant digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB"
    if unit == "%":
        return f"{value:.2f} %"
    return f"{value:.4g}{(' ' + unit) if unit else ''}"


def _compare(value: float | None, threshold: float, comparison: str) -> bool:
    if value is None or math.isnan(value):
        return False
    return value <= threshold if comparison == "<=" else value >= threshold


def reference_metric(evaluation: dict[str, Any], key: str) -> Any:
    """A metric of the uncompressed reference from an evaluate() result (`reference` dict or `reference_<key>`)."""
    reference = evaluation.get("reference")
    if isinstance(reference, dict) and reference.get(key) is not None:
        return reference[key]
    return evaluation.get(f"reference_{key}")


def _accuracy_value(accuracy: Any) -> float | None:
    """The task accuracy a check compares: multiple choice's `overall`, else image QA's closed-question value."""
    if isinstance(accuracy, dict):
        value = accuracy.get("overall")
        if value is None and isinstance(accuracy.get("closed"), dict):
            value = accuracy["closed"].get("value")
        return float(value) if value is not None else None
    return float(accuracy) if isinstance(accuracy, int | float) else None


def measured_memory_bytes(evaluation: dict[str, Any], profile: DeviceProfile) -> int | None:
    """The measured figure that competes for the profile's model tier (see the module docstring)."""
    rss = evaluation.get("peak_rss_bytes")
    vram = evaluation.get("peak_vram_bytes")
    kind = profile.model_memory_tier.kind
    if kind == "device" and vram:
        return int(vram)
    if kind == "unified" and vram and rss is not None:
        return int(rss) + int(vram)
    return int(rss) if rss is not None else None


def perplexity_increase_pct(evaluation: dict[str, Any]) -> float | None:
    """(ppl / ppl_reference - 1) * 100, or None when either is missing."""
    ppl = evaluation.get("perplexity")
    reference = reference_metric(evaluation, "perplexity")
    if ppl is None or not reference:
        return None
    return (float(ppl) / float(reference) - 1.0) * 100.0


def _speed_check(name: str, speed: Any, minimum: float, detail: str, blocking: bool = False) -> Check:
    """A decode speed check: speed >= the profile's minimum (None when not measured); reported only by default."""
    return Check(
        name,
        _compare(speed, minimum, ">="),
        None if speed is None else float(speed),
        minimum,
        ">=",
        "tok/s",
        blocking=blocking,
        detail=detail,
    )


def _prediction_error_check(measured: Any, target_speed: dict[str, Any]) -> Check | None:
    """The host profile's prediction against its measurement (None when either is missing)."""
    predicted = target_speed.get("decode_tokens_per_s")
    if not measured or predicted is None:
        return None
    error = (float(predicted) / float(measured) - 1.0) * 100.0
    band = target_speed.get("error_band") or {}
    limit = band.get("p90_abs_error_pct", PREDICTION_ERROR_TARGET_PCT)
    why = (
        f"the simulator's 90th-percentile decode error ({band['source']})"
        if band
        else f"issue 15's {PREDICTION_ERROR_TARGET_PCT:g} % target (no accuracy record)"
    )
    return Check(
        "decode_prediction_error_pct",
        abs(error) <= limit,
        round(abs(error), 2),
        limit,
        "<=",
        "%",
        blocking=False,
        detail=f"predicted {float(predicted):.2f} tok/s against {float(measured):.2f} measured ({error:+.1f} %); "
        f"threshold: {why}; grades the simulator, not the deployment (reported only)",
    )


def build_checks(
    evaluation: dict[str, Any],
    profile: DeviceProfile,
    candidate: Candidate,
    budget_bytes: int,
    target_speed: dict[str, Any] | None = None,
) -> list[Check]:
    """The checks of one validated attempt (see the module docstring for each formula)."""
    floor = profile.quality_floor
    max_increase = floor.max_perplexity_increase_pct.value
    checks: list[Check] = []

    increase = perplexity_increase_pct(evaluation)
    checks.append(
        Check(
            "perplexity_increase_pct",
            _compare(increase, max_increase, "<="),
            increase,
            max_increase,
            "<=",
            "%",
            detail=f"perplexity {format_number(evaluation.get('perplexity'))} vs reference "
            f"{format_number(reference_metric(evaluation, 'perplexity'))}; floor: profile "
            "quality_floor.max_perplexity_increase_pct",
        )
    )
    kl = evaluation.get("kl_divergence")
    kl_max = math.log1p(max_increase / 100.0)
    checks.append(
        Check(
            "kl_divergence",
            _compare(kl, kl_max, "<="),
            None if kl is None else float(kl),
            round(kl_max, 6),
            "<=",
            "nats",
            detail="mean KL(reference || compressed) per token; threshold ln(1 + perplexity floor)",
        )
    )
    top1 = evaluation.get("top1_agreement")
    checks.append(
        Check(
            "top1_agreement",
            _compare(top1, TOP1_AGREEMENT_MIN, ">="),
            None if top1 is None else float(top1),
            TOP1_AGREEMENT_MIN,
            ">=",
            blocking=False,
            detail="share of positions where compressed and reference rank the same token first "
            "(Bedside policy figure, reported only)",
        )
    )
    accuracy = _accuracy_value(evaluation.get("accuracy"))
    reference_accuracy = _accuracy_value(reference_metric(evaluation, "accuracy"))
    if accuracy is not None:
        if reference_accuracy is None:
            retention = None
        else:  # a reference that scores 0 cannot be fallen short of
            retention = accuracy / reference_accuracy * 100.0 if reference_accuracy else 100.0
        minimum = floor.min_accuracy_retention_pct.value
        checks.append(
            Check(
                "accuracy_retention_pct",
                _compare(retention, minimum, ">="),
                retention,
                minimum,
                ">=",
                "%",
                detail=f"task accuracy {accuracy:.3f} vs reference {format_number(reference_accuracy)}",
            )
        )
    gpu_tier = profile.model_memory_tier.kind == "device"
    if gpu_tier:
        device = str(evaluation.get("device") or "unknown")
        checks.append(
            Check(
                "runtime_device",
                device.startswith("cuda"),
                None,
                None,
                "",
                detail=f"ran on {device}; the profile budgets GPU memory ({profile.model_tier}), so a CPU "
                "fallback is no validation: run on the GPU (`make setup GPU=cuda`)",
            )
        )
    memory = measured_memory_bytes(evaluation, profile)
    vram_missing = gpu_tier and not evaluation.get("peak_vram_bytes")
    checks.append(
        Check(
            "peak_memory_bytes",
            False if vram_missing else _compare(memory, budget_bytes, "<="),
            memory,
            budget_bytes,
            "<=",
            "bytes",
            detail=("RSS measured where VRAM was budgeted (no GPU memory figure); " if vram_missing else "")
            + f"runtime with the KV cache filled to {evaluation.get('context', profile.context_length)} "
            f"tokens; planner estimate {format_number(candidate.memory.total_bytes, 'bytes')}",
            extra={"estimate_bytes": candidate.memory.total_bytes},
        )
    )
    host_limit = host_budget(profile)
    rss = evaluation.get("peak_rss_bytes")
    placed = candidate.kv_on_host or candidate.gpu_layers is not None
    if placed and host_limit is not None and evaluation.get("peak_vram_bytes"):
        checks.append(
            Check(
                "peak_host_memory_bytes",
                _compare(rss, host_limit, "<="),
                rss,
                host_limit,
                "<=",
                "bytes",
                detail="process RSS with layers or the KV cache in host memory beside the GPU; planner estimate "
                f"{format_number(candidate.memory.host_bytes, 'bytes')}",
                extra={"estimate_bytes": candidate.memory.host_bytes},
            )
        )
    minimum_speed = profile.min_decode_tokens_per_s.value
    on_host = profile.name == HOST_PROFILE
    measured_speed = evaluation.get("decode_tokens_per_s")
    checks.append(
        _speed_check(
            HOST_SPEED_CHECK,
            measured_speed,
            minimum_speed,
            HOST_IS_TARGET_NOTE if on_host else HOST_SPEED_NOTE,
            blocking=on_host,
        )
    )
    if target_speed is not None:
        checks.append(
            _speed_check(
                "decode_tokens_per_s_target",
                target_speed.get("decode_tokens_per_s"),
                minimum_speed,
                describe(target_speed),
            )
        )
        if on_host:
            graded = _prediction_error_check(measured_speed, target_speed)
            checks.extend([graded] if graded is not None else [])
    return checks


def blocking_failures(checks: list[Check]) -> list[Check]:
    """The failed checks that stop a deployment (quality floor, memory budget)."""
    return [check for check in checks if check.blocking and not check.passed]


def explain_failures(checks: list[Check]) -> str:
    """One line naming every blocking failure with its number and threshold."""
    failures = blocking_failures(checks)
    return "; ".join(f"{check.name} {check.describe()} failed" for check in failures) or "all checks passed"
