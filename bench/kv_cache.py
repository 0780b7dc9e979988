"""Bench 6: the KV-cache precision on the demo model: quality (perplexity, KL, top-1) and peak memory vs estimate.

Run from the repository root (skips parts already in docs/benchmarks/kv_cache.json; `--fresh` measures again):

    .venv/bin/python -m bench.kv_cache

Quality: the demo model's F16 GGUF (weights unquantized, so the cache is the only change) on llama.cpp, one
thread, scores tests/fixtures/eval/clinical_notes.txt (its first 1008 tokens, three windows of 336, each from an
empty cache) with the KV cache at f16, q8_0 and q4_0, flash attention on for all three (a quantized V cache
needs it; on for f16 too so that only the cache differs), with llama.cpp's Hadamard rotation of a quantized
cache (the default when the head size is a multiple of 64) and without it (LLAMA_ATTN_ROT_DISABLE=1).
Perplexity, and KL divergence and top-1 agreement against the f16 cache. These are the demo points of the KV
quality prior (toolkit/plan/quality_priors.py, DEMO_KV_PPL).

Runner: the demo's original Q4_1 GGUF (what tests/test_runtimes.py loads) through LlamaCppRunner with its own
defaults (f16: flash attention off; q8_0 / q4_0: on), the first 336 tokens of the same text from an empty cache:
KL divergence, top-1 agreement and mean log-likelihood difference against the f16 cache, and, to separate the
two changes, the f16 cache with flash attention on. tests/test_runtimes.py::test_llama_runs_a_quantized_kv_cache_
close_to_f16 holds q8_0 to the tolerance these figures give.

Memory: peak RSS (VmHWM of the measuring child) of the demo at Q8_0 and Q4_K_M with a q8_0 and a q4_0 cache,
contexts 512, 1024 and 2048: runtimes.measure.measure_in_child("llama.cpp", path, MeasureJob(context=N,
decode_tokens=min(32, N // 4), n_threads=1, runner_options={"kv_cache_dtype": KV})), what `bedside eval
--kv-cache KV --context N --threads 1` reports; beside it the estimate (toolkit.plan.memory.estimate_memory on
the workstation-cpu-16gb profile, the calibration record's, batch 1). tests/test_memory.py pins the result
(MEASURED_PEAK_RSS_QUANTIZED_KV_MIB, within 5 %).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    command_line,
    load_average,
    markdown_table,
    read_json,
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
)
from bench.simulator import artifact_path
from toolkit.core.units import MIB
from toolkit.core.windows import window_ids

RESULTS = RESULTS_DIR / "kv_cache.json"
TEXT = REPO_ROOT / "tests" / "fixtures" / "eval" / "clinical_notes.txt"
WINDOW, MAX_TOKENS = 336, 1008
KV_DTYPES = ("f16", "q8_0", "q4_0")
MEMORY_SCHEMES = ("Q8_0", "Q4_K_M")
MEMORY_KV = ("q8_0", "q4_0")
CONTEXTS = (512, 1024, 2048)
ROTATION_ENV = "LLAMA_ATTN_ROT_DISABLE"


def _score(path: str, kv: str) -> tuple[np.ndarray, list[int]]:
    """Log-probabilities [positions, vocab] of the text's windows (each window's last row dropped) and targets."""
    from runtimes import LlamaCppRunner

    text = TEXT.read_text(encoding="utf-8")
    rows: list[np.ndarray] = []
    targets: list[int] = []
    with LlamaCppRunner(kv_cache_dtype=kv, flash_attn=True).load(
        path, n_ctx=512, n_threads=1, device="cpu"
    ) as r:
        for window in window_ids(r.tokenize(text)[:MAX_TOKENS], WINDOW, r.window_bos):
            if len(window) < 2:
                break
            rows.append(r.logprobs_full(window)[:-1])
            targets.extend(window[1:])
    return np.concatenate(rows), targets


def quality(results: dict[str, Any]) -> None:
    path = str(artifact_path("gguf", "F16"))
    table: dict[str, Any] = {}
    for rotation in (True, False):
        if rotation:
            os.environ.pop(ROTATION_ENV, None)
        else:
            os.environ[ROTATION_ENV] = "1"  # read by llama.cpp when a context's KV cache is made
        reference: np.ndarray | None = None
        for kv in KV_DTYPES:
            logprobs, targets = _score(path, kv)
            nll = -float(logprobs[np.arange(len(targets)), targets].mean())
            row: dict[str, Any] = {"perplexity": float(np.exp(nll)), "positions": len(targets)}
            if reference is None:
                reference = logprobs
            else:
                p = np.exp(reference.astype(np.float64))
                row["kl_vs_f16_nats"] = float((p * (reference - logprobs)).sum(axis=1).mean())
                row["top1_agreement_vs_f16"] = float((reference.argmax(1) == logprobs.argmax(1)).mean())
            table[f"{kv}{'' if rotation else ' no-rotation'}"] = row
    os.environ.pop(ROTATION_ENV, None)
    results["quality"] = {"model": path, "flash_attn": True, "threads": 1, "window": WINDOW, "rows": table}


def runner(results: dict[str, Any]) -> None:
    from runtimes import LlamaCppRunner
    from toolkit.core.paths import demo_gguf_path

    path = demo_gguf_path()
    scores: dict[str, np.ndarray] = {}
    settings = {"f16": {}, "f16 flash": {"flash_attn": True}, "q8_0": {"kv_cache_dtype": "q8_0"}}
    settings["q4_0"] = {"kv_cache_dtype": "q4_0"}
    for name, options in settings.items():
        with LlamaCppRunner(**options).load(path, n_ctx=512, n_threads=1, device="cpu") as r:
            ids = window_ids(r.tokenize(TEXT.read_text(encoding="utf-8")), WINDOW, r.window_bos)[0]
            scores[name] = r.logprobs_full(ids)
    reference = scores["f16"]
    p = np.exp(reference.astype(np.float64))
    positions = np.arange(len(ids) - 1)
    rows = {}
    for name in ("f16 flash", "q8_0", "q4_0"):
        other = scores[name]
        rows[name] = {
            "kl_vs_f16_nats": float((p * (reference - other)).sum(axis=1).mean()),
            "top1_agreement_vs_f16": float(np.mean(reference.argmax(1) == other.argmax(1))),
            "mean_loglik_diff_nats": float(
                other[positions, ids[1:]].mean() - reference[positions, ids[1:]].mean()
            ),
            "max_abs_logprob_diff": float(np.abs(other - reference).max()),
        }
    results["runner"] = {"model": str(path), "tokens": len(ids), "threads": 1, "rows": rows}


def memory(results: dict[str, Any]) -> None:
    from runtimes.measure import MeasureJob, measure_in_child
    from toolkit.model.facts import read_facts
    from toolkit.plan.memory import Deployment, estimate_memory
    from toolkit.target.profiles import load_profile

    facts = read_facts("demo")
    profile = load_profile("workstation-cpu-16gb").model_copy(update={"batch_size": 1})
    rows = results.setdefault("memory", {})
    for context in CONTEXTS:  # contexts interleaved so load drifts spread over the table
        for scheme in MEMORY_SCHEMES:
            for kv in MEMORY_KV:
                key = f"{scheme} {kv} {context}"
                if key in rows:
                    continue
                path = artifact_path("gguf", scheme)
                job = MeasureJob(
                    context=context,
                    decode_tokens=min(32, context // 4),
                    n_threads=1,
                    runner_options={"kv_cache_dtype": kv},
                )
                measured = measure_in_child("llama.cpp", path, job)
                estimate = estimate_memory(
                    facts, Deployment("gguf", scheme, context=context, kv_cache_dtype=kv), profile
                )
                rows[key] = {
                    "peak_rss_mib": round(measured.peak_rss_bytes / MIB, 1),
                    "estimate_mib": round(estimate.total_bytes / MIB, 1),
                    "kv_cache_mib": round(estimate.kv_cache_bytes / MIB, 2),
                    "error_pct": round(100 * (estimate.total_bytes / measured.peak_rss_bytes - 1), 2),
                    "decode_tokens_per_s": round(measured.decode_tokens_per_s, 1),
                    "load_average": load_average(),
                }
                print(key, rows[key], flush=True)
                write_json_atomic(RESULTS, results)


def report(results: dict[str, Any]) -> str:
    quality_rows = [
        [
            name,
            f"{row['perplexity']:.3f}",
            f"{100 * (row['perplexity'] / results['quality']['rows']['f16']['perplexity'] - 1):+.2f} %",
            f"{row.get('kl_vs_f16_nats', 0):.5f}",
            f"{row.get('top1_agreement_vs_f16', 1):.3f}",
        ]
        for name, row in results["quality"]["rows"].items()
    ]
    runner_rows = [
        [
            name,
            f"{row['kl_vs_f16_nats']:.4f}",
            f"{row['top1_agreement_vs_f16']:.3f}",
            f"{row['mean_loglik_diff_nats']:+.4f}",
            f"{row['max_abs_logprob_diff']:.2f}",
        ]
        for name, row in results["runner"]["rows"].items()
    ]
    memory_rows = [
        [
            key,
            row["peak_rss_mib"],
            row["estimate_mib"],
            f"{row['error_pct']:+.2f} %",
            row["decode_tokens_per_s"],
        ]
        for key, row in results["memory"].items()
    ]
    return (
        "## Bench 6: KV-cache precision on the demo model\n\n"
        f"`{results['command']}` ({results['finished']}; raw: `docs/benchmarks/kv_cache.json`). Quality: the F16 "
        f"GGUF, {results['quality']['rows']['f16']['positions']} scored positions of "
        "tests/fixtures/eval/clinical_notes.txt in windows of 336, one thread, flash attention on for every row; "
        "KL and top-1 against the f16 cache.\n\n"
        + markdown_table(["KV cache", "perplexity", "vs f16", "KL (nats)", "top-1"], quality_rows)
        + "\n\nLlamaCppRunner's defaults on the demo's Q4_1 GGUF (flash attention off for f16, on for a quantized "
        f"cache), {results['runner']['tokens']} tokens, against the f16 cache:\n\n"
        + markdown_table(
            ["run", "KL (nats)", "top-1", "mean log-lik. diff (nats)", "max abs log-prob diff"], runner_rows
        )
        + "\n\nPeak RSS against the estimate (toolkit/plan/memory.py, workstation-cpu-16gb, batch 1), one thread:\n\n"
        + markdown_table(
            ["scheme, KV, context", "measured MiB", "estimate MiB", "error", "decode tok/s"], memory_rows
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="measure again, ignoring the stored results")
    args = parser.parse_args()
    results = {} if args.fresh else read_json(RESULTS)
    results["command"] = command_line()
    results["started"] = utc_now()
    results["load_average_start"] = load_average()
    if "quality" not in results:
        quality(results)
        write_json_atomic(RESULTS, results)
    if "runner" not in results:
        runner(results)
        write_json_atomic(RESULTS, results)
    memory(results)
    results["finished"] = utc_now()
    results["load_average_end"] = load_average()
    write_json_atomic(RESULTS, results)
    update_benchmarks_doc("kv-cache", report(results))
    print(report(results))


if __name__ == "__main__":
    main()
