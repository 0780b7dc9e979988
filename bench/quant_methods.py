"""Bench 8: quantization and depth-pruning methods through the same GGUF export, one table (issue 17).

Rows: plain (RTN) / imatrix (llama.cpp) / AWQ at Q4_0 and Q4_K_M; then 6 of 30 layers removed + Q4_0 by
block influence (ShortGPT) + RTN, by activation selection + AWQ, and by activation selection + the linear
replacement + AWQ (Bedside's default), each unhealed and healed (LoRA distillation, HEAL_SETTINGS).

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

Pruned rows (`PRUNED_VARIANTS`): `compress(CompressOptions(prune_layers=6, method=..., replace=..., quant="Q4_0",
quant_method=..., heal=...))` on the same calibration, exported and scored the same way; the healed row of a
variant runs in the unhealed row's folder, so its prune stage is the same one (resumed, not recomputed).

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
METHODS: tuple[str, ...] = ("plain", "imatrix", "awq", "awq-gptq")
PIPELINE_METHOD = {"plain": "rtn", "imatrix": "imatrix", "awq": "awq", "awq-gptq": "awq-gptq"}
CALIB_SEQUENCES, CALIB_LEN, SEED = 64, 512, 0
EVAL_MAX_TOKENS, EVAL_SEQ_LEN = 4096, 512
TARGET_KL_RATIO = 0.7  # awq KL at most 70 % of imatrix's (and Bedside's pruned row at most 70 % of ShortGPT's)
TARGET_HEALED_KL = 0.6  # nats, Bedside's pruned row healed
PRUNE_LAYERS, PRUNED_SCHEME = 6, "Q4_0"
# variant -> (label, selection method, replacement, quantization method)
PRUNED_VARIANTS: dict[str, tuple[str, str, str, str]] = {
    "block-influence+rtn": ("block influence (ShortGPT) + RTN", "block-influence", "none", "rtn"),
    "activation+awq": ("activation + AWQ", "activation", "none", "awq"),
    "activation+linear+awq": ("activation + linear replacement + AWQ", "activation", "linear", "awq"),
    "activation+linear+awq-gptq": (
        "activation + linear replacement + AWQ + GPTQ", "activation", "linear", "awq-gptq",
    ),
}
# Bedside's row: what `bedside compress --prune-layers 6 --quant Q4_0` does by default (--quant-method auto)
BASELINE_VARIANT, BEDSIDE_VARIANT = "block-influence+rtn", "activation+linear+awq-gptq"
BEDSIDE_METHODS: tuple[str, ...] = ("awq", "awq-gptq")  # rows held to the targets against imatrix
HEAL_STATES: tuple[str, ...] = ("unhealed", "healed")
# The healed rows: distillation on 800 x 512 tokens of the calibration file, 200 LoRA steps at rank 16, lr 1e-3
# (bench/heal_sweep.py, docs/benchmarks/heal_sweep.json: the float proxy at 64 sequences overfits, 0.503 nats held
# apart; at 480 sequences 0.413; docs/BENCHMARKS.md). The pipeline's defaults (64 sequences, 40 steps, rank 8,
# lr 2e-4) are for deploys.
HEAL_SETTINGS: dict[str, Any] = {"heal_sequences": 800, "heal_steps": 200, "heal_lr": 1e-3, "heal_rank": 16}
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


def _pruned_key(variant: str, heal_state: str) -> str:
    return _row_key(PRUNED_SCHEME, f"{variant}/{heal_state}")


def child(scheme: str, method: str, result_path: Path, threads: int) -> None:
    """Compress, export and evaluate one row (`method` a quantization method, or `variant/heal_state` of a
    pruned row); write the row to `result_path`."""
    import torch

    from exporters import export
    from toolkit.compress.pipeline import compress
    from toolkit.compress.record import CompressOptions

    torch.set_num_threads(threads)
    root = bench_cache_dir("quant_methods")
    calib, evaluation, documents = _data_paths(root / "data")
    common = {
        "calib": str(calib), "eval_data": str(evaluation), "calib_sequences": CALIB_SEQUENCES,
        "seq_len": CALIB_LEN, "eval_sequences": 1, "seed": SEED, "quant": scheme,
    }  # fmt: skip
    if "/" in method:  # a pruned row: variant/heal_state, in the variant's folder (healed resumes its prune)
        variant, heal_state = method.split("/")
        _label, selection, replace, quant_method = PRUNED_VARIANTS[variant]
        out = root / f"pruned-{variant}"
        export_dir = out / f"gguf-{heal_state}"
        options = CompressOptions(
            prune_layers=PRUNE_LAYERS, method=selection, replace=replace, quant_method=quant_method,
            heal=heal_state == "healed", **(HEAL_SETTINGS if heal_state == "healed" else {}), **common,
        )  # fmt: skip
    else:
        quant_method = PIPELINE_METHOD[method]
        out = root / f"{scheme}-{method}"
        export_dir = out / "gguf"
        options = CompressOptions(prune_layers=0, quant_method=quant_method, **common)
    with Timer() as compress_timer:
        result = compress("demo", out, options, progress=False)
    vmhwm = proc_status_bytes("VmHWM")
    record = result.record
    stage = record["stages"]["quantize"]
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
        "pipeline_method": quant_method,
        "layers_removed": record.get("layers_removed"),
        "replacement": record.get("replacement"),
        "stage_seconds": {name: entry.get("seconds") for name, entry in record["stages"].items() if entry},
        "stage_resumed": {name: entry.get("resumed") for name, entry in record["stages"].items() if entry},
        "heal": {
            key: (record.get("heal") or {}).get(key, "ce" if key == "objective" else None)
            for key in ("steps", "initial_loss", "final_loss", "objective", "rank", "learning_rate", "loss_tokens")
        }
        if record.get("heal")
        else None,
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
            key: awq.get(key) for key in ("n_grid", "rerank", "search_grids", "export_types", "clip_summary", "gptq")
        }
        | {"clip_tokens": (awq.get("calibration") or {}).get("clip_tokens")}
        if awq
        else None,
        "calibration": record["calibration"],
        "gguf_bytes": exported.sizes,
        "threads": threads,
        "finished": utc_now(),
    }
    write_json_atomic(result_path, row)


def _heal_label(heal: dict[str, Any]) -> str:
    """How a healed row healed: objective, steps, and (rows measured since they were recorded) rank, lr, tokens."""
    parts = [heal.get("objective") or "ce", f"{heal.get('steps')} steps"]
    if heal.get("rank") is not None:
        parts += [f"rank {heal['rank']}", f"lr {heal['learning_rate']:g}"]
    if heal.get("loss_tokens"):
        parts.append(f"{heal['loss_tokens']:,} positions")
    return ", ".join(parts)


def _paired_reading(scheme: str, method: str) -> str:
    """'; paired on 16,384 tokens (...): 0.9933x the matrix's, 95 % interval 0.9813-1.0058' from
    bench.paired_perplexity's results (docs/benchmarks/paired_perplexity.json), or '' when it has no such row."""
    paired = read_json(RESULTS_DIR / "paired_perplexity.json")
    entry = paired.get("schemes", {}).get(scheme, {}).get("paired", {}).get(method, {}).get("ratio")
    if not entry:
        return ""
    return (
        f"; paired on {paired.get('tokens'):,} tokens (`bench.paired_perplexity`): {entry['ratio']:.4f}x the "
        f"matrix's, 95 % interval {entry['low']:.4f}-{entry['high']:.4f}"
    )


def _healed_alike(bedside: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """", x the baseline's KL healed alike" when both healed rows healed with the same settings, else ""."""
    keys = ("objective", "steps", "rank", "learning_rate", "loss_tokens")
    if not baseline or not bedside.get("heal") or not baseline.get("heal"):
        return ""
    if any(bedside["heal"].get(key) != baseline["heal"].get(key) for key in keys):
        return ""
    return f"; {bedside['kl'] / baseline['kl']:.2f} x block influence + RTN healed alike"


def _row_key(scheme: str, method: str) -> str:
    return f"{scheme}/{method}"


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _load_range(results: dict[str, Any]) -> str:
    loads = [entry[0] for entry in results.get("loadavg") or [] if entry]
    return f"{min(loads):.1f}-{max(loads):.1f}" if loads else "n/a"


def _sampled_clip(row: dict[str, Any]) -> bool:
    """Whether a row's AWQ clipping was searched on a 512-token sample (rows measured before the search used every
    calibration token, 2026-12-07; their records lack ``clip_tokens`` or hold 512)."""
    knobs = row.get("awq_knobs")
    return bool(knobs) and (knobs.get("clip_tokens") or 512) <= 512 and row.get("pipeline_method") != "rtn"


def _table_row(row: dict[str, Any], scheme: str, removed: str, method: str) -> list[str]:
    compress_seconds = (row.get("compress_timer") or {}).get("seconds")
    return [
        scheme,
        removed,
        method + (" †" if _sampled_clip(row) else ""),
        _fmt(row["kl"], 4),
        _fmt(row["perplexity"], 2),
        _fmt(row["top1_agreement"], 3),
        _fmt(row["quantize_seconds"], 1) if row.get("pipeline_method") != "rtn" else "-",
        _fmt(compress_seconds, 0),
        _fmt(row["process_peak_bytes"] / 1e9 if row["process_peak_bytes"] else None, 2),
        row.get("search_rounding") or "-",
    ]


def report(results: dict[str, Any]) -> str:
    """The markdown section: one table, then the targets as measured."""
    rows = []
    reference = results["rows"].get(_row_key("float", "-"))
    if reference is not None:
        rows.append(
            ["float (reference)", "0", "-", _fmt(reference["kl"], 4), _fmt(reference["perplexity"], 2), "1.000"]
            + ["-"] * 4
        )
    for scheme in SCHEMES:
        for method in METHODS:
            row = results["rows"].get(_row_key(scheme, method))
            if row is not None:
                rows.append(_table_row(row, scheme, "0", method))
    for variant, (label, *_rest) in PRUNED_VARIANTS.items():
        for heal_state in HEAL_STATES:
            row = results["rows"].get(_pruned_key(variant, heal_state))
            if row is not None:
                layers = ", ".join(str(index) for index in row.get("layers_removed") or [])
                state = heal_state
                if row.get("heal"):
                    state += f" ({_heal_label(row['heal'])})"
                rows.append(_table_row(row, PRUNED_SCHEME, f"{PRUNE_LAYERS} ({layers})", f"{label}, {state}"))
    table = markdown_table(
        [
            "scheme",
            "layers removed",
            "method",
            "KL (nats)",
            "perplexity",
            "top-1 agreement",
            "quantize stage (s)",
            "compress (s)",
            "process peak (GB)",
            "search rounding",
        ],
        rows,
    )
    lines = [
        "## Quantization and depth pruning through the GGUF export (bench 8)",
        "",
        f"Command: `{results.get('command', '.venv/bin/python -m bench.quant_methods --threads 2')}` "
        "(raw: `docs/benchmarks/quant_methods.json`; `make bench` runs it). Demo model (30 layers), 64 x 512 "
        "calibration tokens (shared PubMedQA/MedQuAD calibration split), evaluated with "
        '`evaluate(gguf, reference="demo")` on the held-apart medical text (512-token windows, 4096 tokens). '
        "plain = RTN (no matrix), imatrix = llama.cpp's importance matrix of the unscaled model, awq = Bedside's "
        "AWQ searched on the export's rounding, exported with the scaled model's matrix, awq-gptq = awq, then GPTQ "
        "rounding of every Q4_0 / Q5_0 linear on the export's exact grid (`--quant-method auto`, the default for "
        "GGUF). †: measured before the clipping search used every calibration token (it searched on a 512-token "
        "sample then). Pruned rows: "
        f"{PRUNE_LAYERS} layers removed, {PRUNED_SCHEME}; healed = LoRA on the same calibration file (kd: distilling "
        "the unpruned model's top-64 log-probabilities at every position, the default; ce: the LM loss), "
        f"{HEAL_SETTINGS['heal_sequences']} x 512 tokens, {HEAL_SETTINGS['heal_steps']} steps, rank "
        f"{HEAL_SETTINGS['heal_rank']}, lr {HEAL_SETTINGS['heal_lr']:g} (`--heal-sequences --heal-steps --heal-rank "
        "--heal-lr`); rows measured before those settings say so in the JSON (`heal`). "
        "Quantize stage = AWQ or gathering the matrix; compress = the whole `compress` call "
        "(a healed row resumes its variant's prune stage); process peak = VmHWM of the process running compress. "
        f"Threads: {results.get('threads')}; 1-minute load average at the start and end of the rows: "
        f"{_load_range(results)} on 2 cores (times under load overstate an idle machine's).",
        "",
        table,
        "",
    ]
    for scheme, method in ((scheme, method) for scheme in SCHEMES for method in BEDSIDE_METHODS):
        awq = results["rows"].get(_row_key(scheme, method))
        imatrix = results["rows"].get(_row_key(scheme, "imatrix"))
        if awq and imatrix and awq["kl"] and imatrix["kl"]:
            ratio = awq["kl"] / imatrix["kl"]
            lines.append(
                f"- {scheme}: {method} KL / imatrix KL = {ratio:.2f} (target <= {TARGET_KL_RATIO}: "
                f"{'met' if ratio <= TARGET_KL_RATIO else 'missed'}); perplexity {awq['perplexity']:.2f} vs "
                f"{imatrix['perplexity']:.2f} ({'no worse' if awq['perplexity'] <= imatrix['perplexity'] else 'worse'} "
                f"on these 4,096 tokens{_paired_reading(scheme, method)}); quantize stage "
                f"{awq['quantize_seconds']:.0f} s (AWQ with the re-rank on libggml + matrix"
                f"{', GPTQ' if 'gptq' in method else ''}, load and save), process peak "
                f"{awq['process_peak_bytes'] / 1e9:.2f} GB (target <= {TARGET_PEAK_BYTES / 1e9:.1f} GB: "
                f"{'met' if awq['process_peak_bytes'] <= TARGET_PEAK_BYTES else 'missed'}; the stage's sampled peak "
                f"{awq.get('quantize_peak_rss_bytes', 0) / 1e9:.2f} GB)."
            )
    budget = read_json(RESULTS_DIR / "awq_budget.json")
    if budget.get("awq_seconds") is not None:
        lines.append(
            f"- AWQ's time (bench 2, `{budget.get('command')}`: AWQ alone at Q4_0 on the same 64 x 512 tokens, no "
            f"matrix): {budget['awq_seconds']:.0f} s (target <= {TARGET_AWQ_SECONDS:.0f} s: "
            f"{'met' if budget['awq_seconds'] <= TARGET_AWQ_SECONDS else 'missed'}), peak "
            f"{budget['vm_hwm_bytes'] / 1e9:.2f} GB (target <= {TARGET_PEAK_BYTES / 1e9:.1f} GB: "
            f"{'met' if budget['vm_hwm_bytes'] <= TARGET_PEAK_BYTES else 'missed'}); the quantize stages above add "
            "the exact re-rank, GPTQ where named, load and save."
        )
    baseline = results["rows"].get(_pruned_key(BASELINE_VARIANT, "unhealed"))
    bedside = results["rows"].get(_pruned_key(BEDSIDE_VARIANT, "unhealed"))
    if baseline and bedside:
        ratio = bedside["kl"] / baseline["kl"]
        lines.append(
            f"- {PRUNE_LAYERS} layers + {PRUNED_SCHEME}, unhealed: Bedside's KL / block influence + RTN = {ratio:.2f} "
            f"(target <= {TARGET_KL_RATIO}: {'met' if ratio <= TARGET_KL_RATIO else 'missed'})."
        )
    healed = results["rows"].get(_pruned_key(BEDSIDE_VARIANT, "healed"))
    if healed:
        lines.append(
            f"- {PRUNE_LAYERS} layers + {PRUNED_SCHEME}, healed: Bedside's KL {healed['kl']:.3f} nats "
            f"(target <= {TARGET_HEALED_KL}: {'met' if healed['kl'] <= TARGET_HEALED_KL else 'missed'})"
            + _healed_alike(healed, results["rows"].get(_pruned_key(BASELINE_VARIANT, "healed")))
            + "."
        )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = {} if args.fresh else read_json(RESULTS)
    results.setdefault("rows", {})
    results.update(command=command_line(), threads=args.threads)
    loads: list[list[float]] = results.setdefault("loadavg", [])  # before and after each row run now
    plan = [(scheme, method) for scheme in args.schemes for method in args.methods]
    plan += [(PRUNED_SCHEME, f"{variant}/{state}") for variant in args.variants for state in HEAL_STATES]
    if args.float_reference:
        plan.insert(0, ("float", "-"))
    for scheme, method in plan:
        key = _row_key(scheme, method)
        if key in results["rows"] and not args.fresh and key not in args.again:
            print(f"{key}: done (skipping)")
            continue
        result_path = bench_cache_dir("quant_methods") / f"row-{key.replace('/', '_')}.json"
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
        update_benchmarks_doc("bench-quant-methods", report(results))
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
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--variants", nargs="*", default=list(PRUNED_VARIANTS), choices=list(PRUNED_VARIANTS),
        help=f"pruned rows ({PRUNE_LAYERS} layers + {PRUNED_SCHEME}), each unhealed and healed; none: no pruned row",
    )  # fmt: skip
    parser.add_argument(
        "--again", nargs="*", default=[], metavar="ROW", help="measure these rows again (keys as in the JSON)"
    )
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
