"""Speed on the target device, predicted by the simulator (toolkit/plan/simulator.py) for a validated export.

Validation measures speed on the build host; the target's speed is the simulator's prediction for the same file
on the profile's memory tiers, at the profile's context, with the placement and KV precision the plan chose:

    predicted = simulate(read_artifact_workload(artifact, profile, runtime settings of the candidate), profile)

The figure is a prediction, shown with an error band: the simulator's measured decode error on the build host
(toolkit.plan.calibration.decode_error_band, from docs/benchmarks/simulator_accuracy.json), as the range the
measurement falls in when the prediction errs by the median. Where the target's efficiencies are assumptions
(no calibration for its processor, e.g. any GPU), the band is what the host showed and the target's own error is
unmeasured; the text says so. A workload the simulator cannot describe leaves the prediction out with the reason
instead of failing the deploy. How the checks use it: toolkit.validate.checks (blocking only where the target
is this host, and there on the measurement).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.core.errors import BedsideError
from toolkit.plan.calibration import decode_error_band
from toolkit.plan.schema import Candidate
from toolkit.plan.simulator import simulate
from toolkit.plan.workload import read_artifact_workload
from toolkit.target.schema import DeviceProfile

ACCURACY_NOTE = "simulator prediction; its accuracy on the build host is in docs/SIMULATOR.md"
UNCALIBRATED_NOTE = (
    "the target's efficiencies are assumptions, not calibrated on that device: its own error is unmeasured"
)


def runtime_settings(candidate: Candidate) -> dict[str, Any]:
    """The runtime.json keys the simulator reads for a candidate's KV precision and placement."""
    return {
        "kv_cache_dtype": candidate.kv_cache_dtype,
        "gpu_layers": candidate.gpu_layers,
        "kv_offload": not candidate.kv_on_host,
    }


def error_band(runtime: str, decode_tokens_per_s: float, calibrated: bool) -> dict[str, Any] | None:
    """The prediction's error band as report.json keeps it (None without an accuracy record)."""
    band = decode_error_band(runtime)
    if band is None:
        return None
    low, high = band.measured_range(decode_tokens_per_s)
    return {
        "median_abs_error_pct": band.median_abs_error_pct,
        "p90_abs_error_pct": band.p90_abs_error_pct,
        "points": band.points,
        "decode_low_tokens_per_s": round(low, 3),
        "decode_high_tokens_per_s": None if high == float("inf") else round(high, 3),
        "calibrated": calibrated,
        "source": band.source + ("" if calibrated else f"; {UNCALIBRATED_NOTE}"),
    }


def predict_target_speed(
    artifact: Path, candidate: Candidate, profile: DeviceProfile, context: int
) -> dict[str, Any]:
    """{"decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "oom_context", "placement", "context",
    "efficiency_source", "error_band", "note"} of the artifact on the profile; {"error": reason} when it cannot be
    predicted."""
    try:
        workload = read_artifact_workload(artifact, profile, runtime_settings(candidate))
        result = simulate(workload, profile, context)
        calibrated = not any("assumption" in str(f["source"]) for f in result.efficiency.values())
        band = error_band(result.runtime, result.decode_tokens_per_s, calibrated)
    except BedsideError as error:
        return {"error": str(error)}
    layers = workload.num_layers
    sources = sorted({str(figures["source"]) for figures in result.efficiency.values()})
    return {
        "decode_tokens_per_s": round(result.decode_tokens_per_s, 3),
        "prefill_tokens_per_s": round(result.prefill_tokens_per_s, 3),
        "ttft_s": round(result.ttft_s, 4),
        "oom_context": result.oom_context,
        "placement": result.placement.label(layers),
        "context": result.context,
        "efficiency_source": "; ".join(sources),
        "error_band": band,
        "note": ACCURACY_NOTE,
    }


def describe_band(prediction: dict[str, Any]) -> str:
    """'likely 8.1-23.4 tok/s (...)': the measured range the band gives, with its source; '' without a band."""
    band = prediction.get("error_band")
    if not band:
        return ""
    high = band["decode_high_tokens_per_s"]
    upper = f"{high:.1f}" if high is not None else "unbounded"
    return (
        f"likely {band['decode_low_tokens_per_s']:.1f}-{upper} tok/s decode if it errs by the median "
        f"({band['median_abs_error_pct']:g} %; source: {band['source']})"
    )


def describe(prediction: dict[str, Any] | None) -> str:
    """One line for reports and bundles: the predicted speed with its error band, or why there is none."""
    if not prediction:
        return "not predicted"
    if "error" in prediction:
        return f"not predicted: {prediction['error']}"
    runs_out = (
        "fits the context"
        if prediction["oom_context"] is None
        else f"memory runs out at {prediction['oom_context']} tokens"
    )
    band = describe_band(prediction)
    return (
        f"predicted {prediction['decode_tokens_per_s']:.1f} tok/s decode, {prediction['prefill_tokens_per_s']:.0f} tok/s "
        f"prefill, {prediction['ttft_s']:.2f} s to the first token at {prediction['context']} tokens "
        f"({prediction['placement']}; {runs_out}); {band + '; ' if band else ''}{ACCURACY_NOTE}"
    )
