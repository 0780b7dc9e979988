"""Bench 2: AWQ on the demo model with 64 calibration sequences x 512 tokens: wall time and peak memory.

Run from the repository root (skips when docs/benchmarks/awq_budget.json already has a result;
`--fresh` measures again):

    .venv/bin/python -m bench.awq_budget

Targets (issue 17): at most 60 s with 2 threads on an idle machine, at most 1.5 GB peak resident memory for the
whole process. (Until 2026-12-06 this bench ran 128 x 256 tokens against 5 minutes / 3 GB.) AWQ runs in
a child process (`python -m bench.awq_budget --child RESULT.json`) so that its peak memory is its
own: the child reads `VmHWM` from /proc/self/status at the end (the kernel's high-water mark of
resident memory, as `runtimes/measure.py` does; `getrusage(RUSAGE_CHILDREN)` would carry the
parent's peak across exec). The child loads the model (float32) and the calibration data, then
times `toolkit.compress.quant.awq.awq(model, ids, "Q4_0")` with its default knobs (n_grid 10, 1024 search
tokens, clipping on every calibration token) on one torch thread: wall time and the process's CPU time (user + system;
on one thread, what the wall time would be on an otherwise idle core; `--threads N` for N). The load average before
and after is recorded: other work on the shared machine inflates the wall time. The child runs `--repeats` times
(3 by default) one after another, as the same run varies by a few seconds on this virtual machine: the median run's
figures are reported, the highest peak memory, and every run's time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    load_average,
    proc_status_bytes,
    read_json,
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
)
from toolkit.compress.quant.awq import awq
from toolkit.data import load_dataset_spec, make_blocks, split_calibration_eval
from toolkit.model.source import resolve_model_dir

RESULTS = RESULTS_DIR / "awq_budget.json"
SEQUENCES, SEQ_LEN, SEED = 64, 512, 0
SCHEME = "Q4_0"
TIME_TARGET_S, MEMORY_TARGET_BYTES = 60.0, 1.5e9  # issue 17


def child(result_path: Path, threads: int) -> None:
    """Load, calibrate, run AWQ; write times and memory to `result_path`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model_dir = resolve_model_dir("demo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    documents = load_dataset_spec("medquad") + load_dataset_spec("pubmedqa")
    calibration, _evaluation, record = split_calibration_eval(documents, 0.1, SEED)
    blocks = make_blocks(calibration, tokenizer, SEQ_LEN, SEQUENCES, SEED)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False
    ).eval()
    prepared = time.perf_counter() - start
    rss_before = proc_status_bytes("VmRSS")
    hwm_before = proc_status_bytes("VmHWM")
    load_start = load_average()
    awq_start = time.perf_counter()
    cpu_start = time.process_time()
    result = awq(model, blocks.input_ids, SCHEME, progress=False)
    awq_seconds = time.perf_counter() - awq_start
    awq_cpu_seconds = time.process_time() - cpu_start
    out = {
        "awq_seconds": round(awq_seconds, 2),
        "awq_cpu_seconds": round(awq_cpu_seconds, 2),
        "prepare_seconds": round(prepared, 2),
        "vm_hwm_bytes": proc_status_bytes("VmHWM"),
        "vm_hwm_before_awq_bytes": hwm_before,
        "vm_rss_before_awq_bytes": rss_before,
        "loadavg_awq_start": load_start,
        "loadavg_awq_end": load_average(),
        "threads": threads,
        "calibration": blocks.to_dict(),
        "calibration_sha256": record.calibration_sha256,
        "awq_record": {key: value for key, value in result.record.items() if key != "layers"},
    }
    result_path.write_text(json.dumps(out), encoding="utf-8")


def propagation(threads: int) -> dict[str, float]:
    """Seconds of one plain forward of the decoder layers over the same calibration ids (batches of 8), in float32
    and under bfloat16 autocast: the part of AWQ's time that only propagates each layer's inputs to the next."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    model_dir = resolve_model_dir("demo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    documents = load_dataset_spec("medquad") + load_dataset_spec("pubmedqa")
    calibration, _evaluation, _record = split_calibration_eval(documents, 0.1, SEED)
    ids = make_blocks(calibration, tokenizer, SEQ_LEN, SEQUENCES, SEED).input_ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False).eval()
    seconds = {}
    with torch.no_grad():
        for name, bf16 in (("float32", False), ("bfloat16_autocast", True)):
            start = time.perf_counter()
            for first in range(0, len(ids), 8):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    model.model(ids[first : first + 8])
            seconds[name] = round(time.perf_counter() - start, 2)
    return seconds


def run_child(threads: int) -> dict[str, Any]:
    """One AWQ child: its own figures, and the parent's view (wall time, load average, exit status)."""
    with tempfile.TemporaryDirectory(prefix="bedside-awq-budget-") as folder:
        result_path = Path(folder) / "result.json"
        load_start = load_average()
        start = time.perf_counter()
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        completed = subprocess.run(
            [sys.executable, "-m", "bench.awq_budget", "--child", str(result_path), "--threads", str(threads)],
            cwd=REPO_ROOT,
            env=env,
            check=False,
        )
        wall = time.perf_counter() - start
        if completed.returncode != 0 or not result_path.is_file():
            raise SystemExit(f"the AWQ child failed with exit status {completed.returncode}")
        measured = json.loads(result_path.read_text(encoding="utf-8"))
    return {"child_wall_seconds": round(wall, 2), "loadavg_start": load_start, "loadavg_end": load_average(), **measured}


def run(threads: int, repeats: int) -> dict[str, Any]:
    """``repeats`` children one after another; the figures of the median run by AWQ wall time (the machine is a
    shared VM: the same run varies by a few seconds), the peak memory of the highest, and every run's own."""
    runs = [run_child(threads) for _ in range(repeats)]
    median = sorted(runs, key=lambda entry: entry["awq_seconds"])[(len(runs) - 1) // 2]
    peak = max(entry["vm_hwm_bytes"] for entry in runs)
    return {
        "command": command_line(),
        "finished": utc_now(),
        "scheme": SCHEME,
        "sequences": SEQUENCES,
        "seq_len": SEQ_LEN,
        **median,
        "vm_hwm_bytes": peak,
        "repeats": repeats,
        "runs": [
            {key: entry[key] for key in ("awq_seconds", "awq_cpu_seconds", "vm_hwm_bytes", "loadavg_awq_start")}
            for entry in runs
        ],
        "time_target_seconds": TIME_TARGET_S,
        "memory_target_bytes": MEMORY_TARGET_BYTES,
        "meets_time_target": median["awq_seconds"] <= TIME_TARGET_S,
        "meets_memory_target": peak <= MEMORY_TARGET_BYTES,
    }


def cpu_text(result: dict[str, Any]) -> str:
    """The CPU-time part of the doc line: AWQ's own, or the whole child's sampled from /proc."""
    if "awq_cpu_seconds" in result:
        return f"CPU time {result['awq_cpu_seconds']:.0f} s"
    if "child_cpu_seconds_sampled" in result:
        return (
            f"CPU time of the whole child incl. data and model loading, sampled from /proc: "
            f"{result['child_cpu_seconds_sampled']:.0f} s"
        )
    return "CPU time not recorded"


def precision_text(result: dict[str, Any]) -> str:
    """How many scale groups the search ran in each precision, e.g. `` (scale groups: 89 bfloat16, 1 float32)``."""
    groups = result["awq_record"].get("search_precision_groups") or {}
    if not groups:
        return ""
    return " (scale groups: " + ", ".join(f"{count} {name}" for name, count in sorted(groups.items())) + ")"


def runs_text(result: dict[str, Any]) -> str:
    """Every run's AWQ wall time where the bench repeated it (the reported one is the median)."""
    runs = result.get("runs")
    if not runs:
        return "one run"
    times = ", ".join(f"{entry['awq_seconds']:.1f}" for entry in runs)
    return f"median of {len(runs)} runs: {times} s"


def render(result: dict[str, Any]) -> str:
    """The BENCHMARKS.md line."""
    return "\n".join(
        [
            "## AWQ budget (bench 2)",
            "",
            f"Command: `.venv/bin/python -m bench.awq_budget` (raw: `docs/benchmarks/awq_budget.json`). "
            f"AWQ {result['scheme']} on the demo model, {result['sequences']} x {result['seq_len']} calibration "
            f"tokens (PubMedQA + MedQuAD calibration side), default knobs (n_grid {result['awq_record']['n_grid']}, "
            f"{result['awq_record']['calibration']['search_tokens']} search / {result['awq_record']['calibration']['clip_tokens']} clip tokens), "
            f"alpha search {result['awq_record'].get('alpha_search', 'refine')}, search precision "
            f"{result['awq_record'].get('search_precision', 'float32')}{precision_text(result)}), "
            f"{result['threads']} torch thread(s) in a child process: **{result['awq_seconds']:.0f} s** of AWQ wall time "
            f"({cpu_text(result)}; {runs_text(result)}) "
            f"(target <= {result['time_target_seconds']:.0f} s: {'met' if result['meets_time_target'] else 'NOT met'}), "
            f"peak RSS (VmHWM of the child, model load included) **{result['vm_hwm_bytes'] / 1e9:.2f} GB** "
            f"(target <= {result['memory_target_bytes'] / 1e9:g} GB: {'met' if result['meets_memory_target'] else 'NOT met'}; "
            f"{result['vm_hwm_before_awq_bytes'] / 1e9:.2f} GB before AWQ started). Load average "
            f"{result['loadavg_awq_start']} at the start and {result['loadavg_awq_end']} at the end (1/5/15 min).",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="AWQ children run one after another (median kept)")
    parser.add_argument("--fresh", action="store_true", help="measure again even where a result exists")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--propagation", action="store_true", help="also time a plain decoder forward over the same tokens"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.child is not None:
        child(args.child, args.threads)
        return
    result = read_json(RESULTS)
    if args.fresh or "awq_seconds" not in result:
        result = run(args.threads, args.repeats)
        write_json_atomic(RESULTS, result)
    if args.propagation:
        result["propagation_seconds"] = {"threads": args.threads, "measured": utc_now(), **propagation(args.threads)}
        write_json_atomic(RESULTS, result)
        print(json.dumps(result["propagation_seconds"]))
    update_benchmarks_doc("awq-budget", render(result))


if __name__ == "__main__":
    main()
