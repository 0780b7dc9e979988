"""Healing objective on the demo model: the LM loss (`ce`) against distillation from the unpruned model (`kd`).

    .venv/bin/python -m bench.heal_objective          # docs/benchmarks/heal_objective.json

The demo model with layers 12-17 removed (block influence's choice at the default calibration, plain removal),
healed from the same start by LoRA (rank 8, alpha 16, lr 2e-4, 40 steps of 4 blocks, toolkit.compress.heal) on
32 x 256 tokens of the radiology reports' calibration split, once per objective; then the KL of each to the
unpruned model on 8 x 256 held-apart radiology tokens (the split's evaluation side):

    KL = mean_t sum_v p(v | x_<t) (log p(v | x_<t) - log q(v | x_<t))     p: the unpruned model, q: healed

`kd` trains on the teacher's top-64 log-probabilities (`teacher_targets`, `kd_loss_sum`). Skips (exit 0) when the
radiology reports or the demo model are absent.
"""

from __future__ import annotations

import copy
import time

import torch

from bench.common import RESULTS_DIR, load_average, utc_now, write_json_atomic

RESULTS = RESULTS_DIR / "heal_objective.json"
REMOVED = list(range(12, 18))
STEPS, TRAIN_BLOCKS, EVAL_BLOCKS, SEQ_LEN = 40, 32, 8, 256


def _kl(reference: torch.Tensor, model: torch.nn.Module, held: torch.Tensor) -> float:
    with torch.no_grad():
        log_q = torch.cat(
            [torch.log_softmax(model(input_ids=held[i : i + 4]).logits, -1) for i in range(0, len(held), 4)]
        )
    return float((reference.exp() * (reference - log_q)).sum(-1).mean())


def main() -> None:
    from transformers import AutoModelForCausalLM

    from toolkit.compress.heal import heal, teacher_targets
    from toolkit.compress.prune import remove_layers
    from toolkit.compress.stages import load_tokenizer
    from toolkit.core.errors import BedsideError
    from toolkit.data.blocks import make_blocks, split_calibration_eval
    from toolkit.data.sources import load_dataset_spec
    from toolkit.model.source import resolve_model_dir

    try:
        folder = resolve_model_dir("demo", need_weights=True)
        documents = load_dataset_spec("radiology")
    except BedsideError as error:
        print(f"bench.heal_objective: skipped ({error})")
        return
    torch.set_num_threads(2)
    tokenizer = load_tokenizer(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    calibration, evaluation, _ = split_calibration_eval(documents, 0.2, seed=0)
    train = make_blocks(calibration, tokenizer, SEQ_LEN, TRAIN_BLOCKS, seed=0).input_ids
    held = make_blocks(evaluation, tokenizer, SEQ_LEN, EVAL_BLOCKS, seed=1).input_ids
    with torch.no_grad():
        reference = torch.cat(
            [torch.log_softmax(teacher(input_ids=held[i : i + 4]).logits, -1) for i in range(0, len(held), 4)]
        )
    pruned = copy.deepcopy(teacher)
    remove_layers(pruned, REMOVED)
    rows = {"unhealed": {"kl": _kl(reference, pruned, held)}}
    targets = teacher_targets(teacher, train)
    for objective in ("ce", "kd"):
        started = time.perf_counter()
        result = heal(
            copy.deepcopy(pruned), None, train, max_steps=STEPS, seed=0, progress=False,
            teacher=targets if objective == "kd" else None,
        )  # fmt: skip
        rows[objective] = {
            "kl": _kl(reference, result.model, held),
            "seconds": round(time.perf_counter() - started, 1),
            "initial_loss": result.record.initial_loss,
            "final_loss": result.record.final_loss,
        }
        print(objective, rows[objective], flush=True)
    write_json_atomic(
        RESULTS,
        {
            "command": ".venv/bin/python -m bench.heal_objective",
            "removed_layers": REMOVED,
            "steps": STEPS,
            "train_tokens": [TRAIN_BLOCKS, SEQ_LEN],
            "eval_tokens": [EVAL_BLOCKS, SEQ_LEN],
            "rows": rows,
            "load_average_end": load_average(),
            "measured": utc_now(),
        },
    )
    print({key: round(value["kl"], 4) for key, value in rows.items()})


if __name__ == "__main__":
    main()
