"""Bench 8: quantization methods through the same GGUF export: plain (RTN) / imatrix (llama.cpp) / AWQ.

Run from the repository root (resumes: finished rows in the JSON are skipped; `--fresh` measures again):

    .venv/bin/python -m bench.quant_methods --threads 2        # docs/benchmarks/quant_methods.json + BENCHMARKS.md

Setting: the demo model (SmolLM2-135M-Instruct, 30 layers), no layer removed. Calibration: the shared
PubMedQA / MedQuAD calibration documents (bench/common.py's split, chat-templated by the pipeline), 64 x 512
tokens. For each scheme (Q4_0, Q4_K_M) and method, one child process runs the public pipeline
(`compress(CompressOptions(quant=..., quant_method=...))`, as `bedside compress` does), then the GGUF export of
that folder (`exporters.export(..., imatrix=<the folder's imatrix.gguf>)`, as `bedside export` does), then
`evaluate(gguf, documents=<held-apart text>, reference="demo")`:

- plain: `--quant-method rtn`: weights as they are, llama.cpp's reference rounding, no matrix;
- imatrix: llama.cpp's method: no scales, matrix `mean_t x_tj^2` gathered on the unscaled model, export with it;
- awq: scales + clipping searched on the export's rounding (emulated search, the best alphas and clip ratios
  re-ranked with libggml + the scaled model's matrix), export with that matrix.

Scores (toolkit/validate/evaluate.py): on the held-apart medical text (PubMedQA contexts, MedQuAD answers of
the evaluation side, never seen by calibration), windows of 512 tokens, at most 4096 tokens,

    KL = mean_t sum_v p(v | x_<t) (log p(v | x_<t) - log q(v | x_<t))     p: float demo model, q: the GGUF
    perplexity = exp(mean_t -log q(x_t | x_<t)),   top-1 agreement = mean_t [argmax q = argmax p]

Time: the quantize stage's wall time (AWQ, or gathering the matrix) as the pipeline records it; memory: the
child's VmHWM (peak resident memory of the whole process: model load, calibration, quantize stage and the
pipeline's perplexity checks) and the stage's sampled peak RSS. The load average before and after is kept:
this machine is shared, so times measured under load overstate an idle machine's.
Skips cleanly (exit 0, a message) when the shared data (../shared/data) or the demo model is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    Timer,
    bench_cache_dir,
    command_line,
    load_average,
    markdown_table,
    proc_status_bytes,
    read_json,
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
)

RESULTS = RESULTS_DIR / "quant_methods.json"
SCHEMES: tuple[str, ...] = ("Q4_0", "Q4_K_M")
METHODS: tuple[str, ...] = ("plain", "imatrix", "awq")
PIPELINE_METHOD = {"plain": "rtn", "imatrix": "imatrix", "awq": "awq"}
CALIB_SEQUENCES, CALIB_LEN, SEED = 64, 512, 0
EVAL_MAX_TOKENS, EVAL_SEQ_LEN = 4096, 512
TARGET_KL_RATIO = 0.7  # awq KL at most 70 % of imatrix's
TARGET_AWQ_SECONDS = 60.0
TARGET_PEAK_BYTES = 1.5e9


def _data_paths(folder: Path) -> tuple[Path, Path, list[Any]]:
    """The pipeline's calibration / evaluation files (bench.compression's), and the evaluation documents."""
    from bench.common import load_medical_data
    from bench.compression import write_pipeline_data

    data = load_medical_data()
    calib, evaluation = write_pipeline_data(data, folder)
    documents = [document for texts in data.evaluation_text.values() for document in texts]
    return calib, evaluation, documents


def _score(artifact: str | Path, documents: Any, threads: int) -> dict[str, Any]:
    """`evaluate` of one artifact against the float demo model, the same windows and token budget for every row."""
    from toolkit.validate.evaluate import evaluate

    return evaluate(
        artifact,
        documents=documents,
        reference="demo",
        context=EVAL_SEQ_LEN,
        seq_len=EVAL_SEQ_LEN,
        max_tokens=EVAL_MAX_TOKENS,
        n_threads=threads,
        progress=False,
    )


def float_child(result_path: Path, threads: int) -> None:
    """The float demo model itself, scored the same way (its KL to itself is 0: the reference row)."""
    import torch


    torch.set_num_threads(threads)
    _calib, _evaluation, documents = _data_paths(bench_cache_dir("quant_methods") / "data")
    with Timer() as eval_timer:
        scores = _score("demo", documents, threads)
    row = {
        "scheme": "float",
        "method": "-",
        "kl": scores["kl_divergence"],
        "perplexity": scores["perplexity"],
        "top1_agreement": scores["top1_agreement"],
        "eval_tokens": scores["tokens"],
        "quantize_seconds": None,
        "process_peak_bytes": None,
        "eval_timer": eval_timer.record(),
        "threads": threads,
        "finished": utc_now(),
    }
    write_json_atomic(result_path, row)


def child(scheme: str, method: str, result_path: Path, threads: int) -> None:
    """Compress, export and evaluate one row; write the row to `result_path`."""
    import torch

    from exporters import export
    from toolkit.compress.pipeline import compress
    from toolkit.compress.record import CompressOptions

    torch.set_num_threads(threads)
    root = bench_cache_dir("quant_methods")
    calib, evaluation, documents = _data_paths(root / "data")
    out = root / f"{scheme}-{method}"
    options = CompressOptions(
        prune_layers=0,
        quant=scheme,
        quant_method=PIPELINE_METHOD[method],
        calib=str(calib),
        eval_data=str(evaluation),
        calib_sequences=CALIB_SEQUENCES,
        seq_len=CALIB_LEN,
        eval_sequences=1,
        seed=SEED,
    )
    with Timer() as compress_timer:
        result = compress("demo", out, options, progress=False)
    vmhwm = proc_status_bytes("VmHWM")
    record = result.record
    stage = record["stages"]["quantize"]
    export_dir = out / "gguf"
    with Timer() as export_timer:
        exported = export(
            result.checkpoint, "gguf", scheme, export_dir, imatrix=result.imatrix, threads=threads
        )
    with Timer() as eval_timer:
        scores = _score(exported.model_file, documents, threads)
    awq = record.get("awq") or {}
    row = {
        "scheme": scheme,
        "method": method,
        "pipeline_method": PIPELINE_METHOD[method],
        "kl": scores["kl_divergence"],
        "perplexity": scores["perplexity"],
        "top1_agreement": scores["top1_agreement"],
        "eval_tokens": scores["tokens"],
        "quantize_seconds": stage.get("seconds"),
        "quantize_resumed": stage.get("resumed"),
        "quantize_peak_rss_bytes": stage.get("peak_rss_bytes"),
        "process_peak_bytes": vmhwm,
        "compress_timer": compress_timer.record(),
        "export_timer": export_timer.record(),
        "eval_timer": eval_timer.record(),
        "imatrix_entries": (exported.record.get("imatrix") or {}).get("entries"),
        "search_rounding": record["quant"].get("search_rounding"),
        "export_rounding": record["quant"].get("export_rounding"),
        "awq_knobs": {
            key: awq.get(key) for key in ("n_grid", "rerank", "search_grids", "export_types", "clip_summary")
        }
        if awq
        else None,
        "calibration": record["calibration"],
        "gguf_bytes": exported.sizes,
        "threads": threads,
        "finished": utc_now(),
    }
    write_json_atomic(result_path, row)


def _row_key(scheme: str, method: str) -> str:
    return f"{scheme}/{method}"


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _load_range(results: dict[str, Any]) -> str:
    loads = [entry[0] for entry in results.get("loadavg") or [] if entry]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"


def report(results: dict[str, Any]) -> str:
    """The markdown section: one table, then the targets as measured."""
    rows = []
    reference = results["rows"].get(_row_key("float", "-"))
    if reference is not None:
        rows.append(
            [
                "float (reference)",
                "-",
                _fmt(reference["kl"], 4),
                _fmt(reference["perplexity"], 2),
                "1.000",
                "-",
                "-",
                "-",
            ]
        )
    for scheme in SCHEMES:
        for method in METHODS:
            row = results["rows"].get(_row_key(scheme, method))
            if row is None:
                continue
            rows.append(
                [
                    scheme,
                    method,
                    _fmt(row["kl"], 4),
                    _fmt(row["perplexity"], 2),
                    _fmt(row["top1_agreement"], 3),
                    _fmt(row["quantize_seconds"], 1) if method != "plain" else "-",
                    _fmt(row["process_peak_bytes"] / 1e9 if row["process_peak_bytes"] else None, 2),
                    row.get("search_rounding") or "-",
                ]
            )
    table = markdown_table(
        [
            "scheme",
            "method",
            "KL (nats)",
            "perplexity",
            "top-1 agreement",
            "quantize stage (s)",
            "process peak (GB)",
            "search rounding",
        ],
        rows,
    )
    lines = [
        "## Quantization methods through the GGUF export (bench 8)",
        "",
        f"Command: `{results.get('command', '.venv/bin/python -m bench.quant_methods --threads 2')}` "
        "(raw: `docs/benchmarks/quant_methods.json`). Demo model, no layer removed, 64 x 512 calibration tokens "
        '(shared PubMedQA/MedQuAD calibration split), evaluated with `evaluate(gguf, reference="demo")` on the '
        "held-apart medical text (512-token windows, 4096 tokens). plain = RTN (no matrix), imatrix = llama.cpp's "
        "importance matrix of the unscaled model, awq = Bedside's AWQ searched on the export's rounding, "
        "exported with the scaled model's matrix. Quantize stage = AWQ or gathering the matrix; process peak = "
        "VmHWM of the process running compress (model, calibration, stage, the pipeline's perplexity checks). "
        f"Threads: {results.get('threads')}; 1-minute load average at the start and end of the rows: "
        f"{_load_range(results)} on 2 cores (a shared machine, other jobs running: times are not idle-machine "
        "times).",
        "",
        table,
        "",
    ]
    for scheme in SCHEMES:
        awq = results["rows"].get(_row_key(scheme, "awq"))
        imatrix = results["rows"].get(_row_key(scheme, "imatrix"))
        if awq and imatrix and awq["kl"] and imatrix["kl"]:
            ratio = awq["kl"] / imatrix["kl"]
            lines.append(
                f"- {scheme}: awq KL / imatrix KL = {ratio:.2f} (target <= {TARGET_KL_RATIO}: "
                f"{'met' if ratio <= TARGET_KL_RATIO else 'missed'}); perplexity {awq['perplexity']:.2f} vs "
                f"{imatrix['perplexity']:.2f} ({'no worse' if awq['perplexity'] <= imatrix['perplexity'] else 'worse'}); "
                f"AWQ {awq['quantize_seconds']:.0f} s (target <= {TARGET_AWQ_SECONDS:.0f} s on an idle machine), "
                f"process peak {awq['process_peak_bytes'] / 1e9:.2f} GB (target <= {TARGET_PEAK_BYTES / 1e9:.1f} GB)."
            )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = {} if args.fresh else read_json(RESULTS)
    results.setdefault("rows", {})
    results.update(command=command_line(), threads=args.threads)
    loads: list[list[float]] = results.setdefault("loadavg", [])  # before and after each row run now
    plan = [(scheme, method) for scheme in args.schemes for method in args.methods]
    if args.float_reference:
        plan.insert(0, ("float", "-"))
    for scheme, method in plan:
        key = _row_key(scheme, method)
        if key in results["rows"] and not args.fresh:
            print(f"{key}: done (skipping)")
            continue
        result_path = bench_cache_dir("quant_methods") / f"row-{scheme}-{method}.json"
        result_path.unlink(missing_ok=True)
        loads.append(load_average())
        started = time.perf_counter()
        command = [
            sys.executable, "-m", "bench.quant_methods", "--child", scheme, method, str(result_path),
            "--threads", str(args.threads),
        ]  # fmt: skip
        completed = subprocess.run(command, cwd=REPO_ROOT, env=os.environ.copy(), check=False)
        if completed.returncode != 0 or not result_path.is_file():
            print(f"{key}: child failed (exit {completed.returncode})", file=sys.stderr)
            continue
        row = json.loads(result_path.read_text(encoding="utf-8"))
        row["wall_seconds"] = round(time.perf_counter() - started, 1)
        results["rows"][key] = row
        print(f"{key}: KL {row['kl']}, ppl {row['perplexity']}, top-1 {row['top1_agreement']}")
        loads.append(load_average())
        write_json_atomic(RESULTS, results)
    results["updated"] = utc_now()
    write_json_atomic(RESULTS, results)
    update_benchmarks_doc("bench-quant-methods", report(results))
    return results


def available() -> str | None:
    """Why the bench cannot run here (no shared data, no demo model), or None."""
    from toolkit.core.errors import BedsideError
    from toolkit.model.source import resolve_model_dir

    try:
        resolve_model_dir("demo")
        from bench.common import load_medical_data

        load_medical_data()
    except (BedsideError, OSError) as error:
        return str(error)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--no-float-reference", dest="float_reference", action="store_false", help="skip the float row"
    )
    parser.add_argument("--child", nargs=3, metavar=("SCHEME", "METHOD", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        scheme, method, result = args.child
        if scheme == "float":
            float_child(Path(result), args.threads)
        else:
            child(scheme, method, Path(result), args.threads)
        return
    reason = available()
    if reason is not None:
        print(f"bench.quant_methods: skipped ({reason})")
        return
    run(args)


if __name__ == "__main__":
    main()
