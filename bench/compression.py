"""Bench 1: layer-selection methods x {RTN, AWQ} x {healed, not healed} on the demo model at 4 bits.

Run from the repository root (resumes: finished configurations in the JSON are skipped):

    .venv/bin/python -m bench.compression            # docs/benchmarks/compression.json + BENCHMARKS.md

Setting: SmolLM2-135M-Instruct (30 layers), 6 layers removed (20 %), decoder linears fake-quantized
on the Q4_0 grid (`toolkit.compress.quant.grids`, bit-exact with the GGUF Q4_0 export; embeddings and the
tied output head stay float in this emulation). Per method in {last, block-influence, angular,
activation}: the selection is computed once on 8 x 128 calibration tokens (activation scores
candidates on the Q4_0-fake-quantized model, `quant_scheme="Q4_0"`, `top_k_candidates=8`), the
layers are removed, the pruned model is healed once (LoRA, `toolkit.compress.heal.heal`, 40 steps of
4 x 256-token answer-labelled QA blocks), and RTN and AWQ are applied to copies of the healed and
the unhealed model. Baselines: the float original, original + RTN, original + AWQ.

Scores (bench/common.py): perplexity = exp(mean_t -log q(x_t | x_<t)) on held-apart PubMedQA
contexts and MedQuAD answers, and top-1 agreement = mean_t [argmax q = argmax p_float] with the
unpruned float model on the same tokens.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    Timer,
    bench_cache_dir,
    calibration_blocks,
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
)
from toolkit.compress.heal import heal, question_answer_training_blocks
from toolkit.compress.prune import remove_layers, select_layers
from toolkit.compress.quant.awq import awq
from toolkit.compress.quant.rtn import fake_quantize_model, rtn
from toolkit.model.source import resolve_model_dir

RESULTS = RESULTS_DIR / "compression.json"
METHODS: tuple[str, ...] = ("last", "block-influence", "angular", "activation")
QUANTS: tuple[str, ...] = ("rtn", "awq")
PRUNED_QUANTS: tuple[str, ...] = ("float", *QUANTS)  # float: the pruned model before quantization
SCHEME = "Q4_0"
N_REMOVE = 6
SEED = 0
SELECTION_BLOCKS, SELECTION_LEN = 8, 128
AWQ_BLOCKS, AWQ_LEN = 32, 256
AWQ_KNOBS: dict[str, Any] = {"n_grid": 10, "search_tokens": 1024, "clip_tokens": 256, "clip": True}
HEAL_STEPS, HEAL_BATCH, HEAL_LEN = 40, 4, 256
HEAL_MAX_SECONDS = 600.0
EVAL_LEN, EVAL_BLOCKS_PER_SOURCE, EVAL_SEED = 256, 8, 1
METHOD_KNOBS: dict[str, dict[str, Any]] = {
    "activation": {"quant_scheme": SCHEME, "top_k_candidates": 8, "max_sequences": 8, "max_tokens": 128}
}


def config_name(method: str | None, healed: bool, quant: str | None) -> str:
    """Key of one configuration in the results: e.g. `activation/healed/awq`, `original/float`."""
    if method is None:
        return f"original/{quant or 'float'}"
    return f"{method}/{'healed' if healed else 'unhealed'}/{quant}"


def load_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def quantize(model: Any, quant: str, calib_ids: Any) -> dict[str, Any]:
    """Fake-quantize `model` in place with RTN or AWQ (+ the grid); returns the stage record."""

    if quant == "float":
        return {"method": "none"}
    if quant == "rtn":
        return rtn(model, SCHEME).record
    result = awq(model, calib_ids, SCHEME, progress=True, seed=SEED, **AWQ_KNOBS)
    fake_quantize_model(model, SCHEME)
    return {key: value for key, value in result.record.items() if key not in ("layers",)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    results = read_json(RESULTS) if not args.fresh else {}
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
    model_dir = resolve_model_dir("demo")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_medical_data()
    calib_sel = calibration_blocks(data, tokenizer, SELECTION_LEN, SELECTION_BLOCKS, SEED)
    calib_awq = calibration_blocks(data, tokenizer, AWQ_LEN, AWQ_BLOCKS, SEED + 1)
    heal_blocks = question_answer_training_blocks(
        data.calibration, tokenizer, HEAL_LEN, HEAL_STEPS * HEAL_BATCH, SEED + 2
    )
    eval_ids = evaluation_blocks(data, tokenizer, EVAL_LEN, EVAL_BLOCKS_PER_SOURCE, EVAL_SEED)
    results["setup"] = {
        "model": "demo (SmolLM2-135M-Instruct, 30 layers)",
        "scheme": SCHEME,
        "scheme_note": "decoder linears fake-quantized on the Q4_0 grid (bit-exact with GGUF Q4_0); "
        "embeddings / tied output head float",
        "layers_removed": N_REMOVE,
        "seed": SEED,
        "data": data.record,
        "selection_calibration": calib_sel.to_dict(),
        "awq_calibration": calib_awq.to_dict(),
        "awq_knobs": AWQ_KNOBS,
        "heal": {
            "steps": HEAL_STEPS,
            "batch_size": HEAL_BATCH,
            "block_len": HEAL_LEN,
            "blocks": int(heal_blocks.input_ids.shape[0]),
            "loss_tokens": heal_blocks.loss_tokens,
            "labels": "answer tokens of calibration QA documents",
        },
        "method_knobs": METHOD_KNOBS,
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
    for quant in QUANTS:
        name = config_name(None, False, quant)
        if name in results["configs"]:
            continue
        candidate = copy.deepcopy(original)
        with Timer() as timer:
            record = quantize(candidate, quant, calib_awq.input_ids)
        finish(name, candidate, {"layers_removed": [], "quant": record, "quant_time": timer.record()})
        del candidate

    for method in args.methods:
        wanted = [config_name(method, healed, quant) for healed in (False, True) for quant in PRUNED_QUANTS]
        if all(name in results["configs"] for name in wanted):
            continue
        if method not in results["selections"]:
            with Timer() as timer:
                selection = select_layers(
                    method, original, calib_sel.input_ids, N_REMOVE, **METHOD_KNOBS.get(method, {})
                )
            results["selections"][method] = {**selection.to_dict(), "time": timer.record()}
            checkpoint()
        layers = results["selections"][method]["layers_to_remove"]
        print(f"{method}: removes {layers}", flush=True)
        pruned = remove_layers(copy.deepcopy(original), layers)
        for healed in (False, True):
            names = [config_name(method, healed, quant) for quant in PRUNED_QUANTS]
            if all(name in results["configs"] for name in names):
                continue
            base = pruned
            if healed:
                cached = bench_cache_dir("compression") / f"{method}-healed"
                if (cached / "config.json").is_file() and method in results["heals"]:
                    base = load_model(cached)
                else:
                    base = copy.deepcopy(pruned)
                    with Timer() as timer:
                        healing = heal(
                            base,
                            tokenizer,
                            heal_blocks.input_ids,
                            train_labels=heal_blocks.labels,
                            max_steps=HEAL_STEPS,
                            max_seconds=HEAL_MAX_SECONDS,
                            batch_size=HEAL_BATCH,
                            seed=SEED,
                        )
                    base = healing.model.eval()
                    base.save_pretrained(cached)
                    results["heals"][method] = {
                        **healing.record.model_dump(mode="json"),
                        "time": timer.record(),
                    }
                    checkpoint()
            for quant in PRUNED_QUANTS:
                name = config_name(method, healed, quant)
                if name in results["configs"]:
                    continue
                candidate = copy.deepcopy(base)
                with Timer() as timer:
                    record = quantize(candidate, quant, calib_awq.input_ids)
                finish(
                    name, candidate, {"layers_removed": layers, "quant": record, "quant_time": timer.record()}
                )
                del candidate
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
            f"Selection on {SELECTION_BLOCKS} x {SELECTION_LEN} calibration tokens, AWQ on {AWQ_BLOCKS} x {AWQ_LEN} "
            f"(n_grid {AWQ_KNOBS['n_grid']}, clip on), healing up to {HEAL_STEPS} LoRA steps of {HEAL_BATCH} x {HEAL_LEN} "
            f"within {HEAL_MAX_SECONDS:.0f} s ({heal_steps}). "
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
