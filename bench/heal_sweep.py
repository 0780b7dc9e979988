"""Healing settings on bench 8's pruned demo model, in float: KL to the unpruned model on held-apart text.

    .venv/bin/python -m bench.heal_sweep --threads 2 --lr 1e-3 --steps 40 [--rank 8]

A fast proxy for bench 8's healed rows (which add AWQ, the GGUF export and llama.cpp): bench 8's
`pruned-activation+linear+awq` prune stage (6 of 30 layers removed by activation selection, each removed span
replaced by its fitted linear map; float weights) is healed with LoRA by distillation (`--heal-objective kd`,
the pipeline's data: 64 x 512 PubMedQA/MedQuAD calibration tokens, answer-only targets; `--heal-sequences N`
heals on N sequences of the same calibration file, `--kd-positions all` counts every position), and scored in float
against the demo model on 8 x 512 tokens of bench 8's evaluation text: mean over positions of
KL(demo || healed), in nats. Each run appends one row (settings, KL before and after, seconds) to
docs/benchmarks/heal_sweep.json. Needs bench 8's cache (`python -m bench.quant_methods` first).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import (
    RESULTS_DIR,
    bench_cache_dir,
    command_line,
    load_average,
    read_json,
    utc_now,
    write_json_atomic,
)

RESULTS = RESULTS_DIR / "heal_sweep.json"
VARIANT = "pruned-activation+linear+awq"
EVAL_SEQUENCES, SEQ_LEN = 8, 512


def _log_probs(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [torch.log_softmax(model(ids[i : i + 2]).logits.float(), -1) for i in range(0, len(ids), 2)]
        )


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Heal once with the given settings; the row for the JSON."""
    from transformers import AutoModelForCausalLM

    from toolkit.compress.heal import IGNORE_INDEX, heal, teacher_targets
    from toolkit.compress.pipeline import _prepare_data
    from toolkit.compress.record import CompressOptions
    from toolkit.core.tokenizer_loading import load_auto_tokenizer
    from toolkit.data import load_dataset_spec, make_blocks
    from toolkit.model.source import resolve_model_dir

    torch.set_num_threads(args.threads)
    root = bench_cache_dir("quant_methods")
    stages = sorted((root / VARIANT / "stages").glob("prune-*"))
    if not stages:
        raise SystemExit(f"no prune stage under {root / VARIANT}: run `python -m bench.quant_methods` first")
    demo = resolve_model_dir("demo")
    tokenizer = load_auto_tokenizer(demo)
    options = CompressOptions(
        prune_layers=6, quant="Q4_0", calib=str(root / "data" / "calibration.jsonl"),
        eval_data=str(root / "data" / "evaluation.jsonl"), calib_sequences=args.heal_sequences, seq_len=SEQ_LEN,
        eval_sequences=1,
    )  # fmt: skip  (bench 8's pruned rows)
    data = _prepare_data(tokenizer, options)
    held = make_blocks(
        load_dataset_spec(str(root / "data" / "evaluation.jsonl")), tokenizer, SEQ_LEN, EVAL_SEQUENCES, 0
    ).input_ids
    teacher_model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32, trust_remote_code=False).eval()
    reference = _log_probs(teacher_model, held)
    teacher = teacher_targets(teacher_model, data.heal_ids)
    del teacher_model
    student = AutoModelForCausalLM.from_pretrained(stages[-1], dtype=torch.float32, trust_remote_code=False).eval()
    before = _kl(reference, _log_probs(student, held))
    labels = data.heal_labels if args.kd_positions == "answers" else None
    positions = int(data.heal_ids[:, 1:].numel())  # every position that has a next token
    load = load_average()
    start = time.perf_counter()
    result = heal(
        student, tokenizer, data.heal_ids, train_labels=labels, lr=args.lr, max_steps=args.steps,
        rank=args.rank, seed=0, progress=False, teacher=teacher,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    return {
        "finished": utc_now(),
        "command": command_line(),
        "lr": args.lr,
        "steps": args.steps,
        "rank": args.rank,
        "alpha": 2.0 * args.rank,
        "objective": "kd",
        "kd_positions": args.kd_positions,
        "heal_sequences": args.heal_sequences,
        "positions_counted": positions if labels is None else int((labels[:, 1:] != IGNORE_INDEX).sum()),
        "positions": positions,
        "kl_unhealed": round(before, 4),
        "kl_healed": round(_kl(reference, _log_probs(result.model.eval(), held)), 4),
        "final_loss": result.record.final_loss,
        "heal_seconds": round(seconds, 1),
        "threads": args.threads,
        "loadavg_start": load,
        "loadavg_end": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument(
        "--heal-sequences", type=int, default=64,
        help="512-token calibration sequences to heal on (default 64: bench 8's calibration)",
    )  # fmt: skip
    parser.add_argument(
        "--kd-positions", choices=("answers", "all"), default="answers",
        help="positions the distillation loss counts: the answers (the LM loss's mask) or every position",
    )  # fmt: skip
    args = parser.parse_args()
    row = run(args)
    print(row)
    results = read_json(RESULTS) or {"benchmark": "healing settings, float proxy of bench 8's healed row", "rows": []}
    results["rows"].append(row)
    write_json_atomic(RESULTS, results)


if __name__ == "__main__":
    main()
