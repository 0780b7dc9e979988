"""The build host's memory for `bedside compress`, per stage: what compressing needs, beside what the target needs.

Why: the plan says whether the compressed model fits the device; this says whether the machine that
compresses it can, stage by stage, and whether it can heal (healing needs the whole model resident).

Terms (bytes; P = parameters, L = layers, h = hidden, i = MLP width, V = vocabulary, T = tokens):

- `base`: the process before any weights (Python, torch, transformers, tokenizer, the blocks),
  BASE_BYTES, measured on this host (docs/BENCHMARKS.md, bench/sequential.py).
- block by block (toolkit.compress.sequential), a stage alternates between two phases and peaks in the
  larger: the block phase (one decoder block in float32, 4 x layer params, twice while a fake-quantized or
  searched copy sits beside the original, plus the hidden states) and the head phase (the float32 output
  head V x h x 4 and the logits it makes):
  - `prune`, the activation search: (L + 2) streams x T_a x h x 4 of hidden states (T_a = min(8,
    sequences) x min(128, seq_len)) in both phases; in the head phase the reference distribution
    (T_a x V x 4 x 2) and one batch's logits (4 x min(128, seq_len) x V x 4 x LOGIT_COPIES). The linear
    replacement's pass: one block + T_c x h x 4 x 4 (states, outputs, span input, MLP output; T_c =
    sequences x seq_len) + two h x h float64 sums. Scoring with a quantizer (a scheme given) adds, in
    the block phase, the fake-quantizer's temporaries on the largest linear, FAKE_QUANT_TEMPORARIES x h x
    i x 4 (measured: docs/BENCHMARKS.md, the 7B-shaped run).
  - `quantize` (AWQ, no head): two blocks, the block's inputs and outputs (T_c x h x 4 x 2), the search
    subset's linear inputs (min(1024, T_c) x (6h + i) x 4), a batch's MLP activations
    (8 x seq_len x i x 4 x 3), one chunk of the clip search's errors (256 rows x max(h, i) float64
    differences and their product with the groups' Gram matrices, x 2), four copies of the largest
    linear (h x i x 4), and the emulated search's fake-quantizer temporaries on it
    (FAKE_QUANT_TEMPORARIES x h x i x 4, as in prune: every candidate of the largest group is rounded on
    the torch emulation first; measured on the 7B-shaped run). With GPTQ (`--quant-method awq-gptq`, the
    default for GGUF) a layer's input Gram matrices ((3 h^2 + i^2) x 4), GPTQ_HESSIAN_COPIES i x i float32
    matrices of the widest input's Hessian and four copies of the stacked gate/up rows (2 i x h x 4): not yet
    measured on a 7B shape, an estimate from the code.
  - `perplexity`: the states (T_e x h x 4 x 2) and one block, or the head and one batch's logits
    (4 x seq_len x V x 4 x LOGIT_COPIES). `perplexity_quantized` (the quantized model's figure) first rounds
    each linear as the export does (F16, then libggml with the matrix): on the largest, its float32 output
    beside the weight it replaces plus EXPORT_ROUND_TEMPORARIES x h x i x 4 of temporaries
    (bench/fake_quant_memory.py --export-rounding).
- in memory (the path models under the sequential threshold take): the whole model in float32
  (4P) plus the same activations, for every stage.
- `heal` (never streamed): the whole model with LoRA (rank r, float32 adapters with their gradient
  and two AdamW moments: 16 r (8h + 3(h + i)) L bytes) plus the training activations; a host below it
  cannot heal and deploy continues unhealed. In float32 (models compressed in memory): 4P, and every
  layer's saved activations (HEAL_BATCH x seq_len x L x (16h + 3i) x 4). A streamed model stored in
  16 bits (`heals_in_sixteen_bits`) heals in those 16 bits with gradient checkpointing: 2P, each
  layer's input kept (tokens x L x h x 2) and one layer's activations recomputed (tokens x (16h + 3i)
  x 4), plus the largest linear's float32 merge delta (h x i x 4). Logits in float32 either way.
  Distillation (`kd`, the default for text models healed in float32) first loads the unpruned model in
  float32 beside the student to take its top-k log-probabilities (4P + one batch's logits), freed before
  training: the stage peaks in the larger of that phase and training, plus the top-k targets themselves,
  kept for every healing block through both (n x seq_len x 64 x 12 bytes: 25 MB for 64 x 512 tokens).

The constants are fitted on this host's measured peaks (bench/sequential.py); the estimate's error on
the 1.1B- and 7B-shaped runs is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

from typing import Any

from toolkit.model.facts import ModelFacts

BASE_BYTES = 450 << 20  # process with torch, transformers, tokenizer and data blocks loaded (measured, this host)
LOGIT_COPIES = 3  # logits, log-softmax and the float32 copy alive together while one batch is scored
ACTIVATION_SEQUENCES = 8  # the activation method's default max_sequences / max_tokens
ACTIVATION_TOKENS = 128
AWQ_SEARCH_TOKENS = 1024
AWQ_BATCH = 4
AWQ_CLIP_ROWS = 256  # awq.CLIP_OUT_ROWS
AWQ_WEIGHT_COPIES = 4
# float32 temporaries of `fake_quantize` (asym4_g32, the Q4_K stand-in) beside its input and output, in units
# of the matrix: 5.5 measured on 4096 x 11008 and on 2048 x 5632 (docs/BENCHMARKS.md)
FAKE_QUANT_TEMPORARIES = 5.5
# temporaries of `export_round` (F16 intermediate, libggml Q4_K/Q6_K with a matrix) beside its input and output:
# 1.14 (Q4_K) and 1.21 (Q6_K) on 4096 x 11008, 1.24 on 5632 x 2048 (docs/BENCHMARKS.md)
EXPORT_ROUND_TEMPORARIES = 1.2
# gptq.gptq_round on the widest input: the permuted Gram, then at most three matrices in prepare_hessian
GPTQ_HESSIAN_COPIES = 4
PERPLEXITY_BATCH = 4
FLOAT32 = 4
FLOAT64 = 8
# `--sequential auto` streams a model whose float32 weights exceed this (a 1.1B model's 4.4 GB does, the 135M
# demo's 0.5 GB does not): below it the whole model is small and the in-memory path keeps its one load.
SEQUENTIAL_THRESHOLD_BYTES = 2 << 30


def streams_by_default(facts: ModelFacts) -> bool:
    """What `--sequential auto` decides from the config alone (toolkit.compress.pipeline.use_sequential reads the
    shards): float32 weights above SEQUENTIAL_THRESHOLD_BYTES, and not a LLaVA, which cannot stream."""
    return FLOAT32 * facts.text_params > SEQUENTIAL_THRESHOLD_BYTES and facts.vision is None


def compression_memory(
    facts: ModelFacts,
    *,
    calib_sequences: int,
    seq_len: int,
    eval_sequences: int,
    prune_layers: int,
    quant: bool,
    sequential: bool,
    heal: bool = False,
    heal_sixteen_bit: bool = False,
    gptq: bool = False,
) -> dict[str, Any]:
    """Estimated peak resident bytes of each compress stage on the build host (formulas in the module docstring)."""
    h, i, v, layers = facts.hidden_size, facts.intermediate_size, facts.vocab_size, facts.num_layers
    block = FLOAT32 * facts.layer_params
    model = FLOAT32 * facts.text_params
    head = FLOAT32 * v * h
    calib_tokens = calib_sequences * seq_len
    eval_tokens = eval_sequences * seq_len
    batch_logits = PERPLEXITY_BATCH * seq_len * v * FLOAT32 * LOGIT_COPIES
    active_tokens = min(ACTIVATION_SEQUENCES, calib_sequences) * min(ACTIVATION_TOKENS, seq_len)
    streams = (layers + 2) * active_tokens * h * FLOAT32
    reference = active_tokens * v * FLOAT32 * 2
    activation_logits = PERPLEXITY_BATCH * min(ACTIVATION_TOKENS, seq_len) * v * FLOAT32 * LOGIT_COPIES
    replacement = calib_tokens * h * FLOAT32 * 4 + 2 * h * h * FLOAT64
    search = min(AWQ_SEARCH_TOKENS, calib_tokens)
    awq = (
        2 * calib_tokens * h * FLOAT32
        + search * (6 * h + i) * FLOAT32
        + AWQ_BATCH * seq_len * i * FLOAT32 * 3
        + 2 * AWQ_CLIP_ROWS * max(h, i) * FLOAT64  # one clip-error chunk: float64 differences and d^T H
        + AWQ_WEIGHT_COPIES * h * i * FLOAT32  # the largest linear: scaled, rounded, padded, difference
    )
    if gptq:  # a layer's X^T X (q/k/v, o, gate/up: h x h; down: i x i), then prepare_hessian's matrices + stacked rows
        awq += (3 * h * h + i * i) * FLOAT32 + GPTQ_HESSIAN_COPIES * i * i * FLOAT32 + 4 * 2 * i * h * FLOAT32
    states = 2 * eval_tokens * h * FLOAT32
    quantizer = int(FAKE_QUANT_TEMPORARIES * h * i * FLOAT32) if quant else 0
    rounding = int((1 + EXPORT_ROUND_TEMPORARIES) * h * i * FLOAT32)  # the rounded copy and its temporaries
    if sequential:
        prune = max(
            2 * block + streams + quantizer, head + reference + activation_logits + streams, block + replacement
        )
        quantize = 2 * block + awq + quantizer
        perplexity = max(block + states, head + states + batch_logits)
        perplexity_quantized = max(block + states + rounding, head + states + batch_logits)
    else:
        prune = model + max(streams + reference + activation_logits + quantizer, replacement)
        quantize = model + awq + quantizer
        perplexity = model + states + batch_logits
        perplexity_quantized = model + max(rounding, states + batch_logits)
    stages: dict[str, Any] = {
        "perplexity": BASE_BYTES + perplexity,
        "perplexity_quantized": BASE_BYTES + perplexity_quantized if quant else None,
        "prune": BASE_BYTES + prune if prune_layers > 0 else None,
        "quantize": BASE_BYTES + quantize if quant else None,
        "heal": heal_memory(facts, calib_sequences=calib_sequences, seq_len=seq_len, sixteen_bit=heal_sixteen_bit)
        if heal
        else None,
    }
    return {
        **stages,
        "sequential": sequential,
        "heal_sixteen_bit": heal and heal_sixteen_bit,
        "peak": max(value for value in stages.values() if value is not None),
        "terms": {"base": BASE_BYTES, "block_float32": block, "model_float32": model, "head_float32": head},
    }


HEAL_BATCH = 4
HEAL_ACTIVATION_COPIES = 16  # saved tensors per layer and token (attention + MLP) in float32, h-wide units
HEAL_LORA_RANK = 8  # toolkit.compress.heal.DEFAULT_RANK
KD_TOP_K = 64  # toolkit.compress.heal.KD_TOP_K: teacher log-probabilities kept per position
ADAM_STATE_COPIES = 4  # an adapter parameter, its gradient and AdamW's two moments, float32 each
SIXTEEN_BIT_DTYPES = ("bfloat16", "float16")


def heals_in_sixteen_bits(sequential: bool, dtype: str | None) -> bool:
    """Whether compress heals in 16 bits: a model streamed block by block (too big for float32 in memory)
    whose checkpoint stores 16-bit weights keeps them while healing, with gradient checkpointing."""
    return sequential and dtype in SIXTEEN_BIT_DTYPES


def heal_memory(
    facts: ModelFacts,
    *,
    calib_sequences: int,
    seq_len: int,
    sixteen_bit: bool = False,
    heal_sequences: int | None = None,
    rank: int = HEAL_LORA_RANK,
) -> int:
    """Healing's peak (module docstring): the model in float32 (or 16 bits with gradient checkpointing),
    then the larger of the teacher phase (distillation: the unpruned float32 model and a batch's logits) and
    training (the LoRA adapters with their optimizer state, one batch's activations and its logits); with
    distillation the teacher's top-k targets of every healing block (``heal_sequences``, default the calibration's)
    stay resident through both: ``n x seq_len x KD_TOP_K x (4 + 8)`` bytes (float32 log-probs, int64 indices)."""
    h, i, layers = facts.hidden_size, facts.intermediate_size, facts.num_layers
    sequences = heal_sequences or calib_sequences
    tokens = min(HEAL_BATCH, sequences) * seq_len
    lora = ADAM_STATE_COPIES * FLOAT32 * rank * (8 * h + 3 * (h + i)) * layers
    layer_activations = tokens * (HEAL_ACTIVATION_COPIES * h + 3 * i) * FLOAT32
    logits = tokens * facts.vocab_size * FLOAT32 * LOGIT_COPIES
    training = lora + logits
    if sixteen_bit:
        weights = 2 * facts.text_params
        training += tokens * layers * h * 2 + layer_activations + h * i * FLOAT32
        teacher = 0  # healed with the LM loss: no second copy (toolkit.compress.pipeline._heal_objective)
    else:
        weights = FLOAT32 * facts.text_params
        training += layer_activations * layers
        teacher = FLOAT32 * facts.text_params + logits if facts.vision is None else 0
    targets = sequences * seq_len * KD_TOP_K * (FLOAT32 + 8) if teacher else 0
    return BASE_BYTES + weights + targets + max(teacher, training)
