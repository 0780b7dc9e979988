"""toolkit.plan.compression_memory mirrors compression defaults as plain numbers (`bedside plan` must not import torch):
each mirrored figure is checked against the code it describes, so the estimate follows a change of those defaults."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

from toolkit.compress import heal as healing
from toolkit.compress import pipeline
from toolkit.compress.prune.methods.activation import select_activation
from toolkit.compress.quant import awq
from toolkit.compress.stages import perplexity
from toolkit.model.facts import ModelFacts, facts_from_config
from toolkit.plan import compression_memory as estimate

REPO = Path(__file__).resolve().parents[1]


def _default(function: object, name: str) -> object:
    return inspect.signature(function).parameters[name].default  # type: ignore[arg-type]


def _llama2_7b_facts(layers: int) -> ModelFacts:
    """ModelFacts of Llama-2-7B's shapes (bf16) with `layers` decoder layers."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": layers, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False, "dtype": "bfloat16",
    }  # fmt: skip
    return facts_from_config(config)


def test_mirrored_awq_figures_are_awqs_defaults() -> None:
    assert estimate.AWQ_CLIP_ROWS == awq.CLIP_OUT_ROWS
    assert _default(awq.AwqSearch.__init__, "search_tokens") == estimate.AWQ_SEARCH_TOKENS
    assert _default(awq.AwqSearch.__init__, "batch_size") == estimate.AWQ_BATCH
    assert pipeline.AWQ_BATCH_SIZE == estimate.AWQ_BATCH  # what compress passes AWQ


def test_mirrored_activation_and_perplexity_figures_are_their_defaults() -> None:
    assert _default(select_activation, "max_sequences") == estimate.ACTIVATION_SEQUENCES
    assert _default(select_activation, "max_tokens") == estimate.ACTIVATION_TOKENS
    assert _default(perplexity, "batch_size") == estimate.PERPLEXITY_BATCH


def test_mirrored_heal_figures_are_heals_defaults() -> None:
    assert healing.DEFAULT_RANK == estimate.HEAL_LORA_RANK
    assert healing.KD_TOP_K == estimate.KD_TOP_K
    from toolkit.compress.record import CompressOptions

    options = CompressOptions()  # compress's LoRA defaults are heal's own (alpha = 2 x rank)
    assert (options.heal_lr, options.heal_rank) == (healing.DEFAULT_LEARNING_RATE, healing.DEFAULT_RANK)
    assert _default(healing.heal, "batch_size") == estimate.HEAL_BATCH


def test_a_streamed_16_bit_model_heals_in_16_bits_and_the_estimate_says_so() -> None:
    """Llama-2-7B's shapes: float32 healing (26 GB of weights alone) does not fit a 24 GiB host; 16 bits with
    gradient checkpointing does (2P + adapters + one layer's activations)."""
    facts = _llama2_7b_facts(layers=32)
    assert facts.extra["dtype"] == "bfloat16"
    assert estimate.heals_in_sixteen_bits(True, "bfloat16") and estimate.heals_in_sixteen_bits(True, "float16")
    assert not estimate.heals_in_sixteen_bits(False, "bfloat16") and not estimate.heals_in_sixteen_bits(True, "float32")
    full = estimate.heal_memory(facts, calib_sequences=4, seq_len=128)
    half = estimate.heal_memory(facts, calib_sequences=4, seq_len=128, sixteen_bit=True)
    assert full > 4 * facts.text_params > 24 * 2**30
    assert 2 * facts.text_params < half < 0.55 * full and half < 16 * 2**30
    stages = estimate.compression_memory(
        facts, calib_sequences=4, seq_len=128, eval_sequences=1, prune_layers=4, quant=True, sequential=True,
        heal=True, heal_sixteen_bit=True,
    )  # fmt: skip
    assert stages["heal"] == half and stages["heal_sixteen_bit"] is True


def test_the_estimator_imports_no_torch() -> None:
    """The reason the figures are mirrored: importing the estimator loads neither torch nor the compress code."""
    probe = (
        "import sys, toolkit.plan.compression_memory; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('toolkit.compress')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def test_gptq_adds_the_layers_grams_and_the_widest_hessian_to_the_quantize_stage() -> None:
    """awq-gptq's quantize stage holds a layer's X^T X (3 h^2 + i^2 float32), GPTQ_HESSIAN_COPIES i x i float32
    matrices and four copies of the stacked gate/up rows on top of AWQ's figure: 4.1 GB more for a 7B shape
    (i = 11008); the other stages do not change; gptq_round's default damping is the mirrored one."""
    from toolkit.compress.quant import gptq

    facts = _llama2_7b_facts(layers=32)
    common = {"calib_sequences": 64, "seq_len": 256, "eval_sequences": 16, "prune_layers": 0, "sequential": True}
    with_gptq = estimate.compression_memory(facts, quant=True, gptq=True, **common)
    plain = estimate.compression_memory(facts, quant=True, **common)
    h, i = 4096, 11008
    extra = (3 * h * h + i * i) * 4 + estimate.GPTQ_HESSIAN_COPIES * i * i * 4 + 4 * 2 * i * h * 4
    assert with_gptq["quantize"] - plain["quantize"] == extra
    assert 4.0e9 < extra < 4.1e9
    others = ("perplexity", "perplexity_quantized", "prune", "heal")
    assert all(with_gptq[key] == plain[key] for key in others)
    assert _default(gptq.gptq_round, "damp") == gptq.DAMP


def test_the_quantized_perplexity_adds_the_export_roundings_copy_of_the_largest_linear() -> None:
    """The quantized model's perplexity rounds each linear as the export does before its forward: the block phase
    holds the rounded copy and libggml's temporaries of the largest linear on top of the plain figure; none
    without quantization."""
    facts = _llama2_7b_facts(layers=28)
    common = {"calib_sequences": 2, "seq_len": 64, "eval_sequences": 16, "prune_layers": 0, "sequential": True}
    quantized = estimate.compression_memory(facts, quant=True, **common)
    plain = estimate.compression_memory(facts, quant=False, **common)
    extra = int((1 + estimate.EXPORT_ROUND_TEMPORARIES) * 4096 * 11008 * 4)
    block_phase = estimate.BASE_BYTES + 4 * facts.layer_params + 2 * 16 * 64 * 4096 * 4
    assert quantized["perplexity_quantized"] == max(block_phase + extra, plain["perplexity"])
    assert quantized["perplexity_quantized"] > plain["perplexity"] == quantized["perplexity"]
    assert plain["perplexity_quantized"] is None


def test_distillation_keeps_the_teachers_targets_of_every_healing_block() -> None:
    """heal_sequences adds n x seq_len x KD_TOP_K x 12 bytes (float32 log-probs, int64 indices) when distilling in
    float32; a 16-bit heal (the LM loss) keeps none, and there a higher LoRA rank adds its adapters' optimizer state
    (in float32 the teacher phase is the larger one)."""
    facts = _llama2_7b_facts(layers=4)
    base = estimate.heal_memory(facts, calib_sequences=64, seq_len=512)
    more = estimate.heal_memory(facts, calib_sequences=64, seq_len=512, heal_sequences=480)
    assert more - base == (480 - 64) * 512 * estimate.KD_TOP_K * 12
    sixteen = {n: estimate.heal_memory(facts, calib_sequences=64, seq_len=512, heal_sequences=n, sixteen_bit=True)
               for n in (64, 480)}  # fmt: skip
    assert sixteen[64] == sixteen[480]
    ranked = estimate.heal_memory(facts, calib_sequences=64, seq_len=512, sixteen_bit=True, rank=16)
    assert ranked - sixteen[64] == 4 * 4 * (16 - 8) * (8 * 4096 + 3 * (4096 + 11008)) * 4  # 4 layers
