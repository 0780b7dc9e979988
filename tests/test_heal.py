"""Healing (LoRA fine-tune + merge): training works, merging is exact, records and budgets hold.

Unit tests use a tiny random Llama (2 layers, hidden 32) and a byte-level BPE tokenizer trained
here, so they run offline in seconds. One test uses the real demo model with 2 layers removed and
heals it on IU X-ray radiology reports: perplexity on held-apart reports must drop. It skips when
set-up has not built the demo model or fetched the reports.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from toolkit.compress.heal import (
    FALLBACK_LORA_TARGETS,
    IGNORE_INDEX,
    HealRecord,
    heal,
    lora_targets_for,
    merge_lora,
    question_answer_training_blocks,
)
from toolkit.core.errors import BedsideError

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are overhead-bound: one thread avoids oversubscribing the 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, vocab_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # Weights of std 0.02 (the default) make logits so small that even a perfectly predicted
        # pattern keeps the loss near ln(vocab); 0.2 lets a learnt pattern show in the loss.
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def pattern_blocks(n_blocks: int = 16, seq: int = 32) -> torch.Tensor:
    """Blocks that repeat one 16-token pattern at different offsets: easy to learn."""
    pattern = torch.arange(8, 24)
    stream = pattern.repeat(n_blocks * seq // 16 + 2)
    return torch.stack([stream[i : i + seq] for i in range(n_blocks)])


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def saved_keys(model, folder: Path) -> set[str]:
    model.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


# ---------------------------------------------------------------------------------------------
# Tiny random Llama
# ---------------------------------------------------------------------------------------------


def test_training_reduces_loss_on_a_repeated_pattern():
    result = heal(tiny_llama(), None, pattern_blocks(), max_steps=20, lr=1e-2, batch_size=4, progress=False)
    assert result.record.steps == 20 and result.record.stopped_by == "steps"
    assert len(result.record.losses) == 20
    assert sum(result.record.losses[-5:]) / 5 < 0.5 * result.record.initial_loss
    assert result.record.tokens_seen == 20 * 4 * 32
    assert result.record.loss_tokens == 20 * 4 * 31  # every position but the first of each block


def test_bf16_healing_with_gradient_checkpointing_trains_as_without_it():
    """The 16-bit heal of a streamed model: bf16 base weights, float32 adapters; checkpointing recomputes the
    same forward (losses and merged weights equal), trains (loss falls) and is recorded."""
    results = {
        checkpointing: heal(
            tiny_llama().to(torch.bfloat16),
            None,
            pattern_blocks(),
            max_steps=8,
            lr=1e-2,
            gradient_checkpointing=checkpointing,
            progress=False,
        )
        for checkpointing in (False, True)
    }
    plain, checkpointed = results[False], results[True]
    assert checkpointed.record.losses == pytest.approx(plain.record.losses, rel=1e-6)
    assert checkpointed.record.final_loss < 0.8 * checkpointed.record.initial_loss
    assert (checkpointed.record.weights_dtype, checkpointed.record.gradient_checkpointing) == ("bfloat16", True)
    assert (plain.record.weights_dtype, plain.record.gradient_checkpointing) == ("bfloat16", False)
    for (name, weight), (_, other) in zip(
        checkpointed.model.named_parameters(), plain.model.named_parameters(), strict=True
    ):
        assert weight.dtype == torch.bfloat16 and torch.equal(weight, other), name
    assert HealRecord.model_validate({**checkpointed.record.model_dump(), "weights_dtype": "float32"})


def test_merged_model_equals_the_peft_model_and_keeps_the_architecture(tmp_path):
    model = tiny_llama()
    original_keys = saved_keys(model, tmp_path / "original")
    original_weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    blocks = pattern_blocks()
    result = heal(model, None, blocks, max_steps=5, lr=1e-2, progress=False, merge=False)
    before_merge = logits(result.model, blocks[:3])

    merged = merge_lora(result.model)

    assert type(merged) is LlamaForCausalLM
    torch.testing.assert_close(logits(merged, blocks[:3]), before_merge, atol=1e-5, rtol=0)
    # the adapters did change the weights (B is zero at init, so equality above is not vacuous)
    assert not torch.equal(merged.model.layers[0].self_attn.q_proj.weight, original_weight)
    healed_keys = saved_keys(merged, tmp_path / "healed")
    assert healed_keys == original_keys
    assert not any("lora" in key for key in healed_keys)


def test_merge_refuses_an_adapter_holding_nan_and_leaves_the_weights():
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peft_model = heal(tiny_llama(), None, pattern_blocks(), max_steps=1, progress=False, merge=False).model
    name, parameter = next((n, p) for n, p in peft_model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        parameter[0, 0] = float("nan")
    with pytest.raises(BedsideError, match="NaN or inf"):
        merge_lora(peft_model)
    assert torch.equal(peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight, original)


def test_heal_returns_the_merged_model_as_it_came(tmp_path):
    model = tiny_llama()
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    result = heal(model, None, pattern_blocks(), max_steps=2, progress=False)
    assert type(result.model) is LlamaForCausalLM
    assert result.model.training is False
    assert {name: p.requires_grad for name, p in result.model.named_parameters()} == flags
    assert saved_keys(result.model, tmp_path / "a") == saved_keys(tiny_llama(), tmp_path / "b")


def test_time_budget_stops_early():
    result = heal(tiny_llama(), None, pattern_blocks(), max_steps=1000, max_seconds=1e-3, progress=True)
    assert result.record.stopped_by == "time"
    assert 1 <= result.record.steps < 5


def test_same_seed_gives_the_same_losses_and_leaves_the_global_rng_alone():
    kwargs = {"max_steps": 6, "lr": 1e-2, "dropout": 0.1, "batch_size": 3, "seed": 7, "progress": False}
    state = torch.random.get_rng_state()
    first = heal(tiny_llama(), None, pattern_blocks(), **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = heal(tiny_llama(), None, pattern_blocks(), **kwargs)
    other = heal(tiny_llama(), None, pattern_blocks(), **{**kwargs, "seed": 8})
    assert first.record.losses == second.record.losses
    assert first.record.losses != other.record.losses
    torch.testing.assert_close(
        first.model.model.layers[1].mlp.down_proj.weight,
        second.model.model.layers[1].mlp.down_proj.weight,
        atol=0,
        rtol=0,
    )


def test_labels_mask_counts_only_labelled_tokens_across_accumulated_micro_batches():
    model = tiny_llama()
    blocks = pattern_blocks(n_blocks=4, seq=16)
    labels = torch.full_like(blocks, IGNORE_INDEX)
    labels[0, 5:9] = blocks[0, 5:9]  # uneven counts per block: a per-micro-batch mean would differ
    labels[2, 3:] = blocks[2, 3:]
    labels[3, 10:12] = blocks[3, 10:12]
    shifted_logits = logits(model, blocks)[:, :-1]
    expected = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    # one step covers the 4 blocks in 2 micro-batches; step 1 sees the unhealed model (B = 0)
    result = heal(
        model, None, blocks, train_labels=labels, max_steps=1, batch_size=2, grad_accum=2, progress=False
    )
    assert result.record.losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert result.record.loss_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum())


def test_record_is_json_ready_and_validated():
    result = heal(tiny_llama(), None, pattern_blocks(), max_steps=3, rank=4, alpha=8, progress=False)
    record = json.loads(json.dumps(result.record.model_dump(mode="json")))
    HealRecord.model_validate(record)
    assert record["steps"] == 3 and record["rank"] == 4 and record["alpha"] == 8
    assert record["learning_rate"] == 2e-4
    assert record["initial_loss"] == record["losses"][0] and record["final_loss"] == record["losses"][-1]
    assert record["losses"] == result.record.losses
    assert record["stopped_by"] == "steps"
    default = heal(tiny_llama(), None, pattern_blocks(), max_steps=1, rank=4, progress=False)
    assert default.record.alpha == 8.0  # alpha = 2 x rank unless given
    assert record["tokens_seen"] == 3 * 4 * 32
    # rank 4 on 7 projections x 2 layers: r * (in + out) per linear
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 2 + (64 + 32))
    assert record["lora_parameters"] == 2 * per_layer


@pytest.mark.parametrize(
    ("blocks", "kwargs", "message"),
    [
        (torch.arange(10), {}, "2-D"),
        (torch.zeros(2, 1, dtype=torch.long), {}, "at least 2 tokens"),
        (torch.zeros(2, 8), {}, "integer"),
        (pattern_blocks(2, 8), {"train_labels": torch.zeros(2, 9, dtype=torch.long)}, "shape"),
        (pattern_blocks(2, 8), {"train_labels": torch.full((2, 8), IGNORE_INDEX)}, "nothing to train"),
        (pattern_blocks(2, 8), {"max_steps": None, "max_seconds": None}, "budget"),
        (pattern_blocks(2, 8), {"rank": 0}, "rank"),
        (pattern_blocks(2, 8), {"target_modules": ["no_such_proj"]}, "no module"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_error(blocks, kwargs, message):
    with pytest.raises(BedsideError, match=message):
        heal(tiny_llama(), None, blocks, progress=False, **{"max_steps": 1, **kwargs})


def test_lora_targets_come_from_the_architecture_table():
    targets, known = lora_targets_for(tiny_llama())
    assert known
    assert isinstance(targets, str) and targets.startswith(r"^model\.layers\.")
    unknown = SimpleNamespace(config=SimpleNamespace(model_type="mystery", architectures=None))
    assert lora_targets_for(unknown) == (list(FALLBACK_LORA_TARGETS), False)


def test_question_answer_blocks_label_only_the_answers(bpe_tokenizer):
    from toolkit.data.documents import Document, question_answer_document

    texts = ["What is hypertension? Hypertension is persistently high blood pressure.", "user assistant"]
    tokenizer = bpe_tokenizer(texts, CHAT_TEMPLATE)
    documents = [
        question_answer_document("What is hypertension?", "High blood pressure."),
        Document(text="Persistently high pressure."),
        question_answer_document("What is anemia?", "Too few red blood cells."),
    ] * 4
    blocks = question_answer_training_blocks(documents, tokenizer, block_len=24, n_blocks=100, seed=0)
    assert blocks.input_ids.shape == blocks.labels.shape and blocks.input_ids.shape[1] == 24
    ids, labels = blocks.input_ids.flatten().tolist(), blocks.labels.flatten().tolist()
    labelled = [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    text = tokenizer.decode(labelled)
    assert "High blood pressure.<|im_end|>" in text and "Too few red blood cells.<|im_end|>" in text
    assert "Persistently high pressure." in text  # plain documents train in full
    assert "What is" not in text and "user" not in text and "<|im_start|>" not in text

    model = tiny_llama(vocab_size=len(tokenizer))
    result = heal(model, tokenizer, blocks.input_ids, train_labels=blocks.labels, max_steps=2, progress=False)
    assert result.record.steps == 2 and all(math.isfinite(loss) for loss in result.record.losses)


def test_question_answer_blocks_open_with_the_bos_the_tokenizer_adds(bpe_tokenizer):
    """As calibration blocks: a tokenizer that adds a BOS (Gemma's) gets it first in every training block,
    labelled -100, followed by the next block_len - 1 ids and labels of the stream a plain tokenizer packs."""
    from tokenizers import processors

    from toolkit.data.documents import Document, question_answer_document

    texts = ["What is hypertension? Hypertension is persistently high blood pressure.", "user assistant"]
    plain = bpe_tokenizer(texts, CHAT_TEMPLATE)
    with_bos = bpe_tokenizer(texts, CHAT_TEMPLATE)
    bos = with_bos.convert_tokens_to_ids("<|endoftext|>")
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    documents = [
        question_answer_document("What is hypertension?", "High blood pressure."),
        Document(text="Persistently high pressure."),
    ] * 6
    blocks = question_answer_training_blocks(documents, with_bos, block_len=24, n_blocks=100, seed=0)
    reference = question_answer_training_blocks(documents, plain, block_len=23, n_blocks=100, seed=0)
    assert blocks.input_ids.shape == (reference.input_ids.shape[0], 24)
    assert (blocks.input_ids[:, 0] == bos).all() and (blocks.labels[:, 0] == IGNORE_INDEX).all()
    assert blocks.input_ids[:, 1:].equal(reference.input_ids) and blocks.labels[:, 1:].equal(reference.labels)
    assert not (reference.input_ids == bos).any()


# ---------------------------------------------------------------------------------------------
# Demo model: 2 layers removed, healed on radiology reports
# ---------------------------------------------------------------------------------------------


def remove_two_layers(model, layers: list[int]) -> None:
    """Prefer the pruning stage's surgery; fall back to doing it here for Llama-style models."""
    try:
        from toolkit.compress.prune.surgery import remove_layers
    except ImportError:
        remove_layers = None
    if remove_layers is not None:
        remove_layers(model, layers)
        return
    kept = [layer for index, layer in enumerate(model.model.layers) if index not in set(layers)]
    model.model.layers = torch.nn.ModuleList(kept)
    for index, layer in enumerate(kept):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [
            kind for i, kind in enumerate(model.config.layer_types) if i not in set(layers)
        ]


def radiology_split():
    """IU X-ray reports (the default corpus), split so the evaluation reports are never trained on."""
    from toolkit.data import load_radiology_reports, split_calibration_eval

    try:
        documents = load_radiology_reports()
    except BedsideError as error:
        pytest.skip(f"radiology reports not available: {error}")
    train, held_apart, record = split_calibration_eval(documents, 0.1, seed=0, source="radiology")
    return train, held_apart, record


def perplexity(model, blocks: torch.Tensor, batch_size: int = 8) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            batch = blocks[start : start + batch_size]
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            total += float(loss) * tokens
            count += tokens
    return math.exp(total / count)


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_healing_the_pruned_demo_model_lowers_held_apart_perplexity(demo_model_dir, capsys):
    """Remove layers 20 and 25 of 30, heal briefly on reports, compare perplexity on held-apart reports.

    Sized for the test suite (a 128-token forward of the 135M model is ~3.5e10 FLOPs): 6 steps x 2 blocks x
    128 tokens of training, 4 held-apart blocks of 128 tokens, and a learning rate of 1e-3 instead of the
    default 2e-4 because the run is this short. `max_seconds`
    only caps the test on a loaded machine; no timing is asserted.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.data import make_blocks

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    train_documents, eval_documents, record = radiology_split()
    train = make_blocks(train_documents, tokenizer, block_len=128, n_blocks=12, seed=0).input_ids
    held_apart = make_blocks(eval_documents, tokenizer, block_len=128, n_blocks=4, seed=0).input_ids
    removed = [20, 25]
    remove_two_layers(model, removed)
    assert model.config.num_hidden_layers == 28

    unhealed = perplexity(model, held_apart)
    result = heal(
        model, tokenizer, train, max_steps=6, max_seconds=60, batch_size=2, lr=1e-3, progress=False
    )
    healed = perplexity(result.model, held_apart)
    outcome = result.record

    with capsys.disabled():
        print(
            f"\n[heal demo] reports train/eval={record.calibration_documents}/{record.eval_documents} "
            f"layers removed={removed} train blocks={tuple(train.shape)} held-apart blocks={tuple(held_apart.shape)} "
            f"ppl unhealed={unhealed:.3f} healed={healed:.3f} steps={outcome.steps} ({outcome.stopped_by}) "
            f"heal seconds={outcome.seconds:.1f} loss {outcome.initial_loss:.3f}->{outcome.final_loss:.3f} "
            f"test seconds={time.perf_counter() - started:.1f} "
            f"peak RSS={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        )
    assert healed < unhealed
    assert result.model.config.num_hidden_layers == 28


# ---------------------------------------------------------------------------------------------
# Distillation from the unpruned model (objective "kd")
# ---------------------------------------------------------------------------------------------


def _kl_to(teacher, student, blocks: torch.Tensor) -> float:
    reference = torch.log_softmax(logits(teacher, blocks), -1)
    return float((reference.exp() * (reference - torch.log_softmax(logits(student, blocks), -1))).sum(-1).mean())


def test_teacher_targets_and_kd_loss_equal_a_hand_computation():
    from toolkit.compress.heal import kd_loss_sum, teacher_targets

    teacher, student = tiny_llama(seed=0), tiny_llama(seed=1)
    blocks = pattern_blocks(n_blocks=3, seq=8)
    targets = teacher_targets(teacher, blocks, top_k=5, batch_size=2)
    log_p = torch.log_softmax(logits(teacher, blocks), -1)
    assert targets.top_k == 5 and targets.indices.shape == (3, 8, 5)
    torch.testing.assert_close(targets.logprobs, log_p.topk(5, -1).values)
    labels = blocks.clone()
    labels[0, 4:] = IGNORE_INDEX  # positions 3.. of block 0 predict ignored labels
    log_q = torch.log_softmax(logits(student, blocks), -1)
    expected = 0.0
    for b in range(3):
        for t in range(7):
            if labels[b, t + 1] != IGNORE_INDEX:
                expected -= sum(
                    float(log_p[b, t, v].exp() * log_q[b, t, v]) for v in log_p[b, t].topk(5).indices.tolist()
                )
    got = kd_loss_sum(logits(student, blocks), targets, torch.arange(3), labels)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_kd_healing_pulls_the_pruned_model_back_to_the_original():
    """One of two layers removed; distilling the full model's top-16 log-probs on the training blocks lowers the
    KL to it there (random tokens: nothing to generalise from; the demo's held-apart figures are in
    docs/BENCHMARKS.md), and the record says kd."""
    from toolkit.compress.heal import teacher_targets
    from toolkit.compress.prune import remove_layers

    teacher = tiny_llama()
    pruned = tiny_llama()
    remove_layers(pruned, [1])
    blocks = torch.randint(8, 64, (16, 32), generator=torch.Generator().manual_seed(0))
    before = _kl_to(teacher, pruned, blocks)
    targets = teacher_targets(teacher, blocks, top_k=16)
    result = heal(pruned, None, blocks, max_steps=30, lr=1e-2, teacher=targets, progress=False)
    after = _kl_to(teacher, result.model, blocks)
    assert after < 0.7 * before, (before, after)
    assert result.record.final_loss < result.record.initial_loss
    assert (result.record.objective, result.record.kd_top_k) == ("kd", 16)
    with pytest.raises(BedsideError, match="teacher targets cover"):
        heal(tiny_llama(), None, blocks[:8], max_steps=1, teacher=targets, progress=False)
