"""Simulator benchmark: measure the demo model's step times on this host, calibrate, compare predictions.

Run from the repository root (resumes: exports are cached, finished measurements are skipped):

    .venv/bin/python -m bench.simulator measure      # raw step times -> docs/benchmarks/simulator_measurements.json
    .venv/bin/python -m bench.simulator calibrate    # fit -> docs/benchmarks/simulator_calibration.json
    .venv/bin/python -m bench.simulator accuracy     # predictions vs measurements -> docs/SIMULATOR.md table
    .venv/bin/python -m bench.simulator anchors      # public GPU figures vs predictions, CUDA fit -> the same doc

Artifacts: GGUF F16, Q8_0, Q4_K_M, Q4_0 of the demo model (llama.cpp) and ONNX int4_b32 (ONNX Runtime),
exported once under ~/.cache/bedside/bench/simulator. Each measurement is one
`runtimes.measure.measure_in_child` job, the same job `bedside eval` runs: load with n_ctx = context,
prefill context - 32 tokens (FILLER_TEXT repeated), decode 32 tokens greedily, CPU, `--threads` threads.
The host bandwidth (`toolkit.target.host.measure_memory_bandwidth`, uncached) and the load average are
recorded beside every measurement.

Two sets, never mixed: the calibration set (contexts 512 and 1536) is what the efficiencies are fitted on;
the accuracy set (contexts 256, 1024 and 2048) is what the predictions are compared with.

`anchors` measures nothing: it puts published llama.cpp decode speeds on Jetson Orin boards beside the simulator's
predictions and fits the CUDA efficiencies on them (bench/simulator_anchors.py; `all` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS_DIR,
    bench_cache_dir,
    command_line,
    load_average,
    markdown_table,
    read_json,
    replace_section,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from runtimes.measure import MeasureJob, measure_in_child
from toolkit.core.paths import REPO_ROOT
from toolkit.model.source import resolve_model_dir
from toolkit.target.host import measure_memory_bandwidth

MEASUREMENTS = RESULTS_DIR / "simulator_measurements.json"
ANCHORS = RESULTS_DIR / "simulator_anchors.json"
CALIBRATION = RESULTS_DIR / "simulator_calibration.json"
ACCURACY = RESULTS_DIR / "simulator_accuracy.json"
DOC = REPO_ROOT / "docs" / "SIMULATOR.md"
ARTIFACTS: tuple[tuple[str, str], ...] = (
    ("gguf", "Q8_0"),
    ("gguf", "Q4_K_M"),
    ("gguf", "Q4_0"),
    ("gguf", "F16"),
    ("onnx", "int4_b32"),
)
RUNTIME_OF = {"gguf": "llama.cpp", "onnx": "onnxruntime"}
CALIBRATION_CONTEXTS = (512, 1536)
ACCURACY_CONTEXTS = (256, 1024, 2048)
DECODE_TOKENS = 32
THREADS = 2


def artifact_path(format_name: str, quant: str) -> Path:
    """The cached export (made on first use): a .gguf file or an ONNX export folder."""
    from exporters import export

    out_dir = bench_cache_dir("simulator") / f"{format_name}-{quant}"
    if format_name == "gguf":
        found = sorted(out_dir.glob("*.gguf"))
        if not found:
            export(resolve_model_dir("demo"), "gguf", quant, out_dir, threads=1)
            found = sorted(out_dir.glob("*.gguf"))
        return found[0]
    if not (out_dir / "export.json").is_file():
        export(resolve_model_dir("demo"), "onnx", quant, out_dir)
    return out_dir


def measure_key(format_name: str, quant: str, context: int) -> str:
    return f"{format_name}/{quant}@{context}"


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures calibrate and accuracy read: medians over the repeated runs (per-run figures kept in `runs`)."""
    first = runs[0]
    prefill = statistics.median(run["prefill_seconds"] for run in runs)
    decode = statistics.median(run["decode_seconds"] for run in runs)
    return {
        "prefill_tokens": first["prefill_tokens"],
        "prefill_seconds": prefill,
        "decode_tokens": first["decode_tokens"],
        "decode_seconds": decode,
        "prefill_tok_s": round(first["prefill_tokens"] / prefill, 3),
        "decode_tok_s": round(first["decode_tokens"] / decode, 3),
        "host_bandwidth_gb_s": round(statistics.median(run["host_bandwidth_gb_s"] for run in runs), 3),
        "loadavg_before": first["loadavg_before"],
        "loadavg_after": runs[-1]["loadavg_after"],
        "measured": runs[-1]["measured"],
        "repeats": len(runs),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (artifact, context) job `--repeats` times (rounds over the whole grid, so that a drift of the host's
    speed spreads over every job), skipping runs already recorded; each job's figures are the median run's."""
    results = read_json(MEASUREMENTS) if not args.fresh else {}
    results.setdefault("runs", []).append({"command": command_line(), "started": utc_now()})
    results["setup"] = {
        "model": "demo (SmolLM2-135M-Instruct)",
        "job": f"runtimes.measure.MeasureJob(context=C, decode_tokens={DECODE_TOKENS}, n_threads={args.threads}, "
        "device='cpu'), FILLER_TEXT prompt: what `bedside eval --context C --threads T` measures",
        "threads": args.threads,
        "repeats": args.repeats,
        "summary": "median prefill and decode seconds over the repeats, median bandwidth",
        "calibration_contexts": list(CALIBRATION_CONTEXTS),
        "accuracy_contexts": list(ACCURACY_CONTEXTS),
    }
    entries = results.setdefault("measurements", {})
    contexts = sorted({*CALIBRATION_CONTEXTS, *ACCURACY_CONTEXTS})
    for _round in range(args.repeats):
        for context in contexts:
            for format_name, quant in ARTIFACTS:
                key = measure_key(format_name, quant, context)
                runs = entries.get(key, {}).get("runs", [])
                if len(runs) >= args.repeats:
                    continue
                path = artifact_path(format_name, quant)
                bandwidth, _ = measure_memory_bandwidth.__wrapped__(args.threads, 256, 1.0)
                load_before = load_average()
                job = MeasureJob(
                    context=context, decode_tokens=DECODE_TOKENS, n_threads=args.threads, device="cpu"
                )
                measured = measure_in_child(RUNTIME_OF[format_name], path, job, timeout_s=1800)
                runs.append(
                    {
                        "prefill_tokens": measured.prefill_tokens,
                        "prefill_seconds": measured.prefill_seconds,
                        "decode_tokens": measured.decode_tokens,
                        "decode_seconds": measured.decode_seconds,
                        "host_bandwidth_gb_s": round(bandwidth, 3),
                        "loadavg_before": load_before,
                        "loadavg_after": load_average(),
                        "measured": utc_now(),
                    }
                )
                entries[key] = {
                    "format": format_name,
                    "quant": quant,
                    "runtime": RUNTIME_OF[format_name],
                    "path": str(path),
                    "context": context,
                    "set": "calibration" if context in CALIBRATION_CONTEXTS else "accuracy",
                    "threads": args.threads,
                    **_summary(runs),
                    "runs": runs,
                }
                write_json_atomic(MEASUREMENTS, results)
                print(
                    f"{key} run {len(runs)}: prefill {measured.prefill_tokens_per_s:.1f} tok/s, decode "
                    f"{measured.decode_tokens_per_s:.2f} tok/s, bandwidth {bandwidth:.2f} GB/s, "
                    f"load {runs[-1]['loadavg_after']}",
                    flush=True,
                )
    results["runs"][-1]["finished"] = utc_now()
    write_json_atomic(MEASUREMENTS, results)
    return results


# ---------------------------------------------------------------------------------------------
# Calibration: fit the epoch model's efficiencies on the calibration set

EB_GRID = np.geomspace(0.02, 2.0, 60)  # bandwidth efficiency
EC_GRID = np.geomspace(1e-4, 1.0, 80)  # compute efficiency
OVERHEAD_GRID = np.linspace(0.0, 0.05, 51)  # seconds per step
UNIT_RECORD = {
    "runtimes": {
        runtime: {"cpu": {"bandwidth_efficiency": 1.0, "compute_efficiency": 1.0, "step_overhead_s": 0.0}}
        for runtime in RUNTIME_OF.values()
    }
}


def host_profile_at(bandwidth_gb_s: float) -> Any:
    """The "host" profile with the RAM bandwidth measured beside a run (what `--profile host` saw then)."""
    from toolkit.target.host import detect_host_profile
    from toolkit.target.schema import Figure

    profile = detect_host_profile()
    figure = Figure(value=bandwidth_gb_s, source="measured beside the run (bench.simulator measure)")
    tiers = [
        tier.model_copy(update={"bandwidth_gbs": figure, "sustained_bandwidth_gbs": figure})
        if tier.name == profile.model_tier
        else tier
        for tier in profile.memory_tiers
    ]
    return profile.model_copy(update={"memory_tiers": tiers})


def unit_terms(entry: dict[str, Any]) -> dict[str, Any]:
    """Memory and compute seconds at efficiency 1 of every segment of the run's prefill and decode epochs."""
    from toolkit.plan.simulator import Placement, decode_epochs, epoch, make_target, prefill_epochs
    from toolkit.plan.workload import read_artifact_workload

    profile = host_profile_at(entry["host_bandwidth_gb_s"])
    workload = read_artifact_workload(Path(entry["path"]), profile)
    target = make_target(profile, workload.runtime, entry["threads"], UNIT_RECORD, workload.quant)
    placement = Placement("device", workload.num_layers)
    terms = {}
    for phase, calls in (
        ("prefill", prefill_epochs(workload, entry["prefill_tokens"])),
        ("decode", decode_epochs(entry["prefill_tokens"], entry["decode_tokens"])),
    ):
        memory, compute = [], []
        for call in calls:
            for segment in epoch(workload, target, placement, *call).segments:
                memory.append(segment.memory_units())
                compute.append(segment.compute_units())
        terms[phase] = (np.array(memory), np.array(compute), len(calls), entry[f"{phase}_seconds"])
    return terms


def _grid_seconds(memory: np.ndarray, compute: np.ndarray) -> np.ndarray:
    """sum over segments of max(memory / eb, compute / ec), for every (eb, ec) of the grid."""
    return np.maximum(
        memory[None, None, :] / EB_GRID[:, None, None], compute[None, None, :] / EC_GRID[None, :, None]
    ).sum(axis=-1)


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Per runtime: one step overhead, and per scheme a bandwidth and compute efficiency (least squares on log time)."""
    measurements = read_json(MEASUREMENTS).get("measurements", {})
    points = [entry for entry in measurements.values() if entry["set"] == "calibration"]
    if not points:
        raise SystemExit("no calibration measurements: run `python -m bench.simulator measure` first")
    record: dict[str, Any] = {
        "schema_version": 1,
        "kind": "simulator_calibration",
        "command": command_line(),
        "measure_command": ".venv/bin/python -m bench.simulator measure --threads "
        + str(points[0]["threads"]),
        "fitted": utc_now(),
        "model": "toolkit/plan/simulator.py epoch model, toolkit/plan/calibration.py reads this record",
        "method": "grid search, least squares of log(predicted / measured) over prefill and decode time of the "
        "calibration set; one step overhead per runtime, bandwidth and compute efficiency per scheme; the "
        "bandwidth of each run is the one measured beside it",
        "host": {"cpu": host_profile_at(1.0).compute.cpu_model, "threads": points[0]["threads"]},
        "runtimes": {},
    }
    for runtime in sorted({entry["runtime"] for entry in points}):
        by_scheme: dict[str, list[tuple]] = {}
        for entry in points:
            if entry["runtime"] == runtime:
                terms = unit_terms(entry)
                by_scheme.setdefault(entry["quant"], []).extend(terms.values())
        grids = {
            scheme: [
                (_grid_seconds(memory, compute), count, measured)
                for memory, compute, count, measured in items
            ]
            for scheme, items in by_scheme.items()
        }
        best: tuple[float, float, dict[str, tuple[float, float, float]]] | None = None
        for overhead in OVERHEAD_GRID:
            total = 0.0
            fitted = {}
            for scheme, items in grids.items():
                error = sum(
                    np.log((grid + count * overhead) / measured) ** 2 for grid, count, measured in items
                )
                i, j = np.unravel_index(np.argmin(error), error.shape)
                fitted[scheme] = (float(EB_GRID[i]), float(EC_GRID[j]), float(error[i, j]))
                total += float(error[i, j])
            if best is None or total < best[0]:
                best = (total, float(overhead), fitted)
        assert best is not None
        _, overhead, fitted = best
        residuals = []
        for scheme, items in grids.items():
            eb, ec, _ = fitted[scheme]
            i, j = int(np.argmin(np.abs(EB_GRID - eb))), int(np.argmin(np.abs(EC_GRID - ec)))
            residuals += [
                abs((grid[i, j] + count * overhead) / measured - 1) * 100 for grid, count, measured in items
            ]
        record["runtimes"][runtime] = {
            "cpu": {
                "bandwidth_efficiency": round(statistics.median(f[0] for f in fitted.values()), 4),
                "compute_efficiency": round(statistics.median(f[1] for f in fitted.values()), 4),
                "step_overhead_s": round(overhead, 5),
                "schemes": {
                    scheme: {"bandwidth_efficiency": round(eb, 4), "compute_efficiency": round(ec, 4)}
                    for scheme, (eb, ec, _) in sorted(fitted.items())
                },
                "points": len(residuals),
                "median_abs_error_pct": round(statistics.median(residuals), 1),
                "max_abs_error_pct": round(max(residuals), 1),
            }
        }
        print(f"{runtime}: {json.dumps(record['runtimes'][runtime]['cpu'])}", flush=True)
    write_json_atomic(CALIBRATION, record)
    return record


# ---------------------------------------------------------------------------------------------
# Accuracy: predictions for the accuracy set, with the calibration record


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from toolkit.plan.calibration import read_calibration
    from toolkit.plan.simulator import simulate
    from toolkit.plan.workload import read_artifact_workload

    record = read_calibration(CALIBRATION)
    if not record:
        raise SystemExit("no calibration record: run `python -m bench.simulator calibrate` first")
    measurements = read_json(MEASUREMENTS).get("measurements", {})
    rows = []
    for key, entry in sorted(
        measurements.items(), key=lambda item: (item[1]["format"], item[1]["quant"], item[1]["context"])
    ):
        if entry["set"] != "accuracy":
            continue
        profile = host_profile_at(entry["host_bandwidth_gb_s"])
        workload = read_artifact_workload(Path(entry["path"]), profile)
        result = simulate(workload, profile, entry["context"], threads=entry["threads"],
                          decode_tokens=entry["decode_tokens"], record=record)  # fmt: skip
        row = {
            "key": key,
            "format": entry["format"],
            "quant": entry["quant"],
            "runtime": entry["runtime"],
            "context": entry["context"],
            "measured_prefill_tok_s": entry["prefill_tok_s"],
            "predicted_prefill_tok_s": round(result.prefill_tokens_per_s, 3),
            "measured_decode_tok_s": entry["decode_tok_s"],
            "predicted_decode_tok_s": round(result.decode_tokens_per_s, 3),
            "host_bandwidth_gb_s": entry["host_bandwidth_gb_s"],
            "loadavg_after": entry["loadavg_after"],
        }
        for phase in ("prefill", "decode"):
            measured, predicted = row[f"measured_{phase}_tok_s"], row[f"predicted_{phase}_tok_s"]
            row[f"{phase}_error_pct"] = round((predicted / measured - 1) * 100, 1)
        rows.append(row)
    errors = [abs(row[f"{phase}_error_pct"]) for row in rows for phase in ("prefill", "decode")]
    summary = {
        "command": command_line(),
        "computed": utc_now(),
        "calibration_fitted": record.get("fitted"),
        "rows": rows,
        "median_abs_error_pct": round(statistics.median(errors), 1) if errors else None,
        "median_abs_error_pct_decode": round(statistics.median(abs(r["decode_error_pct"]) for r in rows), 1)
        if rows
        else None,
        "median_abs_error_pct_prefill": round(statistics.median(abs(r["prefill_error_pct"]) for r in rows), 1)
        if rows
        else None,
        "within_15_pct": sum(error <= 15 for error in errors),
        "points": len(errors),
        "repeats": sorted({entry.get("repeats", 1) for entry in measurements.values()}),
    }
    write_json_atomic(ACCURACY, summary)
    update_doc(summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)
    return summary


def update_doc(summary: dict[str, Any]) -> None:
    """Rewrite the accuracy table between the markers of docs/SIMULATOR.md."""
    table = markdown_table(
        ["artifact", "runtime", "context", "prefill measured", "prefill predicted", "error", "decode measured",
         "decode predicted", "error", "bandwidth GB/s", "load avg"],
        [
            [f"{r['format']} {r['quant']}", r["runtime"], r["context"], f"{r['measured_prefill_tok_s']:.1f}",
             f"{r['predicted_prefill_tok_s']:.1f}", f"{r['prefill_error_pct']:+.1f} %", f"{r['measured_decode_tok_s']:.2f}",
             f"{r['predicted_decode_tok_s']:.2f}", f"{r['decode_error_pct']:+.1f} %", f"{r['host_bandwidth_gb_s']:.2f}",
             "/".join(str(x) for x in r["loadavg_after"])]
            for r in summary["rows"]
        ],
    )  # fmt: skip
    body = (
        f"Command: `{summary['command']}` (after `measure` and `calibrate`; raw: "
        "`docs/benchmarks/simulator_measurements.json`, `simulator_calibration.json`, `simulator_accuracy.json`). "
        f"Measured: the median of {'/'.join(map(str, summary.get('repeats') or [1]))} run(s) per job, rounds over "
        f"the whole grid. Speeds in tokens/s; error = predicted / measured - 1. Median absolute error: **{summary['median_abs_error_pct']} %** "
        f"(prefill {summary['median_abs_error_pct_prefill']} %, decode {summary['median_abs_error_pct_decode']} %); "
        f"{summary['within_15_pct']} of {summary['points']} predictions within 15 %.\n\n{table}\n"
    )
    document = DOC.read_text(encoding="utf-8") if DOC.is_file() else "# Simulator\n"
    start, end = "<!-- simulator-accuracy:start -->", "<!-- simulator-accuracy:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in document and end in document:
        head, rest = document.split(start, 1)
        document = head + block + rest.split(end, 1)[1]
    else:
        document = document.rstrip() + "\n\n" + block + "\n"
    write_text_atomic(DOC, document)


def anchors(args: argparse.Namespace) -> dict[str, Any]:
    """Public decode speeds beside the simulator's predictions and the CUDA fit (bench/simulator_anchors.py):
    docs/benchmarks/simulator_anchors.json and the table between the simulator-anchors markers of docs/SIMULATOR.md."""
    from bench.simulator_anchors import doc_body
    from bench.simulator_anchors import run as run_anchors

    summary = run_anchors(command_line(), utc_now())
    write_json_atomic(ANCHORS, summary)
    document = DOC.read_text(encoding="utf-8") if DOC.is_file() else "# Simulator\n"
    write_text_atomic(DOC, replace_section(document, "simulator-anchors", doc_body(summary)))
    fit = summary["fit"]
    print(
        f"fit: bandwidth {fit['bandwidth_efficiency']}, step overhead {fit['overhead_s'] * 1000:g} ms, in-sample median "
        f"{fit['in_sample_median_abs_error_pct']} %, leave-one-out median {fit['leave_one_out_median_abs_error_pct']} %"
        f"; DEFAULTS['cuda'] is the fit: {summary['defaults_are_the_fit']}",
        flush=True,
    )
    for row in summary["rows"]:
        print(f"{row['key']}: measured {row['measured_tok_s']}, predicted {row['predicted_tok_s']} "
              f"(earlier {row['predicted_earlier_tok_s']}, fit {row['predicted_fit_tok_s']})", flush=True)  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=("measure", "calibrate", "accuracy", "all", "anchors"))
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--fresh", action="store_true", help="forget earlier measurements")
    parser.add_argument("--repeats", type=int, default=3, help="runs per job, the median kept (default 3)")
    args = parser.parse_args()
    if args.phase in ("measure", "all"):
        measure(args)
    if args.phase in ("calibrate", "all"):
        calibrate(args)
    if args.phase in ("accuracy", "all"):
        accuracy(args)
    if args.phase == "anchors":
        anchors(args)


if __name__ == "__main__":
    main()
