"""Bench 1: layer-selection methods x {RTN, AWQ} x {healed, not healed} on the demo model at 4 bits.

Run from the repository root (resumes: finished configurations in the JSON are skipped, and the
pipeline's stage cache under ~/.cache/bedside/bench/compression/pipeline resumes selections, healings
and AWQ runs):

    .venv/bin/python -m bench.compression            # docs/benchmarks/compression.json + BENCHMARKS.md

Setting: SmolLM2-135M-Instruct (30 layers), 6 layers removed (20 %), decoder linears fake-quantized
on the Q4_0 grid (`toolkit.compress.quant.grids`, bit-exact with the GGUF Q4_0 export; embeddings and the
tied output head stay float in this emulation). Every configuration is built by the public pipeline,
`toolkit.compress.pipeline.compress(CompressOptions(...))`, exactly as `bedside compress` builds it:
prune (`--method`, 6 layers; activation scores candidates as the Q4_0 model will run) -> heal (LoRA, up
to 40 steps within 600 s, or `--no-heal`) -> quantize (`--quant Q4_0`, `--quant-method awq|rtn`), with
selection, healing and AWQ on the pipeline's calibration blocks (32 x 256 tokens of the calibration
QA documents of both sources, chat-templated). One output folder per method shares its stage
cache, so a method's selection and its healing are computed once for all its configurations. The
`float` cells are the checkpoint of the RTN run (RTN leaves the float weights as they are: the
pruned, or healed, model before quantization); the RTN and AWQ cells are that run's checkpoint
fake-quantized on the export grid (`fake_quantize_model`), i.e. what the exported file holds.
Baselines: the float original, original + RTN, original + AWQ (the pipeline with no layer removed).

Scores (bench/common.py, formulas in `toolkit.core.metrics`): perplexity = exp(mean_t -log q(x_t | x_<t))
on held-apart PubMedQA contexts and MedQuAD answers, and top-1 agreement = mean_t [argmax q = argmax p_float]
with the unpruned float model on the same tokens. The pipeline's own per-stage perplexity runs on one
block of the same held-apart text (`--eval`), so no evaluation token is calibration data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    MedicalData,
    Timer,
    bench_cache_dir,
    command_line,
    evaluation_blocks,
    load_average,
    load_medical_data,
    markdown_table,
    read_json,
    score_model,
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from toolkit.compress.heal import TrainingBlocks
from toolkit.compress.pipeline import CompressOptions, _prepare_data, compress
from toolkit.compress.prune import get_selection_method
from toolkit.compress.quant.rtn import fake_quantize_model
from toolkit.model.source import resolve_model_dir

RESULTS = RESULTS_DIR / "compression.json"
MODEL = "demo"
METHODS: tuple[str, ...] = ("last", "block-influence", "angular", "activation")
QUANTS: tuple[str, ...] = ("rtn", "awq")
PRUNED_QUANTS: tuple[str, ...] = ("float", *QUANTS)  # float: the pruned model before quantization
SCHEME = "Q4_0"
N_REMOVE = 6
SEED = 0
CALIB_SEQUENCES, CALIB_LEN = 32, 256  # the pipeline's calibration blocks: selection, healing and AWQ
HEAL_STEPS = 40
HEAL_MAX_SECONDS = 600.0
PIPELINE_EVAL_SEQUENCES = 1  # the pipeline's own per-stage perplexity (the bench scores its own blocks)
EVAL_LEN, EVAL_BLOCKS_PER_SOURCE, EVAL_SEED = 256, 8, 1


def config_name(method: str | None, healed: bool, quant: str | None) -> str:
    """Key of one configuration in the results: e.g. `activation/healed/awq`, `original/float`."""
    if method is None:
        return f"original/{quant or 'float'}"
    return f"{method}/{'healed' if healed else 'unhealed'}/{quant}"


def load_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, trust_remote_code=False
    ).eval()


def pipeline_root() -> Path:
    """Where the pipeline runs of this benchmark keep their output folders and stage caches."""
    return bench_cache_dir("compression") / "pipeline"


def pipeline_out(method: str | None) -> Path:
    """The pipeline's output folder of one method (`original` for the unpruned baselines)."""
    return pipeline_root() / (method or "original")


def write_pipeline_data(data: MedicalData, folder: Path) -> tuple[Path, Path]:
    """The pipeline's `--calib` and `--eval` files: calibration QA documents, held-apart plain text.

    Calibration: every source's calibration documents as question/answer JSONL (rendered with the
    chat template by the pipeline, answers labelled for healing). Evaluation: the held-apart texts
    (`MedicalData.evaluation_text`), one `{"text": ...}` line each. Rewritten on every run (same
    content for the same data); the pipeline hashes the documents and blocks, not the files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    calibration = [
        {
            "id": document.id,
            "question": document.question,
            "answer": document.answer,
            "options": list(document.options),
            "context": document.context,
        }
        for document in data.calibration
    ]
    evaluation = [{"text": document.text} for texts in data.evaluation_text.values() for document in texts]
    calib_path, eval_path = folder / "calibration.jsonl", folder / "evaluation.jsonl"
    for path, records in ((calib_path, calibration), (eval_path, evaluation)):
        write_text_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return calib_path, eval_path


def compress_options(
    method: str | None, healed: bool, quant: str, calib_path: Path, eval_path: Path
) -> CompressOptions:
    """The pipeline options of one configuration (`float` and `rtn` share the RTN run, see the docstring)."""
    pruning: dict[str, Any] = (
        {"prune_layers": 0} if method is None else {"prune_layers": N_REMOVE, "method": method}
    )
    return CompressOptions(
        **pruning,
        quant=SCHEME,
        quant_method="awq" if quant == "awq" else "rtn",
        heal=healed,
        heal_steps=HEAL_STEPS,
        heal_seconds=HEAL_MAX_SECONDS,
        calib=str(calib_path),
        eval_data=str(eval_path),
        calib_sequences=CALIB_SEQUENCES,
        seq_len=CALIB_LEN,
        eval_sequences=PIPELINE_EVAL_SEQUENCES,
        seed=SEED,
    )


def stage_time(record: dict[str, Any], stage: str, timer: Timer) -> dict[str, Any]:
    """A stage's compute time (as the pipeline recorded it, also when resumed) and the load averages."""
    return {
        "seconds": record["stages"][stage].get("seconds"),
        "loadavg_start": timer.load_start,
        "loadavg_end": timer.load_end,
    }


def quant_record(quant: str, record: dict[str, Any]) -> dict[str, Any]:
    """What a configuration records of its quantization: none (float), the scheme (RTN), the AWQ record."""
    if quant == "float":
        return {"method": "none"}
    if quant == "rtn":
        return dict(record["quant"])
    return {key: value for key, value in (record["awq"] or {}).items() if key not in ("layers",)}


def refresh_setup(results: dict[str, Any], record: dict[str, Any]) -> None:
    """Fill the setup with the knobs a pipeline run reports: AWQ's search and the healing batch."""
    setup = results["setup"]
    awq = record.get("awq")
    if awq:
        setup["awq_knobs"] = {
            "n_grid": awq.get("n_grid"),
            "search_tokens": awq.get("calibration", {}).get("search_tokens"),
            "clip_tokens": awq.get("calibration", {}).get("clip_tokens"),
            "clip": awq.get("clip"),
        }
    heal = record.get("heal")
    if heal:
        setup["heal"]["batch_size"] = heal.get("batch_size")


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    results = read_json(RESULTS) if not args.fresh else {}
    if args.fresh:
        shutil.rmtree(pipeline_root(), ignore_errors=True)  # recompute selections and healings too
    previous_setup = results.get("setup", {})
    results.setdefault("configs", {})
    results.setdefault("selections", {})
    results.setdefault("heals", {})
    results.setdefault("runs", [])
    run_record = {
        "command": command_line(),
        "started": utc_now(),
        "loadavg_start": load_average(),
        "threads": args.threads,
    }
    start = time.perf_counter()

    def checkpoint() -> None:
        run_record["loadavg_now"] = load_average()
        run_record["wall_seconds"] = round(time.perf_counter() - start, 1)
        write_json_atomic(RESULTS, results)
        update_benchmarks_doc("compression", render(results))

    results["runs"].append(run_record)
    model_dir = resolve_model_dir(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    data = load_medical_data()
    calib_path, eval_path = write_pipeline_data(data, bench_cache_dir("compression") / "data")
    eval_ids = evaluation_blocks(data, tokenizer, EVAL_LEN, EVAL_BLOCKS_PER_SOURCE, EVAL_SEED)
    # The blocks every pipeline run below prepares from the same options: recorded once here.
    blocks = _prepare_data(tokenizer, compress_options(None, False, "rtn", calib_path, eval_path))
    if blocks.heal_labels is not None:
        loss_tokens = TrainingBlocks(blocks.heal_ids, blocks.heal_labels, 0).loss_tokens
    else:
        loss_tokens = int(blocks.heal_ids[:, 1:].numel())
    previous_heal = previous_setup.get("heal", {})
    results["setup"] = {
        "model": "demo (SmolLM2-135M-Instruct, 30 layers)",
        "scheme": SCHEME,
        "scheme_note": "decoder linears fake-quantized on the Q4_0 grid (bit-exact with GGUF Q4_0); "
        "embeddings / tied output head float",
        "layers_removed": N_REMOVE,
        "seed": SEED,
        "data": data.record,
        "selection_calibration": blocks.calibration,
        "awq_calibration": blocks.calibration,
        "awq_knobs": previous_setup.get("awq_knobs"),
        "heal": {
            "steps": HEAL_STEPS,
            "max_seconds": HEAL_MAX_SECONDS,
            "batch_size": previous_heal.get("batch_size"),
            "block_len": CALIB_LEN,
            "blocks": int(blocks.heal_ids.shape[0]),
            "loss_tokens": loss_tokens,
            "labels": "answer tokens of calibration QA documents",
        },
        "method_knobs": {
            method: {"quant_scheme": SCHEME}
            for method in METHODS
            if "quant_scheme" in get_selection_method(method).knobs
        },
        "eval": {
            "block_len": EVAL_LEN,
            "blocks_per_source": EVAL_BLOCKS_PER_SOURCE,
            "seed": EVAL_SEED,
            "blocks": int(eval_ids.shape[0]),
            "scored_tokens": int(eval_ids.shape[0] * (EVAL_LEN - 1)),
        },
        "threads": args.threads,
    }
    checkpoint()

    original = load_model(model_dir)
    reference = score_model(original, eval_ids)
    print(f"original float: perplexity {reference.perplexity:.3f}", flush=True)

    def finish(name: str, model: Any, extra: dict[str, Any]) -> None:
        scores = score_model(model, eval_ids, reference.argmax)
        results["configs"][name] = {
            **extra,
            **scores.to_dict(),
            "loadavg": load_average(),
            "finished": utc_now(),
        }
        checkpoint()
        print(
            f"{name}: perplexity {scores.perplexity:.3f}, top-1 agreement {scores.top1_agreement:.4f}",
            flush=True,
        )

    if config_name(None, False, None) not in results["configs"]:
        finish(config_name(None, False, None), original, {"layers_removed": []})
    del original

    plan: list[tuple[str | None, bool, str]] = [(None, False, quant) for quant in QUANTS]
    plan += [
        (method, healed, quant)
        for method in args.methods
        for healed in (False, True)
        for quant in PRUNED_QUANTS
    ]
    for method, healed, quant in plan:
        name = config_name(method, healed, quant)
        if name in results["configs"]:
            continue
        options = compress_options(method, healed, quant, calib_path, eval_path)
        with Timer() as timer:
            result = compress(MODEL, pipeline_out(method), options, progress=True)
        record = result.record
        refresh_setup(results, record)
        if method is not None:
            prune = record["stages"]["prune"]
            if method not in results["selections"] or not prune.get("resumed", True):
                results["selections"][method] = {
                    **record["selection"],
                    "time": stage_time(record, "prune", timer),
                }
                print(f"{method}: removes {record['layers_removed']}", flush=True)
            heal = record["stages"]["heal"]
            if (
                healed
                and record["heal"]
                and (method not in results["heals"] or not heal.get("resumed", True))
            ):
                results["heals"][method] = {**record["heal"], "time": stage_time(record, "heal", timer)}
            checkpoint()
        model = load_model(result.checkpoint)
        if quant != "float":
            fake_quantize_model(model, SCHEME)  # what the exporter writes: the export grid's values
        finish(
            name,
            model,
            {
                "layers_removed": record["layers_removed"],
                "quant": quant_record(quant, record),
                "quant_time": stage_time(record, "quantize", timer),
            },
        )
        del model
    run_record["finished"] = utc_now()
    checkpoint()
    return results


def render(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: one row per configuration."""
    configs = results.get("configs", {})
    setup = results.get("setup", {})

    def cell(name: str) -> str:
        entry = configs.get(name)
        if entry is None:
            return "-"
        return f"{entry['perplexity']:.2f} / {entry.get('top1_agreement', 1.0):.3f}"

    rows = [["original (30 layers)", "-", "-", *(cell(config_name(None, False, q)) for q in (None, *QUANTS))]]
    for method in METHODS:
        layers = results.get("selections", {}).get(method, {}).get("layers_to_remove")
        for healed in (False, True):
            if not any(config_name(method, healed, q) in configs for q in PRUNED_QUANTS):
                continue
            rows.append(
                [
                    method,
                    ",".join(map(str, layers or [])),
                    "yes" if healed else "no",
                    *(cell(config_name(method, healed, q)) for q in PRUNED_QUANTS),
                ]
            )
    awq_knobs = setup.get("awq_knobs") or {}
    heal_setup = setup.get("heal") or {}
    heal_steps = (
        ", ".join(f"{m}: {h['steps']} steps" for m, h in results.get("heals", {}).items()) or "none yet"
    )
    runs = results.get("runs", [])
    wall = sum(run.get("wall_seconds", 0.0) for run in runs)
    data = setup.get("data", {}).get("sources", {})
    data_lines = "; ".join(
        f"{source}: {info.get('eval_texts')} held-apart {info.get('eval_text')} "
        f"(eval sha256 {str(info.get('eval_text_sha256'))[:12]}, calibration sha256 {str(info.get('calibration_sha256'))[:12]})"
        for source, info in data.items()
    )
    return "\n".join(
        [
            "## Compression methods (bench 1)",
            "",
            "Command: `.venv/bin/python -m bench.compression` (raw: `docs/benchmarks/compression.json`).",
            f"Demo model, {N_REMOVE} of 30 layers removed, decoder linears fake-quantized on the {SCHEME} grid. "
            f"Perplexity and top-1 agreement with the float original on {setup.get('eval', {}).get('scored_tokens')} "
            f"held-apart tokens ({setup.get('eval', {}).get('blocks')} x {EVAL_LEN}); {data_lines}. "
            "Each configuration is one `toolkit.compress.pipeline.compress` run (prune -> heal -> quantize, stage "
            "cache shared by a method's configurations); selection, healing and AWQ on the pipeline's "
            f"{CALIB_SEQUENCES} x {CALIB_LEN} calibration tokens (AWQ n_grid {awq_knobs.get('n_grid', '-')}, "
            f"clip {'on' if awq_knobs.get('clip', True) else 'off'}), healing up to {HEAL_STEPS} LoRA steps of "
            f"{heal_setup.get('batch_size') or '-'} x {CALIB_LEN} within {HEAL_MAX_SECONDS:.0f} s ({heal_steps}). "
            f"Wall time of all runs: {wall / 60:.0f} min on {setup.get('threads')} torch thread(s) "
            "(shared 2-core machine; load averages in the JSON).",
            "",
            "Cells: perplexity / top-1 agreement with the float original (lower / higher is better). "
            f"`float` = no quantization; `RTN` / `AWQ` = decoder linears on the {SCHEME} grid.",
            "",
            markdown_table(
                ["selection", "layers removed", "healed", "float", f"RTN {SCHEME}", f"AWQ {SCHEME}"], rows
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore finished configurations in the JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    results = run(args)
    update_benchmarks_doc("compression", render(results))


if __name__ == "__main__":
    main()
