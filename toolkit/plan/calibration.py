"""Efficiencies of the simulator's epoch model, per runtime and processor, read from the host calibration record.

    time(epoch) = sum over segments max(bytes / (bandwidth x bandwidth_efficiency),
                                        flops / (peak x compute_efficiency)) + step_overhead_s + link transfers

The record, docs/benchmarks/simulator_calibration.json, is written by `python -m bench.simulator calibrate`:
measured prefill and decode times of llama.cpp and ONNX Runtime on this machine (runtimes.measure jobs, the
ones `bedside eval` runs), fitted against the epoch model with the memory bandwidth measured beside each run
(toolkit.target.host.measure_memory_bandwidth) and the profile's compute peak. It holds the commands and the
fit residuals. Processors the record lacks (GPUs: none here) get DEFAULTS, marked as assumptions; DEFAULTS["cuda"]
is a fit to public decode speeds on Jetson Orin boards (bench/simulator_anchors.py), not a measurement of ours.

The simulator's measured accuracy, docs/benchmarks/simulator_accuracy.json (`python -m bench.simulator accuracy`:
predictions against measurements at contexts the fit never saw), gives the error band a prediction is shown with
(decode_error_band): the median and 90th percentile of |predicted / measured - 1| over the runtime's decode rows.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from toolkit.core.errors import BedsideError
from toolkit.core.paths import REPO_ROOT

CALIBRATION_PATH = REPO_ROOT / "docs" / "benchmarks" / "simulator_calibration.json"
CALIBRATION_ENV = "BEDSIDE_SIMULATOR_CALIBRATION"
ACCURACY_PATH = REPO_ROOT / "docs" / "benchmarks" / "simulator_accuracy.json"
ACCURACY_ENV = "BEDSIDE_SIMULATOR_ACCURACY"


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the profile's bandwidth and compute peak a runtime reaches, and its fixed cost per step."""

    bandwidth: float
    compute: float
    step_overhead_s: float
    source: str


# Not calibrated on any machine of ours: "cpu" is a starting point; "cuda" has its bandwidth efficiency and step
# overhead fitted to others' published llama.cpp decode speeds on Jetson Orin boards (least squares on log time,
# `python -m bench.simulator anchors`, bench/simulator_anchors.py; the anchors, the fit's errors and its
# leave-one-out errors are in docs/SIMULATOR.md), its compute efficiency (which decode does not constrain) an
# assumption. Both stay marked as assumptions (the sources say so) until a device run calibrates them.
DEFAULTS: dict[str, Efficiency] = {
    "cpu": Efficiency(0.5, 0.3, 0.002, "assumption, not calibrated: no calibration record for this runtime on a CPU"),
    "cuda": Efficiency(
        0.508, 0.3, 0.00319,
        "assumption, not calibrated on a GPU here: bandwidth efficiency and step overhead fitted to public llama.cpp "
        "decode speeds on Jetson Orin (docs/benchmarks/simulator_anchors.json, `.venv/bin/python -m bench.simulator "
        "anchors`); 30 % of peak compute not fitted",
    ),
}  # fmt: skip


def calibration_path() -> Path:
    return Path(os.environ.get(CALIBRATION_ENV, CALIBRATION_PATH))


def read_calibration(path: Path | None = None) -> dict:
    """The calibration record, or {} when there is none (then DEFAULTS apply)."""
    path = path or calibration_path()
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BedsideError(f"simulator calibration {path} is not readable JSON ({error})") from None
    if not isinstance(record, dict) or not isinstance(record.get("runtimes", {}), dict):
        raise BedsideError(f"simulator calibration {path} has no 'runtimes' object")
    return record


def efficiency_for(
    runtime: str, processor: str, record: dict | None = None, scheme: str | None = None
) -> Efficiency:
    """Calibrated efficiency of `runtime` on `processor` ("cpu" or "cuda"), else the processor's default.

    A record entry holds the runtime's own figures (the median over the schemes it was fitted on) and, under
    `schemes`, each measured scheme's bandwidth and compute efficiency: kernels differ by storage type (on the
    build host llama.cpp streams Q8_0 weights ~1.5x faster per byte than the Q5_0-heavy Q4_K_M of the demo
    model). A scheme without its own entry gets the runtime's figures.
    """
    record = read_calibration() if record is None else record
    entry = record.get("runtimes", {}).get(runtime, {}).get(processor)
    if not isinstance(entry, dict):
        return DEFAULTS.get(processor, DEFAULTS["cpu"])
    try:
        bandwidth = float(entry["bandwidth_efficiency"])
        compute = float(entry["compute_efficiency"])
        overhead = float(entry["step_overhead_s"])
        which = "runtime median"
        by_scheme = entry.get("schemes", {}) or {}
        if scheme is not None and isinstance(by_scheme.get(scheme), dict):
            bandwidth = float(by_scheme[scheme]["bandwidth_efficiency"])
            compute = float(by_scheme[scheme]["compute_efficiency"])
            which = f"scheme {scheme}"
        elif scheme is not None:
            which = f"runtime median; scheme {scheme} not calibrated"
    except (KeyError, TypeError, ValueError) as error:
        raise BedsideError(
            f"simulator calibration: runtimes.{runtime}.{processor} is incomplete ({error})"
        ) from None
    return Efficiency(
        bandwidth=bandwidth,
        compute=compute,
        step_overhead_s=overhead,
        source=f"calibrated on the build host ({which}; `{record.get('command', 'bench.simulator calibrate')}`, "
        f"{record.get('fitted', 'date unknown')})",
    )


@dataclass(frozen=True)
class ErrorBand:
    """How far the simulator's decode predictions fell from measurements on the build host (accuracy record)."""

    median_abs_error_pct: float
    p90_abs_error_pct: float
    points: int
    runtime: str  # the runtime whose rows these are ("all runtimes" when the record has none of it)
    source: str

    def measured_range(self, predicted: float) -> tuple[float, float]:
        """Where the measurement lies when the prediction errs by at most the median: error = predicted /
        measured - 1 in [-m, +m] gives measured in [predicted / (1 + m), predicted / (1 - m)] (no upper end
        when m >= 100 %)."""
        m = self.median_abs_error_pct / 100
        return predicted / (1 + m), (predicted / (1 - m) if m < 1 else math.inf)


def accuracy_path() -> Path:
    return Path(os.environ.get(ACCURACY_ENV, ACCURACY_PATH))


def _nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def decode_error_band(runtime: str, path: Path | None = None) -> ErrorBand | None:
    """The decode error band of `runtime` from the accuracy record (every runtime's rows when it has none of
    this one); None when there is no record or it holds no decode errors."""
    path = path or accuracy_path()
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        rows = [row for row in record.get("rows", []) if isinstance(row.get("decode_error_pct"), int | float)]
    except (OSError, json.JSONDecodeError, AttributeError) as error:
        raise BedsideError(f"simulator accuracy record {path} is not readable ({error})") from None
    own = [row for row in rows if row.get("runtime") == runtime]
    chosen, which = (own, runtime) if own else (rows, "all runtimes")
    if not chosen:
        return None
    errors = [abs(float(row["decode_error_pct"])) for row in chosen]
    median, p90 = round(statistics.median(errors), 1), round(_nearest_rank(errors, 90), 1)
    contexts = sorted({int(row["context"]) for row in chosen if "context" in row})
    return ErrorBand(
        median_abs_error_pct=median,
        p90_abs_error_pct=p90,
        points=len(errors),
        runtime=which,
        source=f"the simulator's decode error on the build host's CPU, {which}: median |predicted / measured - 1| "
        f"{median:g} %, 90th percentile {p90:g} % over {len(errors)} predictions at contexts "
        f"{', '.join(map(str, contexts))} (`{record.get('command', 'bench.simulator accuracy')}`, "
        f"{record.get('computed', 'date unknown')}; docs/benchmarks/{path.name}, docs/SIMULATOR.md)",
    )
