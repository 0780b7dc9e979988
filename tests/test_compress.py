"""`compress`: the prune -> heal -> quantize pipeline, compression.json, stage resume and the CLI.

Most tests use a tiny random Llama (4 layers, hidden 64) saved as an HF checkpoint with a
byte-level BPE tokenizer trained here, and a generated text corpus, so they run offline in
seconds. One test uses the real demo model (skips when set-up has not built it or the radiology
reports are absent).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from cli_runner import bedside as run_bedside
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from toolkit.compress.pipeline import (
    AWQ_ALPHA_SEARCH,
    AWQ_BATCH_SIZE,
    CompressOptions,
    _prepare_data,
    compress,
    options_from_plan,
)
from toolkit.compress.stages import load_tokenizer, perplexity, read_stage_record
from toolkit.core.errors import BedsideError
from toolkit.core.hashing import weights_sha256
from toolkit.plan.schema import Candidate, MemoryEstimate, Plan

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
REPORT_VOCABULARY = (
    "the heart size is normal lungs are clear no pleural effusion or pneumothorax mild "
    "degenerative changes of the spine right lower lobe opacity may represent atelectasis "
    "pneumonia stable cardiomediastinal silhouette within limits calcified granuloma"
)
WORDS = REPORT_VOCABULARY.split(" ")
NUM_LAYERS = 4
TINY = CompressOptions(
    prune_layers=1,
    method="block-influence",
    quant="Q4_0",
    quant_method="awq",
    heal_steps=3,
    calib_sequences=8,
    seq_len=32,
    eval_sequences=4,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound: one thread avoids oversubscribing the 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def corpus_text(seed: int, paragraphs: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))) for _ in range(paragraphs)
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe_tokenizer) -> tuple[Path, Path]:
    """(checkpoint folder of a tiny random Llama with tokenizer, calibration text file)."""
    root = tmp_path_factory.mktemp("tiny")
    folder = root / "tiny-llama"
    tokenizer = bpe_tokenizer([" ".join(WORDS), "user assistant"], CHAT_TEMPLATE)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    corpus = root / "reports.txt"
    corpus.write_text(corpus_text(0, 200), encoding="utf-8")
    return folder, corpus


@pytest.fixture(scope="module")
def awq_run(tiny, tmp_path_factory):
    folder, corpus = tiny
    out = tmp_path_factory.mktemp("awq-run") / "out"
    options = replace(TINY, calib=str(corpus))
    return compress(folder, out, options, progress=False), options


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def load_float(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# ---------------------------------------------------------------------------------------------
# compression.json contract
# ---------------------------------------------------------------------------------------------


def test_record_contract_keys_and_types(awq_run):
    result, options = awq_run
    record = result.record
    out = result.checkpoint.parent
    assert json.loads((out / "compression.json").read_text()) == record
    assert record["schema_version"] == 1
    assert len(record["model"]["source_sha256"]) == 64
    assert record["model"]["num_layers"] == NUM_LAYERS

    removed = record["layers_removed"]
    assert len(removed) == 1 and all(isinstance(i, int) and 0 <= i < NUM_LAYERS for i in removed)
    scores = record["layer_scores"]
    assert scores["method"] == "block-influence"
    assert len(scores["scores"]) == NUM_LAYERS and all(isinstance(s, float) for s in scores["scores"])
    # block-influence removes the lowest-scored layer
    assert removed == [min(range(NUM_LAYERS), key=lambda i: scores["scores"][i])]
    # linear replacement is on by default: the removed span's map, its loss before and after
    replacement = record["replacement"]
    assert replacement["mode"] == "linear" and record["options"]["replace"] == "linear"
    (span,) = replacement["spans"]
    assert span["layers"] == removed and span["calibration_tokens"] == 8 * 32
    assert span["held_apart_tokens"] == 4 * 32
    for key in ("relative_error", "held_apart_relative_error"):
        assert span[f"{key}_after"] >= 0.0 and span[f"{key}_before"] > 0.0
    assert span["relative_error_after"] < span["relative_error_before"]

    assert record["quant"] == {
        "scheme": "Q4_0",
        "method": "awq",
        "group_size": 32,
        "export_grid": "Q4_0",
        "search_grid": "Q4_0",
        # the export rounds with the matrix AWQ writes: the search re-ranked its finalists on that rounding
        "search_rounding": "rerank",
        "export_rounding": "libggml with the importance matrix of the scaled model",
        "gptq": None,  # --quant-method awq: no GPTQ (awq-gptq records its totals here)
    }
    # every AWQ setting its weights depend on is one of the stage's inputs: a resume never reuses another setting's
    stage_inputs = read_stage_record(out / record["stages"]["quantize"]["folder"])["inputs"]
    assert stage_inputs["batch_size"] == AWQ_BATCH_SIZE and stage_inputs["alpha_search"] == AWQ_ALPHA_SEARCH
    assert stage_inputs["search_rounding"] == "rerank" and stage_inputs["propagation"] in ("float32", "bfloat16")
    awq_layers = record["awq"]["layers"]
    assert len(awq_layers) == NUM_LAYERS - 1
    alphas = [g["alpha"] for layer in awq_layers for g in layer["groups"] if "alpha" in g]
    assert alphas and all(0.0 <= a <= 1.0 for a in alphas)
    assert all("clip" in layer for layer in awq_layers)

    heal = record["heal"]
    assert heal["steps"] == 3 and len(heal["losses"]) == 3
    assert (heal["objective"], heal["kd_top_k"], heal["objective_note"]) == ("kd", 64, None)  # the default

    calibration = record["calibration"]
    assert calibration["sequences"] == 8 and calibration["seq_len"] == 32 and calibration["tokens"] == 256
    assert calibration["source"] == str(options.calib) and len(calibration["sha256"]) == 64
    evaluation = record["eval"]
    assert evaluation["tokens"] == 4 * 32 and len(evaluation["sha256"]) == 64
    assert evaluation["overlap_with_calibration"] == 0
    assert evaluation["sha256"] != calibration["sha256"]

    quality = record["quality"]
    for key in ("original", "pruned", "healed", "quantized"):
        assert isinstance(quality[key], float) and math.isfinite(quality[key]) and quality[key] > 1.0

    for stage in ("prune", "heal", "quantize"):
        entry = record["stages"][stage]
        assert entry["resumed"] is False
        assert isinstance(entry["seconds"], float) and entry["seconds"] >= 0
        assert isinstance(entry["peak_rss_bytes"], int) and entry["peak_rss_bytes"] > 50 * 1024**2
        assert (out / entry["folder"] / "stage.json").is_file()

    # Q4_0 is a GGUF scheme: AWQ wrote the importance matrix of the scaled model next to the weights
    assert result.imatrix == out / "imatrix.gguf" and result.imatrix.stat().st_size > 0
    assert record["imatrix"] == str(result.imatrix)
    assert not any(path.name.startswith(".tmp-") for path in out.rglob("*"))


def test_checkpoint_reloads_and_equals_the_pipeline_run_in_memory(awq_run, tiny, tmp_path):
    """Redo prune -> heal -> AWQ by hand on the same data: the saved checkpoint gives the same logits."""
    from exporters.gguf_imatrix import read_imatrix
    from toolkit.compress.heal import heal, teacher_targets
    from toolkit.compress.prune import remove_layers, select_layers
    from toolkit.compress.prune.replace import replace_removed_layers
    from toolkit.compress.quant.awq import awq
    from toolkit.compress.quant.rtn import fake_quantize_model

    result, options = awq_run
    record = result.record
    folder, _corpus = tiny
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert config["num_hidden_layers"] == NUM_LAYERS - len(record["layers_removed"])
    assert (result.checkpoint / "tokenizer.json").is_file()
    assert load_tokenizer(result.checkpoint).chat_template == CHAT_TEMPLATE

    data = _prepare_data(load_tokenizer(folder), options)
    model = load_float(folder)
    selection = select_layers("block-influence", model, data.calib_ids, 1)
    assert selection.layers_to_remove == record["layers_removed"]
    replace_removed_layers(model, selection.layers_to_remove, data.calib_ids, eval_input_ids=data.eval_ids)
    remove_layers(model, selection.layers_to_remove)
    teacher = teacher_targets(load_float(folder), data.heal_ids)  # distillation from the unpruned model
    model = heal(model, None, data.heal_ids, max_steps=3, seed=0, progress=False, teacher=teacher).model
    model = awq(model, data.calib_ids, "Q4_0", progress=False, imatrix_path=tmp_path / "m.gguf").model

    saved = load_float(result.checkpoint)
    ids = data.eval_ids
    torch.testing.assert_close(logits_of(saved, ids), logits_of(model, ids), atol=1e-5, rtol=0)
    # quality.quantized is the perplexity of the weights the export writes (libggml with AWQ's matrix)
    fake_quantize_model(saved, "Q4_0", imatrix=read_imatrix(result.imatrix).values)
    assert perplexity(saved, ids) == pytest.approx(record["quality"]["quantized"], rel=1e-6)
    assert weights_sha256(result.checkpoint) == record["checkpoint"]["sha256"]


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def test_rerun_resumes_every_stage_and_a_changed_option_recomputes_only_later_stages(awq_run, tmp_path):
    first, options = awq_run
    out = tmp_path / "out"
    shutil.copytree(first.checkpoint.parent, out)
    model = first.record["model"]["source"]

    again = compress(model, out, options, progress=False).record
    for stage in ("prune", "heal", "quantize"):
        assert again["stages"][stage]["resumed"] is True
        assert again["stages"][stage]["output_sha256"] == first.record["stages"][stage]["output_sha256"]
    assert again["checkpoint"]["sha256"] == first.record["checkpoint"]["sha256"]
    assert again["quality"] == first.record["quality"]
    assert again["awq"] == first.record["awq"] and again["heal"] == first.record["heal"]

    rtn = compress(model, out, replace(options, quant_method="rtn"), progress=False).record
    assert rtn["stages"]["prune"]["resumed"] is True and rtn["stages"]["heal"]["resumed"] is True
    assert rtn["stages"]["quantize"]["resumed"] is False
    # RTN keeps the healed float weights (the exporter rounds); AWQ had changed them
    assert rtn["stages"]["quantize"]["output_sha256"] == rtn["stages"]["heal"]["output_sha256"]
    assert rtn["checkpoint"]["sha256"] != first.record["checkpoint"]["sha256"]
    assert rtn["quant"]["method"] == "rtn" and rtn["awq"] is None
    assert not (out / "imatrix.gguf").exists()  # the stale AWQ matrix is gone
    assert rtn["quality"]["healed"] == first.record["quality"]["healed"]
    assert rtn["quality"]["quantized"] != first.record["quality"]["quantized"]
    stage_folders = sorted(path.name.split("-")[0] for path in (out / "stages").iterdir() if path.is_dir())
    assert stage_folders == ["heal", "prune", "quantize", "quantize"]


def test_interrupted_stage_leaves_no_stage_folder_and_no_checkpoint(tiny, tmp_path, monkeypatch):
    import toolkit.compress.pipeline

    folder, corpus = tiny
    out = tmp_path / "out"
    options = replace(TINY, calib=str(corpus), quant_method="rtn")

    def killed(*_args, **_kwargs):
        raise RuntimeError("killed during healing")

    monkeypatch.setattr(toolkit.compress.pipeline, "heal", killed)
    with pytest.raises(RuntimeError, match="killed during healing"):
        compress(folder, out, options, progress=False)
    names = sorted(path.name for path in (out / "stages").iterdir())
    assert [name.split("-")[0] for name in names if not name.endswith(".json")] == ["prune"]
    assert not any(name.startswith(".tmp-") for name in names)
    assert not (out / "checkpoint").exists() and not (out / "compression.json").exists()

    # A run killed outright (no cleanup) leaves a temporary folder of a dead process: removed next time
    stale = out / "stages" / ".tmp-heal-0123456789ab-999999999"
    stale.mkdir()
    monkeypatch.undo()
    record = compress(folder, out, options, progress=False).record
    assert not stale.exists()
    assert record["stages"]["prune"]["resumed"] is True and record["stages"]["heal"]["resumed"] is False


# ---------------------------------------------------------------------------------------------
# Skipped stages, explicit layers, separate evaluation data, plans
# ---------------------------------------------------------------------------------------------


def test_explicit_layers_without_heal_or_quant_equal_plain_surgery(tiny, tmp_path):
    from toolkit.compress.prune import remove_layers

    folder, corpus = tiny
    eval_file = tmp_path / "eval.txt"
    calibration_paragraphs = corpus.read_text().split("\n\n")
    eval_file.write_text("\n\n".join([*calibration_paragraphs[:3], corpus_text(1, 20)]), encoding="utf-8")
    options = CompressOptions(
        layers=(1, 2),
        replace="none",
        heal=False,
        calib=str(corpus),
        eval_data=str(eval_file),
        calib_sequences=4,
        seq_len=32,
    )
    result = compress(folder, tmp_path / "out", options, progress=False)
    record = result.record
    assert record["layers_removed"] == [1, 2]
    assert record["layer_scores"] == {"method": "explicit", "scores": [None] * NUM_LAYERS}
    assert record["stages"]["heal"] == {"skipped": "healing turned off (--no-heal)"}
    assert record["stages"]["quantize"] == {"skipped": "no quantization scheme"}
    assert record["quant"] is None and record["awq"] is None and record["heal"] is None
    assert record["replacement"] is None
    assert record["quality"]["healed"] is None and record["quality"]["quantized"] is None
    assert record["eval"]["duplicates_removed"] == 3 and record["eval"]["overlap_with_calibration"] == 0
    assert record["eval"]["source"] == str(eval_file)

    expected = remove_layers(load_float(folder), [1, 2])
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(load_float(result.checkpoint), ids), logits_of(expected, ids))


def test_no_layer_removed_skips_prune_and_heal(tiny, tmp_path):
    folder, corpus = tiny
    options = CompressOptions(
        quant="Q4_0", quant_method="rtn", calib=str(corpus), calib_sequences=4, seq_len=32
    )
    record = compress(folder, tmp_path / "out", options, progress=False).record
    assert record["layers_removed"] == [] and record["num_layers_after"] == NUM_LAYERS
    assert "skipped" in record["stages"]["prune"]
    assert record["stages"]["heal"] == {"skipped": "no layer removed: nothing to heal"}
    assert record["stages"]["quantize"]["resumed"] is False
    assert record["layer_scores"]["scores"] == [None] * NUM_LAYERS
    assert record["quality"]["pruned"] is None
    # RTN leaves the float weights: fake quantization moves the perplexity, a little
    assert record["quality"]["quantized"] != record["quality"]["original"]
    assert record["quality"]["quantized"] == pytest.approx(record["quality"]["original"], rel=0.2)


def test_heal_settings_and_distillation_over_every_position(tiny, tmp_path):
    """--heal-sequences draws its own healing blocks, --heal-rank / --heal-lr reach LoRA, and on question/answer
    data distillation counts every position (the teacher's distribution is a target everywhere) where the LM
    loss counts the answers only."""
    folder, _corpus = tiny
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"Is finding {i} normal?", "answer": corpus_text(i, 1), "context": f"finding {i}"}
            for i in range(40)]  # fmt: skip
    data.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    records = {}
    for objective in ("kd", "ce"):
        options = CompressOptions(
            prune_layers=1, method="last", calib=str(data), calib_sequences=2, seq_len=32, eval_sequences=1,
            heal_sequences=6, heal_steps=2, heal_rank=4, heal_lr=1e-3, heal_objective=objective,
        )  # fmt: skip
        records[objective] = compress(folder, tmp_path / objective, options, progress=False).record
    kd, ce = records["kd"]["heal"], records["ce"]["heal"]
    assert (kd["rank"], kd["alpha"], kd["learning_rate"]) == (4, 8.0, 1e-3)
    assert kd["tokens_seen"] == 2 * 4 * 32  # two steps of four blocks: six healing blocks, not two
    assert kd["loss_tokens"] == 2 * 4 * 31  # every position that has a next token
    assert 0 < ce["loss_tokens"] < kd["loss_tokens"]  # the answers only
    assert records["kd"]["options"]["heal_sequences"] == 6


def test_question_answer_data_without_answers_in_the_blocks_is_refused(tiny, tmp_path):
    folder, _corpus = tiny
    data = tmp_path / "qa.jsonl"
    context = corpus_text(3, 1) * 4  # long prompts: the first blocks hold no answer token
    rows = [{"question": f"Is finding {i} normal?", "answer": "yes", "context": context} for i in range(30)]
    data.write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    options = CompressOptions(prune_layers=1, method="last", calib=str(data), calib_sequences=1, seq_len=32)
    with pytest.raises(BedsideError, match="no answer token.*--seq-len"):
        compress(folder, tmp_path / "out", options, progress=False)
    assert not (tmp_path / "out" / "stages").exists()


def test_rss_sampler_sees_memory_held_inside_the_block():
    """64 MiB of fresh anonymous pages (mmap, every page written) held inside the block raise the peak.

    Not a torch tensor: after earlier tests the allocator may hand back pages that are already
    resident, and RSS would not move.
    """
    import mmap

    import psutil

    from toolkit.compress.stages import RssSampler

    size = 64 * 1024**2
    before = psutil.Process().memory_info().rss
    with RssSampler(period_s=0.01) as busy:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
        time.sleep(0.3)
        block.close()
    assert busy.peak_bytes - before > 48 * 1024**2
    assert psutil.Process().memory_info().rss < busy.peak_bytes  # released after the block


def plan_with(layers_removed: int, layers: list[int] | None, quant: str = "Q4_0") -> Plan:
    memory = MemoryEstimate(
        total_bytes=1, weights_bytes=1, kv_cache_bytes=0, vision_bytes=0, overhead_bytes=0
    )
    candidate = Candidate(
        format="gguf",
        quant=quant,
        runtime="llama.cpp",
        layers_removed=layers_removed,
        layers=layers,
        memory=memory,
        fits=True,
        predicted_quality_loss=1.0,
    )
    return Plan(
        model="tiny",
        profile="test",
        context_length=256,
        budget_bytes=2,
        fp16_bytes=2,
        fits=True,
        chosen=candidate,
        candidates=[candidate],
    )


def test_options_from_plan_takes_the_chosen_candidate_and_flags_override():
    options = options_from_plan(plan_with(2, [0, 2]), quant_method="rtn")
    assert (options.prune_layers, options.layers, options.quant) == (2, (0, 2), "Q4_0")
    assert options.quant_method == "rtn"
    overridden = options_from_plan(plan_with(2, [0, 2]), prune_layers=1, quant="Q8_0")
    assert (overridden.prune_layers, overridden.layers, overridden.quant) == (1, None, "Q8_0")
    nothing = plan_with(2, None).model_copy(update={"chosen": None, "fits": False, "reason": "too big"})
    with pytest.raises(BedsideError, match="too big"):
        options_from_plan(nothing)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (CompressOptions(prune_layers=NUM_LAYERS), "all of them"),
        (CompressOptions(prune_layers=-1), "0 or more"),
        (CompressOptions(layers=(0, 9)), "does not exist"),
        (CompressOptions(prune_layers=1, method="nope"), "block-influence"),
        (CompressOptions(quant="Q9_9"), "Q4_K_M"),
        (CompressOptions(quant="Q4_0", quant_method="gptq"), "auto, awq, awq-gptq, rtn, imatrix"),
        (CompressOptions(quant="Q4_0", calib_sequences=0), "between 1 and 128"),
        (CompressOptions(prune_layers=1, heal_objective="mse"), "--heal-objective must be one of kd, ce"),
        (CompressOptions(prune_layers=1, heal_sequences=0), "--heal-sequences must be between 1 and 1024, got 0"),
        (CompressOptions(prune_layers=1, heal_sequences=2000), "--heal-sequences must be between 1 and 1024"),
        (CompressOptions(prune_layers=1, heal_lr=0.0), "--heal-lr must be positive, got 0.0"),
        (CompressOptions(prune_layers=1, heal_rank=0), "--heal-rank must be at least 1, got 0"),
    ],
)
def test_bad_options_are_refused_before_any_work(tiny, tmp_path, options, needle):
    folder, _corpus = tiny
    with pytest.raises(BedsideError, match=needle):
        compress(folder, tmp_path / "out", options, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------



def run_bedside_capturing(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`toolkit.cli.main.main` as the entry point runs it, in this process: (exit code, stdout, stderr)."""
    from toolkit.cli.main import main

    monkeypatch.setattr(sys, "argv", ["bedside", *args])
    code = 0
    try:
        main()
    except SystemExit as exited:
        code = int(exited.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_bedside_in_process(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of `run_bedside_capturing`."""
    code, _out, err = run_bedside_capturing(monkeypatch, capsys, *args)
    return code, err


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--prune-layers", str(NUM_LAYERS)], ["all of them"]),
        (["--prune-layers", str(NUM_LAYERS + 3)], [f"{NUM_LAYERS + 3} of {NUM_LAYERS}"]),
        (["--prune-layers", "-1"], ["0 or more"]),
        (["--prune-layers", "1", "--method", "nope"], ["'nope'", "activation", "last"]),
        (["--quant", "Q9_9"], ["Q9_9", "Q4_K_M", "int4_b32"]),
        (["--quant", "Q4_0", "--quant-method", "gptq"], ["gptq", "auto, awq, awq-gptq, rtn"]),
        (["--quant", "Q4_0", "--awq-search-rounding", "fast"], ["--awq-search-rounding", "'fast'", "rerank"]),
        (["--prune-layers", "1", "--replace", "cubic"], ["--replace", "'cubic'", "linear, none"]),
        (["--prune-layers", "1", "--method", "replace-aware", "--replace", "none"], ["--replace linear"]),
        (["--quant", "Q4_0", "--calib-sequences", "129"], ["between 1 and 128"]),
        (["--quant", "Q4_0", "--calib-sequences", "0"], ["between 1 and 128"]),
        (["--plan", "missing-plan.json"], ["missing-plan.json", "not found"]),
        (["--plan", "BAD"], ["not a valid plan.json"]),
        (["--plan", "missing-plan.json", "--profile", "jetson4gb"], ["not both"]),
        ([], ["--plan", "--profile", "--prune-layers"]),
    ],
)
def test_cli_refusals_are_one_line_exit_2(tiny, tmp_path, monkeypatch, capsys, flags, needles):
    folder, _corpus = tiny
    if "BAD" in flags:
        bad = tmp_path / "plan.json"
        bad.write_text('{"model": "x"', encoding="utf-8")
        flags = [str(bad) if flag == "BAD" else flag for flag in flags]
    code, stderr = run_bedside_in_process(
        monkeypatch, capsys, "compress", "--model", str(folder), "--out", str(tmp_path / "out"), *flags
    )
    assert_one_line_error(code, stderr, *needles)
    assert not (tmp_path / "out").exists()


def test_cli_follows_a_plan_file_and_a_profile_with_flags_overriding(tiny, tmp_path, monkeypatch, capsys):
    from toolkit.plan.schema import write_plan

    folder, corpus = tiny
    plan = plan_with(1, [0], quant="Q8_0").model_copy(update={"model": str(folder)})
    write_plan(plan, tmp_path / "plan.json")
    common = ["--quant-method", "rtn", "--no-heal", "--calib", str(corpus), "--calib-sequences", "4"]
    common += ["--seq-len", "32", "--no-progress"]
    code, stdout, stderr = run_bedside_capturing(
        monkeypatch, capsys, "compress", "--model", str(folder), "--out", str(tmp_path / "a"),
        "--plan", str(tmp_path / "plan.json"), *common, "--json",
    )  # fmt: skip
    assert code == 0, stderr
    record = json.loads((tmp_path / "a" / "compression.json").read_text())
    assert json.loads(stdout) == record  # --json prints the record and nothing else
    assert record["layers_removed"] == [0] and record["quant"]["scheme"] == "Q8_0"
    assert record["plan"]["profile"] == "test" and record["plan"]["layers"] == [0]

    code, stderr = run_bedside_in_process(
        monkeypatch, capsys, "compress", "--model", str(folder), "--out", str(tmp_path / "b"),
        "--profile", "jetson4gb", "--prune-layers", "1", "--method", "last", *common,
    )  # fmt: skip
    assert code == 0, stderr
    record = json.loads((tmp_path / "b" / "compression.json").read_text())
    assert record["plan"]["profile"] == "jetson4gb" and record["plan"]["layers_removed"] == 1
    assert record["layers_removed"] == [NUM_LAYERS - 2]
    assert record["quant"]["scheme"] == record["plan"]["quant"]

    other = plan.model_copy(update={"model": str(tmp_path)})
    write_plan(other, tmp_path / "other.json")
    code, stderr = run_bedside_in_process(
        monkeypatch, capsys, "compress", "--model", str(folder), "--out", str(tmp_path / "c"),
        "--plan", str(tmp_path / "other.json"),
    )  # fmt: skip
    assert_one_line_error(code, stderr, "was made for model")


def test_cli_refusal_in_a_real_process_has_no_traceback(tiny, tmp_path):
    folder, _corpus = tiny
    result = run_bedside(
        "compress", "--model", str(folder), "--out", str(tmp_path / "o"), "--prune-layers", "9"
    )
    assert_one_line_error(result.returncode, result.stderr, "9 of 4")


def test_cli_compresses_and_prints_a_summary(tiny, tmp_path):
    folder, corpus = tiny
    out = tmp_path / "out"
    args = ["compress", "--model", str(folder), "--out", str(out), "--prune-layers", "1", "--method", "last"]
    args += ["--quant", "Q4_0", "--quant-method", "rtn", "--heal-steps", "2", "--calib", str(corpus)]
    args += ["--calib-sequences", "4", "--seq-len", "32", "--no-progress"]
    result = run_bedside(*args)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "compression.json").read_text())
    assert record["layers_removed"] == [NUM_LAYERS - 2]  # `last` keeps the final layer
    assert record["heal"]["steps"] == 2
    for word in ("prune", "heal", "quantize", "layers removed", "checkpoint"):
        assert word in result.stdout
