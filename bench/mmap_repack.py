"""Bench 4: llama.cpp peak memory and speed with the GGUF file mapped or read, CPU repack on or off.

Run from the repository root (skips when docs/benchmarks/mmap_repack.json already has a result;
`--fresh` measures again):

    .venv/bin/python -m bench.mmap_repack

Why: on AVX2 llama.cpp keeps an interleaved copy of Q4_0/Q4_K matmul weights (CPU_REPACK extra
buffers). With the file mapped, the pages it read to build that copy stay resident beside it, so
the weights count twice; read instead (`use_mmap=False`), they count once. Each of the four
settings runs in a fresh process (`--child`) on the demo model exported to Q4_0, one thread:
prefill of CONTEXT - 64 tokens, then 64 single-token decode steps; the child reports VmHWM
(peak resident), RssFile and RssAnon from /proc/self/status, and tokens per second. Repeated
REPEATS times; the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    load_average,
    proc_status_bytes,
    read_json,
    utc_now,
    write_json_atomic,
)
from bench.runtimes import export_artifact
from runtimes.llamacpp_runner import _model_params_override
from toolkit.core.units import MIB
from toolkit.model.source import resolve_model_dir

RESULTS = RESULTS_DIR / "mmap_repack.json"
SCHEME, CONTEXT, DECODE, REPEATS = "Q4_0", 512, 64, 2
SETTINGS: tuple[tuple[bool, bool], ...] = ((True, True), (False, True), (True, False), (False, False))


def child(path: str, mmap: bool, extra_buffers: bool) -> dict[str, Any]:
    """Load `path` with the given settings, prefill and decode, return memory and speed."""
    import llama_cpp

    with _model_params_override(use_extra_bufts=extra_buffers):
        llm = llama_cpp.Llama(
            model_path=path,
            n_ctx=CONTEXT,
            n_batch=512,
            n_ubatch=512,
            n_threads=1,
            n_threads_batch=1,
            use_mmap=mmap,
            verbose=False,
        )
    prompt = list(range(100, 100 + CONTEXT - DECODE))
    start = time.perf_counter()
    llm.eval(prompt)
    prefilled = time.perf_counter()
    for step in range(DECODE):
        llm.eval([200 + step])
    done = time.perf_counter()
    return {
        "mmap": mmap,
        "extra_buffers": extra_buffers,
        "peak_rss_mib": round(proc_status_bytes("VmHWM") / MIB, 1),
        "rss_file_mib": round(proc_status_bytes("RssFile") / MIB, 1),
        "rss_anon_mib": round(proc_status_bytes("RssAnon") / MIB, 1),
        "prefill_tok_s": round(len(prompt) / (prefilled - start), 1),
        "decode_tok_s": round(DECODE / (done - prefilled), 1),
    }


def run() -> dict[str, Any]:
    """Every setting REPEATS times, each in a fresh process."""

    model, _ = export_artifact(resolve_model_dir("demo"), "gguf", SCHEME)
    before = load_average()
    runs = []
    for _ in range(REPEATS):
        for mmap, extra in SETTINGS:
            output = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.mmap_repack",
                    "--child",
                    str(model),
                    str(int(mmap)),
                    str(int(extra)),
                ],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            runs.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    return {
        "command": command_line(),
        "date": utc_now(),
        "scheme": SCHEME,
        "context": CONTEXT,
        "decode_tokens": DECODE,
        "load_average_before": before,
        "load_average_after": load_average(),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="measure again even if a result exists")
    parser.add_argument("--child", nargs=3, metavar=("GGUF", "MMAP", "EXTRA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, mmap, extra = args.child
        print(json.dumps(child(path, mmap == "1", extra == "1")))
        return
    if RESULTS.exists() and not args.fresh and read_json(RESULTS):
        print(f"{RESULTS} exists; --fresh to measure again")
        return
    write_json_atomic(RESULTS, run())
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
