"""`compress`: prune -> heal -> quantize a checkpoint, with a resumable stage cache and compression.json.

Why: the plan says how many layers to remove and which scheme to export; this turns a source
checkpoint into export-ready weights and a machine-readable record of everything it did.

Stages (each reads the previous one's checkpoint and writes its own folder, see
`toolkit.compress.stages` for the cache, hashes and atomic writes):

1. **prune**: choose the layers (`toolkit.compress.prune.select_layers`, or the explicit `layers`, e.g. a
   plan's), with `replace="linear"` (the default) fit one linear map per removed span on the calibration
   blocks and fold it into the block before the span (`toolkit.compress.prune.replace`, ReplaceMe: no
   extra parameters; its loss before and after goes to compression.json `replacement`), then remove them
   (`remove_layers`). Done here, before healing and AWQ, so both see the replaced model. Skipped when no
   layer is removed.
2. **heal**: LoRA fine-tune on the calibration data, merged (`toolkit.compress.heal.heal`); question/answer
   data trains on the answers only (`question_answer_training_blocks`). Skipped when no layer was
   removed or with `heal=False`.
3. **quantize** (methods: `toolkit.compress.quant.methods`): AWQ (`toolkit.compress.quant.awq.awq`) folds
   scales and clipping into *float* weights and writes llama.cpp's importance matrix of the scaled model for
   GGUF schemes (its search rounds as the export will, with that matrix); `awq-gptq` (what `auto`, the
   default, picks for GGUF) then rounds each Q4_0 / Q5_0 linear by GPTQ onto the export's exact grid
   (`toolkit.compress.quant.gptq`), so those weights are already the stored codes; RTN leaves the weights as they
   are; `imatrix` (llama.cpp's own method, GGUF only) leaves them too and writes the matrix of the unscaled
   model (`toolkit.compress.quant.imatrix`). The exporter rounds in every case, with the matrix when one is
   written. Skipped without a scheme, or for float schemes (F16, fp16, fp32).

Quality per stage is the token-level perplexity (formula in `toolkit.compress.stages`) on held-apart
evaluation blocks that share no document with the calibration data: `original`, `pruned`, `healed`
and `quantized`, the last on the weights fake-quantized with the export grid
(`fake_quantize_model`), i.e. what the exported file will hold. The fake quantization is applied
to the in-memory model after the quantize stage has saved its float weights (no second copy of
the model is held), and that model is then discarded.

Layout of `out/`: `checkpoint/` (HF safetensors + config + tokenizer + chat template),
`compression.json`, `imatrix.gguf` (GGUF schemes with AWQ or imatrix), `stages/<stage>-<hash12>/` and
`stages/quality.json` (perplexities by stage hash and evaluation data, so a resumed run does not
recompute them).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from exporters.gguf_imatrix import read_imatrix
from toolkit import __version__
from toolkit.compress.heal import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_RANK,
    HEAL_OBJECTIVES,
    heal,
    question_answer_training_blocks,
    teacher_targets,
)
from toolkit.compress.prune import check_layer_indices, get_selection_method, remove_layers, select_layers
from toolkit.compress.prune.replace import check_replace_mode, replace_removed_layers
from toolkit.compress.quant import get_grid
from toolkit.compress.quant.awq import SEARCH_ROUNDINGS, awq, resolve_propagation, resolve_search_precision
from toolkit.compress.quant.imatrix import gather_imatrix
from toolkit.compress.quant.methods import AWQ_METHODS, GGUF_ONLY_METHODS, resolve_quant_method
from toolkit.compress.quant.methods import QUANT_METHODS as QUANT_METHOD_REGISTRY
from toolkit.compress.quant.rtn import fake_quantize_model, linear_quantizer
from toolkit.compress.record import CompressionRecord, CompressOptions
from toolkit.compress.stages import (
    StageRunner,
    eval_overlap,
    link_checkpoint,
    load_causal_lm,
    load_tokenizer,
    stage_hash,
)
from toolkit.compress.vision import VisionCalibration, slots_for
from toolkit.core.atomic import building_folder, remove_stale_temporaries, write_json_atomic
from toolkit.core.errors import BedsideError, NothingFitsError
from toolkit.core.formats import FORMATS, all_schemes, format_of_scheme
from toolkit.core.hashing import sha256_json, token_ids_sha256, weights_sha256
from toolkit.core.output_dir import check_out_dir, make_out_dir
from toolkit.core.records import COMPRESSION_RECORD, DEFAULT_DATA, EVAL_FRACTION, default_data
from toolkit.data import data_sha256, load_dataset_spec, make_blocks, split_calibration_eval
from toolkit.model.checkpoint import loadable_checkpoint
from toolkit.model.facts import read_facts
from toolkit.model.llava import is_vision_language, require_processor
from toolkit.plan.compression_memory import SEQUENTIAL_THRESHOLD_BYTES, heals_in_sixteen_bits

if TYPE_CHECKING:
    from toolkit.plan.schema import Plan

STAGES: tuple[str, ...] = ("prune", "heal", "quantize")
MAX_HEAL_SEQUENCES = 1024  # healing blocks (the teacher's top-k targets: seq_len x 64 x 12 bytes each)
QUANT_METHODS: tuple[str, ...] = tuple(QUANT_METHOD_REGISTRY)  # awq, rtn, imatrix
MAX_CALIBRATION_SEQUENCES = 128
DEFAULT_CALIBRATION = DEFAULT_DATA
IMATRIX_NAME = "imatrix.gguf"
AWQ_PROPAGATION = "auto"  # bfloat16 for the non-search sequences where the CPU multiplies it natively
AWQ_ALPHA_SEARCH = "climb"  # every third alpha, then the best one's neighbours to a local minimum (awq.ALPHA_SEARCHES)
AWQ_SEARCH_PRECISION = "auto"  # bfloat16 candidates per group where that measures fine (awq.SEARCH_PRECISIONS)
AWQ_BATCH_SIZE = 4  # sequences per pass: the order of the statistics' float sums, so part of the stage's inputs
SEQUENTIAL_MODES: tuple[str, ...] = ("auto", "on", "off")
# Selection methods with a block-by-block form (toolkit.compress.sequential.scoring; `last` needs no forward).
SEQUENTIAL_SELECTION_METHODS: tuple[str, ...] = ("activation", "block-influence", "angular", "last")


@dataclass
class CompressResult:
    """Where the compressed checkpoint is, the compression.json content and the importance matrix."""

    checkpoint: Path  # final HF checkpoint folder (out/checkpoint)
    record: dict[str, Any]  # the content of compression.json
    imatrix: Path | None  # llama.cpp importance matrix (GGUF schemes with AWQ), else None

    @property
    def source_sha256(self) -> str:
        """weights_sha256 of the source checkpoint, as compress hashed it (compression.json model.source_sha256)."""
        return str(self.record["model"]["source_sha256"])


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def layers_to_remove_count(options: CompressOptions) -> int:
    """How many layers the options remove (the explicit list wins over `prune_layers`)."""
    return len(options.layers) if options.layers is not None else options.prune_layers


def validate_options(options: CompressOptions, num_layers: int | None = None) -> None:
    """Refuse impossible options with a one-line BedsideError naming the option and the fix."""

    if isinstance(options.prune_layers, bool) or options.prune_layers < 0:
        raise BedsideError(f"--prune-layers must be 0 or more, got {options.prune_layers}")
    if num_layers is not None:
        if options.layers is not None:
            check_layer_indices(list(options.layers), num_layers)
        elif options.prune_layers >= num_layers:
            raise BedsideError(
                f"cannot remove {options.prune_layers} of {num_layers} decoder layers (all of them or more): "
                f"use --prune-layers {num_layers - 1} or fewer"
            )
    if options.layers is None and options.prune_layers > 0:
        get_selection_method(options.method)  # names the allowed methods when unknown
    check_replace_mode(options.replace)
    selecting = options.layers is None and options.prune_layers > 0
    if selecting and options.method == "replace-aware" and options.replace == "none":
        raise BedsideError(
            "--method replace-aware scores spans by their loss after linear replacement: use it with --replace linear"
        )
    if options.quant is not None and options.quant not in all_schemes():
        raise BedsideError(
            f"unknown quantization scheme {options.quant!r}: choose one of {', '.join(all_schemes())}"
        )
    if options.quant_method not in QUANT_METHODS:
        raise BedsideError(
            f"unknown quantization method {options.quant_method!r}: choose one of {', '.join(QUANT_METHODS)}"
        )
    if (
        options.quant_method in GGUF_ONLY_METHODS
        and options.quant is not None
        and format_of_scheme(options.quant) != "gguf"
    ):
        raise BedsideError(
            f"--quant-method {options.quant_method} applies to GGUF schemes only, not {options.quant!r} "
            f"(use awq or rtn)"
        )
    if options.awq_search_rounding not in SEARCH_ROUNDINGS:
        raise BedsideError(
            f"--awq-search-rounding must be one of {', '.join(SEARCH_ROUNDINGS)}, got {options.awq_search_rounding!r}"
        )
    if not 1 <= options.calib_sequences <= MAX_CALIBRATION_SEQUENCES:
        raise BedsideError(
            f"--calib-sequences must be between 1 and {MAX_CALIBRATION_SEQUENCES}, got {options.calib_sequences}"
        )
    if options.seq_len < 2:
        raise BedsideError(f"--seq-len must be at least 2 tokens, got {options.seq_len}")
    if options.eval_sequences < 1:
        raise BedsideError(f"eval sequences must be at least 1, got {options.eval_sequences}")
    if options.heal_steps < 1:
        raise BedsideError(f"--heal-steps must be at least 1, got {options.heal_steps}")
    if options.heal_sequences is not None and not 1 <= options.heal_sequences <= MAX_HEAL_SEQUENCES:
        raise BedsideError(
            f"--heal-sequences must be between 1 and {MAX_HEAL_SEQUENCES}, got {options.heal_sequences}"
        )
    if not options.heal_lr > 0:
        raise BedsideError(f"--heal-lr must be positive, got {options.heal_lr}")
    if options.heal_rank < 1:
        raise BedsideError(f"--heal-rank must be at least 1, got {options.heal_rank}")
    if options.heal_objective not in HEAL_OBJECTIVES:
        raise BedsideError(
            f"--heal-objective must be one of {', '.join(HEAL_OBJECTIVES)}, got {options.heal_objective!r}"
        )
    if options.sequential not in SEQUENTIAL_MODES:
        raise BedsideError(
            f"--sequential must be one of {', '.join(SEQUENTIAL_MODES)}, got {options.sequential!r}"
        )
    if options.heal_seconds is not None and options.heal_seconds <= 0:
        raise BedsideError(f"heal seconds must be positive, got {options.heal_seconds}")


def options_from_plan(plan: Plan, **overrides: Any) -> CompressOptions:
    """Options from the plan's chosen candidate (layers removed, their indices, scheme), then `overrides`.

    An override of `prune_layers` drops the plan's explicit layer list (it was chosen for another
    count). Raises NothingFitsError when the plan chose nothing.
    """

    if plan.chosen is None:
        raise NothingFitsError(f"the plan chose no candidate: {plan.reason or 'nothing fits'}")
    chosen = plan.chosen
    values: dict[str, Any] = {
        "prune_layers": chosen.layers_removed,
        "layers": tuple(chosen.layers) if chosen.layers is not None else None,
        "quant": chosen.quant,
    }
    if "prune_layers" in overrides and "layers" not in overrides:
        values["layers"] = None
    values.update(overrides)
    try:
        return CompressOptions(**values)
    except TypeError as error:
        raise BedsideError(f"unknown compress option: {error}") from None


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclass
class _Data:
    calib_ids: torch.Tensor
    heal_ids: torch.Tensor
    heal_labels: torch.Tensor | None
    eval_ids: torch.Tensor
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    split: dict[str, Any] | None


def _prepare_data(tokenizer: Any, options: CompressOptions, vision: VisionCalibration | None = None) -> _Data:
    """Calibration blocks, healing blocks (answer-only labels for QA data) and evaluation blocks.

    For a LLaVA (`vision`), image documents' image tokens become image positions
    (`toolkit.compress.vision`) and those positions are never training targets.
    """

    source = options.calib or default_data(vision is not None)
    documents = load_dataset_spec(source)
    split: dict[str, Any] | None = None
    if options.eval_data is None:
        calib_docs, eval_docs, data_record = split_calibration_eval(
            documents, EVAL_FRACTION, options.seed, source=source
        )
        split = data_record.to_dict()
        duplicates = data_record.eval_duplicates_removed
        eval_source = f"{source} (held-apart {EVAL_FRACTION:.0%} split, seed {options.seed})"
    else:
        calib_docs = list(documents)
        calib_keys = {document.content_key() for document in calib_docs}
        drawn = load_dataset_spec(options.eval_data)
        eval_docs = [document for document in drawn if document.content_key() not in calib_keys]
        duplicates = len(drawn) - len(eval_docs)
        eval_source = options.eval_data
        if not eval_docs:
            raise BedsideError(
                f"every document of the evaluation data '{options.eval_data}' also occurs in the "
                "calibration data: pass different --eval data"
            )
    overlap = eval_overlap({d.content_key() for d in calib_docs}, [d.content_key() for d in eval_docs])
    if overlap:
        raise AssertionError(f"{overlap} evaluation documents occur in the calibration data")

    expand = vision.slots.expand if vision is not None else None
    if vision is None and any(document.image is not None for document in calib_docs):
        raise BedsideError(
            f"the calibration data '{source}' holds images but the model is text-only: "
            "pass text or question/answer data, or a LLaVA checkpoint"
        )
    calib = make_blocks(
        calib_docs, tokenizer, options.seq_len, options.calib_sequences, options.seed, source=source, expand=expand
    )
    evaluation = make_blocks(
        eval_docs, tokenizer, options.seq_len, options.eval_sequences, options.seed, source=eval_source, expand=expand
    )
    heal_sequences = options.heal_sequences or options.calib_sequences
    if any(document.is_question_answer for document in calib_docs):
        training = question_answer_training_blocks(
            calib_docs, tokenizer, options.seq_len, heal_sequences, options.seed, source=source, expand=expand
        )
        heal_ids, heal_labels = training.input_ids, training.labels
        if options.heal and training.loss_tokens == 0:
            raise BedsideError(
                f"the question/answer data '{source}' has no answer token in its first "
                f"{heal_ids.numel()} tokens (the prompts are longer): raise "
                f"{'--heal-sequences' if options.heal_sequences else '--calib-sequences'} or --seq-len"
            )
    elif heal_sequences != options.calib_sequences:
        heal_ids = make_blocks(
            calib_docs, tokenizer, options.seq_len, heal_sequences, options.seed, source=source, expand=expand
        ).input_ids
        heal_labels = None
    else:
        heal_ids, heal_labels = calib.input_ids, None
    if vision is not None:
        heal_labels = vision.slots.text_targets(heal_ids if heal_labels is None else heal_labels)
    calib_ids = calib.input_ids
    return _Data(
        calib_ids=calib_ids,
        heal_ids=heal_ids,
        heal_labels=heal_labels,
        eval_ids=evaluation.input_ids,
        calibration={
            "source": source,
            "sha256": data_sha256(calib_docs),
            "blocks_sha256": token_ids_sha256(calib_ids),
            "documents": len(calib_docs),
            "documents_used": calib.documents_used,
            "sequences": int(calib_ids.shape[0]),
            "seq_len": int(calib_ids.shape[1]),
            "tokens": int(calib_ids.numel()),
            "question_answer": heal_labels is not None,
            **({"vision": vision.to_dict()} if vision is not None else {}),
        },
        evaluation={
            "source": eval_source,
            "sha256": data_sha256(eval_docs),
            "blocks_sha256": token_ids_sha256(evaluation.input_ids),
            "documents": len(eval_docs),
            "sequences": int(evaluation.input_ids.shape[0]),
            "seq_len": int(evaluation.input_ids.shape[1]),
            "tokens": int(evaluation.input_ids.numel()),
            "overlap_with_calibration": overlap,
            "duplicates_removed": duplicates,
        },
        split=split,
    )


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


def _publish(weights: Path, out: Path, imatrix_source: Path | None) -> tuple[Path, Path | None]:
    """Write out/checkpoint (and out/imatrix.gguf) atomically from the last stage's folder."""
    checkpoint = out / "checkpoint"
    with building_folder(checkpoint) as building:
        link_checkpoint(weights, building, skip=("stage.json", IMATRIX_NAME, "bedside-demo.json"))
    imatrix = out / IMATRIX_NAME
    if imatrix_source is None:
        imatrix.unlink(missing_ok=True)  # a stale matrix of an earlier run would mislead the exporter
        return checkpoint, None
    temporary = out / f".tmp-{IMATRIX_NAME}-{os.getpid()}"
    shutil.copy2(imatrix_source, temporary)
    os.replace(temporary, imatrix)
    return checkpoint, imatrix


@dataclass
class _Outcome:
    """One stage's result as the pipeline passes it on."""

    entry: dict[str, Any]  # compression.json `stages.<name>`: timings and resumption, or `skipped`
    hash: str  # the input hash the next stage chains from (the previous one's when skipped)
    ran: bool  # the stage produced weights (computed or resumed)
    details: dict[str, Any]  # what the stage recorded (layers, scores, heal/AWQ records)


def _stage_entry(stored: dict[str, Any]) -> dict[str, Any]:
    keys = ("seconds", "peak_rss_bytes", "resumed", "hash", "folder", "output_sha256")
    entry = {key: stored[key] for key in keys}
    entry["sequential"] = bool(stored.get("sequential", False))
    if "block_seconds" in stored:
        entry["block_seconds"] = stored["block_seconds"]
    return entry


def use_sequential(options: CompressOptions, source: Path) -> bool:
    """Whether the stages that can stream run block by block (`options.sequential`; module constants).

    `auto`: when the source's float32 weights exceed SEQUENTIAL_THRESHOLD_BYTES and the model can
    stream; `on` refuses a model that cannot (a LLaVA, a family with computed buffers) with the reason.
    """
    if options.sequential == "off":
        return False
    from toolkit.compress.sequential.checkpoint import ShardedCheckpoint
    from toolkit.compress.sequential.model import LazyModel, SequentialUnsupported

    if options.sequential == "auto":
        elements = 0
        for entry in ShardedCheckpoint(source).tensors.values():
            count = 1
            for dim in entry.shape:
                count *= dim
            elements += count
        if elements * 4 <= SEQUENTIAL_THRESHOLD_BYTES:
            return False
    try:
        LazyModel(source)
    except SequentialUnsupported as error:
        if options.sequential == "on":
            raise BedsideError(f"--sequential on: {error}") from None
        return False
    return True


def _say(progress: bool, text: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(text)


def _prune_stage(
    runner: StageRunner, options: CompressOptions, num_layers: int, previous: str, data: _Data
) -> _Outcome:
    """Choose the layers (method or explicit list) and remove them."""

    n_remove = layers_to_remove_count(options)
    if n_remove == 0:
        details = {
            "layers_removed": [],
            "layer_scores": {"method": None, "scores": [None] * num_layers},
            "selection": None,
            "replacement": None,
        }
        return _Outcome({"skipped": "no layers to remove (prune_layers 0)"}, previous, False, details)
    explicit = options.layers is not None
    knobs: dict[str, Any] = {}
    inputs: dict[str, Any]
    if explicit:
        inputs = {"layers": check_layer_indices(list(options.layers or ()), num_layers)}
    else:
        method = get_selection_method(options.method)
        if options.quant is not None and "quant_scheme" in method.knobs:
            knobs["quant_scheme"] = options.quant  # score layers as the quantized model will run
        inputs = {"method": options.method, "n_remove": n_remove, "knobs": knobs}
        if method.needs_calibration:
            inputs["calibration"] = data.calibration["blocks_sha256"]
    if options.replace != "none":  # absent for "none": plain-removal stages keep their earlier hashes
        inputs.update(
            replace=options.replace,
            calibration=data.calibration["blocks_sha256"],
            evaluation=token_ids_sha256(data.eval_ids),
        )
    input_hash = stage_hash("prune", previous, inputs)

    def compute(model: Any, _folder: Path) -> tuple[Any, dict[str, Any]]:
        if explicit:
            layers = list(inputs["layers"])
            selection = None
            scores: dict[str, Any] = {"method": "explicit", "scores": [None] * num_layers}
        else:
            selection = select_layers(options.method, model, data.calib_ids, n_remove, **knobs)
            layers = list(selection.layers_to_remove)
            scores = {"method": selection.method, "scores": list(selection.scores)}
        replacement: dict[str, Any] | None = None
        if options.replace == "linear":
            # Fit on the unpruned model (the spans' inputs and outputs), fold, then remove.
            _say(runner.progress, f"prune: fitting the linear replacement of layers {layers}")
            replacement = replace_removed_layers(
                model, layers, data.calib_ids, eval_input_ids=data.eval_ids, strict=False
            ).record
        remove_layers(model, layers)
        return model, {
            "layers_removed": layers,
            "layer_scores": scores,
            "selection": selection.to_dict() if selection is not None else None,
            "replacement": replacement,
        }

    def compute_sequential(lazy: Any, folder: Path, on_layer: Any) -> tuple[bool, dict[str, Any]]:
        from toolkit.compress.sequential.scoring import sequential_select
        from toolkit.compress.sequential.writing import sequential_replacement, write_pruned

        if explicit:
            layers = list(inputs["layers"])
            selection = None
            scores: dict[str, Any] = {"method": "explicit", "scores": [None] * num_layers}
        else:
            selection = sequential_select(options.method, lazy, data.calib_ids, n_remove, on_layer=on_layer, **knobs)
            layers = list(selection.layers_to_remove)
            scores = {"method": selection.method, "scores": list(selection.scores)}
        folds: dict[Any, Any] = {}
        replacement: dict[str, Any] | None = None
        if options.replace == "linear":
            _say(runner.progress, f"prune: fitting the linear replacement of layers {layers} (block by block)")
            folds, replacement = sequential_replacement(lazy, layers, data.calib_ids, eval_input_ids=data.eval_ids)
        write_pruned(lazy, folder, layers, folds, extra_source=runner.source, dtype=runner.storage_dtype)
        return True, {
            "layers_removed": layers,
            "layer_scores": scores,
            "selection": selection.to_dict() if selection is not None else None,
            "replacement": replacement,
        }

    _say(runner.progress, f"prune: removing {n_remove} of {num_layers} layers")
    if runner.sequential and (explicit or options.method in SEQUENTIAL_SELECTION_METHODS):
        stored = runner.run_sequential("prune", input_hash, inputs, compute_sequential)
    else:
        stored = runner.run("prune", input_hash, inputs, compute)
    return _Outcome(_stage_entry(stored), input_hash, True, stored["details"])


def _heal_stage(
    runner: StageRunner, options: CompressOptions, n_removed: int, previous: str, data: _Data
) -> _Outcome:
    """LoRA-heal the pruned model on the calibration data (merged into the weights)."""

    if n_removed == 0:
        return _Outcome({"skipped": "no layer removed: nothing to heal"}, previous, False, {"heal": None})
    if not options.heal:
        reason = options.heal_skip_reason or "healing turned off (--no-heal)"
        return _Outcome({"skipped": reason}, previous, False, {"heal": None})
    inputs = {
        "max_steps": options.heal_steps,
        "max_seconds": options.heal_seconds,
        "seed": options.seed,
        "blocks": token_ids_sha256(data.heal_ids, data.heal_labels),
        **({"projector": True} if options.heal_projector else {}),
    }
    if (options.heal_lr, options.heal_rank) != (DEFAULT_LEARNING_RATE, DEFAULT_RANK):
        inputs.update(lr=options.heal_lr, rank=options.heal_rank)
    dtype = heal_dtype(runner.sequential, runner.storage_dtype)
    if dtype != torch.float32:
        inputs["dtype"] = str(dtype).removeprefix("torch.")
    objective, why_not_kd = _heal_objective(options, runner, dtype)
    # Distillation counts every position: the teacher's distribution is a target at each one (the answer-only mask
    # is the LM loss's, which must not teach the model to write the questions)
    train_labels = None if objective == "kd" else data.heal_labels
    if objective == "kd":
        inputs["objective"] = "kd"
        inputs["kd_positions"] = "all"
    input_hash = stage_hash("heal", previous, inputs)

    def compute(model: Any, _folder: Path) -> tuple[Any, dict[str, Any]]:
        if dtype != torch.float32:
            _say(runner.progress, f"heal: the whole model in {inputs['dtype']} with gradient checkpointing")
        teacher = None
        if objective == "kd":
            _say(runner.progress, "heal: the unpruned model's top-k log-probabilities on the healing blocks")
            original = load_causal_lm(runner.source, torch.float32)
            teacher = teacher_targets(original, data.heal_ids)
            del original
        result = heal(
            model,
            runner.tokenizer,
            data.heal_ids,
            train_labels=train_labels,
            max_steps=options.heal_steps,
            max_seconds=options.heal_seconds,
            lr=options.heal_lr,
            rank=options.heal_rank,
            seed=options.seed,
            progress=runner.progress,
            modules_to_save=["multi_modal_projector"] if options.heal_projector else (),
            gradient_checkpointing=dtype != torch.float32,
            teacher=teacher,
        )
        record = result.record.model_copy(update={"objective_note": why_not_kd})
        return result.model, {"heal": record.model_dump(mode="json")}

    stored = runner.run("heal", input_hash, inputs, compute, dtype=dtype)
    return _Outcome(_stage_entry(stored), input_hash, True, stored["details"])


def _quantize_stage(runner: StageRunner, options: CompressOptions, previous: str, data: _Data) -> _Outcome:
    """AWQ (scales + clipping folded into float weights, importance matrix) or RTN (weights as they are)."""

    scheme = options.quant
    if scheme is None:
        return _Outcome({"skipped": "no quantization scheme"}, previous, False, {"quant": None, "awq": None})
    grid = get_grid(scheme)
    quant = {
        "scheme": scheme,
        "method": options.quant_method,
        "group_size": grid.group_size,
        "export_grid": grid.name,
    }
    if grid.bits >= 16:
        quant["method"] = None
        reason = f"{scheme} stores float weights: nothing to quantize"
        return _Outcome({"skipped": reason}, previous, False, {"quant": quant, "awq": None})
    inputs: dict[str, Any] = {"scheme": scheme, "method": options.quant_method}
    # The AWQ settings its weights depend on: part of the stage's inputs, and what both AWQ paths are given.
    # search_rounding: how candidates are rounded (rerank: as the export does, libggml + matrix, for the
    # finalists); propagation: the precision of the non-search sequences' pass (AWQ_PROPAGATION: auto)
    awq_knobs: dict[str, Any] = {
        "search_rounding": options.awq_search_rounding,
        "propagation": resolve_propagation(AWQ_PROPAGATION, torch.device("cpu")),
        "alpha_search": AWQ_ALPHA_SEARCH,
        "search_precision": resolve_search_precision(AWQ_SEARCH_PRECISION, torch.device("cpu")),
        "batch_size": AWQ_BATCH_SIZE,
    }
    if options.quant_method in AWQ_METHODS:
        inputs.update(calibration=data.calibration["blocks_sha256"], seed=options.seed, **awq_knobs)
        if options.quant_method == "awq-gptq":
            inputs.update(gptq=True, storage_dtype=str(runner.storage_dtype).removeprefix("torch."))
    if options.quant_method == "imatrix":
        inputs.update(calibration=data.calibration["blocks_sha256"])
    input_hash = stage_hash("quantize", previous, inputs)
    write_imatrix = scheme in FORMATS["gguf"]

    def compute(model: Any, folder: Path) -> tuple[Any, dict[str, Any]]:
        if options.quant_method == "rtn":
            # The exporter rounds to nearest on the same grid: the float weights stay as they are.
            return None, {"quant": {**quant, "search_rounding": None}, "awq": None}
        if options.quant_method == "imatrix":
            # llama.cpp's method: weights unchanged, the matrix of the unscaled model guides the export.
            stats = gather_imatrix(model, data.calib_ids)
            stats.write(folder / IMATRIX_NAME)
            details = {**quant, "search_rounding": None, "imatrix": stats.record()}
            return None, {"quant": details, "awq": None}

        imatrix = folder / IMATRIX_NAME if write_imatrix else None
        result = awq(
            model, data.calib_ids, scheme, imatrix_path=imatrix, progress=runner.progress,
            gptq=options.quant_method == "awq-gptq", storage_dtype=runner.storage_dtype, **awq_knobs,
        )  # fmt: skip
        record = dict(result.record)
        record["imatrix"] = IMATRIX_NAME if imatrix is not None else None  # relative to the stage folder
        details = {
            **quant,
            "search_grid": record.get("search_grid"),
            "search_rounding": record.get("search_rounding"),  # exact | rerank | emulated
            "export_rounding": record.get("export_rounding"),
            "gptq": record.get("gptq"),  # None, or GPTQ's totals (output error ratio, blocks the export changes)
        }
        return result.model, {"quant": details, "awq": record}

    def compute_sequential(lazy: Any, folder: Path, on_layer: Any) -> tuple[bool, dict[str, Any]]:
        from toolkit.compress.sequential.scoring import sequential_imatrix
        from toolkit.compress.sequential.writing import sequential_awq

        if options.quant_method == "rtn":
            return False, {"quant": {**quant, "search_rounding": None}, "awq": None}
        if options.quant_method == "imatrix":
            stats = sequential_imatrix(lazy, data.calib_ids, on_layer=on_layer)
            stats.write(folder / IMATRIX_NAME)
            return False, {"quant": {**quant, "search_rounding": None, "imatrix": stats.record()}, "awq": None}
        imatrix = folder / IMATRIX_NAME if write_imatrix else None
        record = sequential_awq(
            lazy, folder, data.calib_ids, scheme, imatrix_path=imatrix,
            extra_source=runner.source, dtype=runner.storage_dtype, on_layer=on_layer,
            gptq=options.quant_method == "awq-gptq", storage_dtype=runner.storage_dtype, **awq_knobs,
        )
        record["imatrix"] = IMATRIX_NAME if imatrix is not None else None
        details = {
            **quant,
            "search_grid": record.get("search_grid"),
            "search_rounding": record.get("search_rounding"),
            "export_rounding": record.get("export_rounding"),
            "gptq": record.get("gptq"),  # None, or GPTQ's totals (output error ratio, blocks the export changes)
        }
        return True, {"quant": details, "awq": record}

    _say(runner.progress, f"quantize: {options.quant_method} for {scheme}" + (" (block by block)" if runner.sequential else ""))
    if runner.sequential:
        stored = runner.run_sequential("quantize", input_hash, inputs, compute_sequential)
    else:
        stored = runner.run("quantize", input_hash, inputs, compute)
    return _Outcome(_stage_entry(stored), input_hash, True, stored["details"])


def _plan_record(plan: Plan | None) -> dict[str, Any] | None:
    """What compression.json keeps of the plan: profile and the chosen candidate's decisions."""
    if plan is None:
        return None
    chosen = plan.chosen
    return {
        "profile": plan.profile,
        "model": plan.model,
        "format": chosen.format if chosen else None,
        "quant": chosen.quant if chosen else None,
        "runtime": chosen.runtime if chosen else None,
        "layers_removed": chosen.layers_removed if chosen else None,
        "layers": chosen.layers if chosen else None,
        "predicted_quality_loss": chosen.predicted_quality_loss if chosen else None,
    }


def compress(
    model: str | Path,
    out: Path,
    options: CompressOptions,
    *,
    plan: Plan | None = None,
    progress: bool = True,
) -> CompressResult:
    """Prune, heal and quantize `model` into `out` (layout and stages in the module docstring).

    Re-running with unchanged inputs resumes every finished stage from `out/stages/`. `plan` is
    recorded in compression.json (turn a plan into options with `options_from_plan`).
    """

    started = time.perf_counter()
    source = loadable_checkpoint(model)  # no custom code; config.json describes these weights
    num_layers = read_facts(source).num_layers
    validate_options(options, num_layers)
    given = options  # compression.json keeps the options as given; the stages see `auto` resolved
    options = replace(options, quant_method=resolve_quant_method(options.quant_method, options.quant))
    out = Path(out)
    check_out_dir(out)  # refused before any work; created once the data passed too

    tokenizer = load_tokenizer(source)
    vision = None
    if is_vision_language(source):
        require_processor(source)
        vision = VisionCalibration(slots_for(source), source)
    elif options.heal_projector:
        raise BedsideError(f"--heal-projector applies to a LLaVA (a vision projector); '{model}' is a text model")
    data = _prepare_data(tokenizer, options, vision)
    make_out_dir(out)
    remove_stale_temporaries(out)
    remove_stale_temporaries(out / "stages")
    source_sha = weights_sha256(source)
    sequential = use_sequential(options, source)
    runner = StageRunner(
        source, out, tokenizer, data.eval_ids, progress, _storage_dtype(source),
        attach=vision.attach if vision is not None else None,
        sequential=sequential,
    )

    quality: dict[str, float | None] = {"original": None, "pruned": None, "healed": None, "quantized": None}
    quality["original"] = runner.quality(f"source-{source_sha}", "original")
    previous = sha256_json({"source_sha256": source_sha})
    pruned = _prune_stage(runner, options, num_layers, previous, data)
    if pruned.ran:
        quality["pruned"] = runner.quality(f"prune-{pruned.hash}", "pruned")
    healed = _heal_stage(runner, options, len(pruned.details["layers_removed"]), pruned.hash, data)
    if healed.ran:
        quality["healed"] = runner.quality(f"heal-{healed.hash}", "healed")
    quantized = _quantize_stage(runner, options, healed.hash, data)
    imatrix_source: Path | None = None
    if options.quant is not None:
        scheme = options.quant
        if quantized.ran and (runner.current_dir / IMATRIX_NAME).is_file():
            imatrix_source = runner.current_dir / IMATRIX_NAME
        # What the exported file holds: with a matrix, llama.cpp's weighted rounding (libggml), else the grid.
        matrix = read_imatrix(imatrix_source).values if imatrix_source is not None else None
        def per_layer(lazy: Any) -> Any:
            quantize = linear_quantizer(lazy.model, scheme, matrix)

            def transform(index: int, layer: Any) -> None:
                for name, module in layer.named_modules():
                    if isinstance(module, torch.nn.Linear):
                        quantize(f"{lazy.layer_path(index)}.{name}", module)

            return transform

        quality["quantized"] = runner.quality(
            f"quantized-{scheme}-{quantized.hash}",
            "quantized",
            lambda m: fake_quantize_model(m, scheme, imatrix=matrix),
            per_layer,
        )

    (out / COMPRESSION_RECORD).unlink(missing_ok=True)  # never a record beside another run's weights
    checkpoint, imatrix = _publish(runner.current_dir, out, imatrix_source)
    last_ran = [outcome for outcome in (pruned, healed, quantized) if outcome.ran]
    checkpoint_sha = last_ran[-1].entry["output_sha256"] if last_ran else source_sha  # same weight files
    record = CompressionRecord.model_validate({
        "bedside_version": __version__,
        "model": {
            "name": str(model),
            "source": str(source),
            "source_sha256": source_sha,
            "num_layers": num_layers,
        },
        "options": given,
        "plan": _plan_record(plan),
        "layers_removed": list(pruned.details["layers_removed"]),
        "num_layers_after": num_layers - len(pruned.details["layers_removed"]),
        "layer_scores": pruned.details["layer_scores"],
        "selection": pruned.details["selection"],
        "replacement": pruned.details.get("replacement"),
        "quant": quantized.details["quant"],
        "awq": quantized.details["awq"],
        "heal": healed.details["heal"],
        "calibration": data.calibration,
        "eval": data.evaluation,
        "data_split": data.split,
        "quality": {"metric": "perplexity", **quality, "measurements": runner.measurements},
        "stages": {"prune": pruned.entry, "heal": healed.entry, "quantize": quantized.entry},
        "sequential": sequential,
        "checkpoint": {"path": str(checkpoint), "sha256": checkpoint_sha},
        "imatrix": str(imatrix) if imatrix is not None else None,
        "seconds": round(time.perf_counter() - started, 3),
    }).model_dump(mode="json")
    write_json_atomic(out / COMPRESSION_RECORD, record)
    return CompressResult(checkpoint=checkpoint, record=record, imatrix=imatrix)


def _heal_objective(options: CompressOptions, runner: StageRunner, dtype: torch.dtype) -> tuple[str, str | None]:
    """The objective the heal stage trains with, and why it is not the one asked for (or None).

    Distillation needs the unpruned model's logits on the healing blocks: computed in memory from the source
    in float32, so models healed in 16 bits (streamed, too big for a second float32 copy) and LLaVAs (whose
    blocks carry image positions the teacher would need too) fall back to the LM loss.
    """
    if options.heal_objective == "ce":
        return "ce", None
    if runner.attach is not None:
        return "ce", "a LLaVA heals with the LM loss (distillation is for text models)"
    if dtype != torch.float32:
        return "ce", "a model healed in 16 bits heals with the LM loss (no second copy for the teacher)"
    return "kd", None


def heal_dtype(sequential: bool, storage_dtype: torch.dtype) -> torch.dtype:
    """Precision of the weights while healing (`compression_memory.heals_in_sixteen_bits`: a streamed
    16-bit source heals in its 16 bits with gradient checkpointing; everything else in float32)."""
    name = str(storage_dtype).removeprefix("torch.")
    return storage_dtype if heals_in_sixteen_bits(sequential, name) else torch.float32


def _storage_dtype(source: Path) -> torch.dtype:
    """The dtype the source checkpoint stores its weights in (config `dtype`/`torch_dtype`), else float32."""

    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or text_config.get("dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
