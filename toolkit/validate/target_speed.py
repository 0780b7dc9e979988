"""Speed on the target device, predicted by the simulator (toolkit/plan/simulator.py) for a validated export.

Validation measures speed on the build host; the target's speed is the simulator's prediction for the same file
on the profile's memory tiers, at the profile's context, with the placement and KV precision the plan chose:

    predicted = simulate(read_artifact_workload(artifact, profile, runtime settings of the candidate), profile)

The figure is a prediction with the simulator's calibration and its measured accuracy (docs/SIMULATOR.md); it is
reported, never a blocking check. A workload the simulator cannot describe leaves the prediction out with the
reason instead of failing the deploy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from toolkit.core.errors import BedsideError
from toolkit.plan.schema import Candidate
from toolkit.plan.simulator import simulate
from toolkit.plan.workload import read_artifact_workload
from toolkit.target.schema import DeviceProfile

ACCURACY_NOTE = "simulator prediction; its accuracy on the build host is in docs/SIMULATOR.md"


def runtime_settings(candidate: Candidate) -> dict[str, Any]:
    """The runtime.json keys the simulator reads for a candidate's KV precision and placement."""
    return {
        "kv_cache_dtype": candidate.kv_cache_dtype,
        "gpu_layers": candidate.gpu_layers,
        "kv_offload": not candidate.kv_on_host,
    }


def predict_target_speed(
    artifact: Path, candidate: Candidate, profile: DeviceProfile, context: int
) -> dict[str, Any]:
    """{"decode_tokens_per_s", "prefill_tokens_per_s", "ttft_s", "oom_context", "placement", "context",
    "efficiency_source", "note"} of the artifact on the profile; {"error": reason} when it cannot be predicted."""
    try:
        workload = read_artifact_workload(artifact, profile, runtime_settings(candidate))
        result = simulate(workload, profile, context)
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
        "note": ACCURACY_NOTE,
    }


def describe(prediction: dict[str, Any] | None) -> str:
    """One line for reports and bundles: the predicted speed, or why there is none."""
    if not prediction:
        return "not predicted"
    if "error" in prediction:
        return f"not predicted: {prediction['error']}"
    runs_out = (
        "fits the context"
        if prediction["oom_context"] is None
        else f"memory runs out at {prediction['oom_context']} tokens"
    )
    return (
        f"predicted {prediction['decode_tokens_per_s']:.1f} tok/s decode, {prediction['prefill_tokens_per_s']:.0f} tok/s "
        f"prefill, {prediction['ttft_s']:.2f} s to the first token at {prediction['context']} tokens "
        f"({prediction['placement']}; {runs_out}); {ACCURACY_NOTE}"
    )
