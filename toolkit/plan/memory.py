"""Peak-memory estimate of a deployment: weights, KV cache, runtime buffers, fixed overhead, vision tower.

    total = weights + kv_cache + vision + overhead            (bytes in the profile's model tier)

  weights   sum over text tensors of rows * ncols / block(type) * bytes_per_block(type), with the types the
            format really writes (toolkit.model.storage_types: llama.cpp's K-quant mixes and fallbacks, MatMulNBits;
            the ONNX exporter's 8-bit head and embedding, onnx_export_head_and_embedding).
  kv_cache  llama.cpp: 2 * kept_layers * kv_heads * head_dim * pad256(context * batch) * bytes(kv dtype)
            (llama-context.cpp pads n_ctx to a multiple of 256; K and V each in the deployment's KV dtype, else the
            profile's: f16 2 bytes, q8_0 34 / 32, q4_0 18 / 32 per element, toolkit.core.formats.KV_CACHE_DTYPES).
            onnxruntime: the same in the graph's float type, twice: past_key_values (inputs) and present
            (outputs) are both alive during a call; plus what the arena holds of earlier calls' caches,
            arena_held = KV * max(0, ORT_ARENA_KV_BASE + ORT_ARENA_KV_PER_DOUBLING * log2(context / P)).
  vision    tower + projector weights at the vision dtype + one image's encoder activations + the projected
            image embeddings handed to the decoder.
  overhead  runtime compute buffer + host logits + runtime process (a fixed part + the vocabulary's tables, per token:
            RUNTIME_VOCAB_BYTES_PER_TOKEN) (+ llama.cpp's CPU_REPACK copy of the weights
            its CPU kernels interleave when the file is also mapped, see llama_cpp_repacked: the runner reads
            rather than maps such files, so by default it is not counted; + onnxruntime's load-time copies: the transposed
            tied lm_head of float graphs, ORT_NBITS_PREPACK_FACTOR x the MatMulNBits weights). The CUDA context
            of GPU profiles is part of the profile's reserved_gib, so it is shown (`reserved.cuda_context`) but
            not added.
            compute buffer: llama.cpp = LLAMA_CPP_COMPUTE_FACTOR x max(attention, ffn, logits regions);
            onnxruntime = sum of the regions of one call of P = ORT_PREFILL_CHUNK tokens (OnnxRunner's batch)
            against the full context (its arena keeps them all), see the *_compute_regions docstrings.

Where each term lives: on a discrete GPU (model tier of kind "device") the compute buffer, KV cache and the
offloaded weights occupy VRAM; the Python process, host logits and llama.cpp's input embedding (always kept on
the CPU) do not, so they are reported under `host_only.*` and left out of the total. On unified memory (Jetson)
and CPU hosts every term counts.

Placement beside a discrete GPU (llama.cpp; the profile links a host tier to the GPU's memory, `host_tier`):
  gpu_layers = N   llama.cpp's n_gpu_layers (llama-model.cpp: i_gpu_start = n_layer + 1 - N): the output head and
                   the last N - 1 decoder layers on the GPU, the first kept + 1 - N layers (their weights and KV
                   cache) in host memory; None = every layer and the head (-ngl all).
  kv_on_host       llama.cpp's offload_kqv = false: the whole KV cache in host memory, attention of decoded tokens
                   on the CPU.
  Moved terms are `host_only.weights.layers.*`, `host_only.weights.output.*`, `host_only.kv_cache.*` and the
  CPU's compute buffer `host_only.compute.buffer` (the graph of one decoded token, LLAMA_CPP_COMPUTE_FACTOR x its
  largest region); on the GPU `compute.offload_copy` holds what op offloading copies in for a prefill batch
  (ggml-backend's op_offload runs batches of >= 32 tokens of host-resident tensors on the GPU: the largest host
  layer's weights, the head, or one layer's K and V). CALIBRATE both on a real device (docs/RUNTIMES.md).
  `MemoryEstimate.host_bytes` sums the `host_only.*` terms: the planner checks it against `host_budget`.

`detail` keeps every term: keys starting with `param.` are inputs (tokens, layers), `compute.region.` are the
candidate peaks the compute buffer is derived from, `host_only.` are outside the model tier, `reserved.` are
already inside the profile's `reserved_gib` (the CUDA context); all other keys add up to `total_bytes` exactly.
The CPU constants are calibrated against measured peak RSS of the demo model (docs/RUNTIMES.md, section
"Calibration record of the estimator's constants (2026-11-23)"); the runtimes issue
re-checks `bedside plan --profile host` against its own measurements (target: within 10 %) and calibrates the
GPU terms marked CALIBRATE on real devices.
"""

import dataclasses
import math
from dataclasses import dataclass

from toolkit.core.errors import BedsideError
from toolkit.core.formats import FORMATS, KV_CACHE_DTYPES, QUANTIZED_KV_CACHE_DTYPES, RUNTIMES
from toolkit.core.units import MIB
from toolkit.model.facts import ModelFacts, VisionFacts
from toolkit.model.storage_types import (
    ONNX_FLOAT_BYTES,
    ONNX_SCHEMES,
    StoredTensor,
    matmul_nbits_bytes,
    onnx_quantizes,
    tensor_types,
    vision_weight_bytes,
)
from toolkit.plan.schema import Candidate, MemoryEstimate, Plan
from toolkit.target.profiles import Compute, DeviceProfile, MemoryTier, available_bytes

F32 = 4

# llama.cpp pads the context to a multiple of 256 (llama-context.cpp: cparams.n_ctx = GGML_PAD(n_ctx, 256)).
LLAMA_CPP_CTX_PAD = 256

# Calibration: the CPU constants below are fitted on the peak RSS (VmHWM of the measuring child) of the demo model
# under llama.cpp and onnxruntime at contexts 256-4096. Measured figures, with the command: docs/RUNTIMES.md,
# section "Calibration record of the estimator's constants (2026-11-23)" (pinned by
# tests/test_memory.py::test_calibration_record).

# Runtime process: the interpreter + the runtime's libraries (calibration record) + what the runtime allocates at load
# besides weights, KV cache and compute buffer (llama.cpp: graph metadata, thread pool; ORT: session state, what the
# trimmed heap keeps of the parsed protobuf) + the vocabulary, which grows with the model's token count:
#   runtime.process = RUNTIME_PROCESS_BYTES[runtime] + vocab_size * RUNTIME_VOCAB_BYTES_PER_TOKEN[runtime]
# Fitted on the demo (vocabulary 49152): onnxruntime, the fp32 export resident after loading minus its weights and
# the transposed tied head (715.0 - 513.1 - 108.0 = 93.9 MiB); llama.cpp 43.7 + 34 MiB, fitted so that the llama.cpp
# runs stay 1-3 % above the measurement. RUNTIME_PROCESS_BYTES is that figure less the demo's vocabulary term, so
# the demo's estimates are unchanged.
# The per-token cost was measured on Gemma 3 270M (vocabulary 262144, docs/BENCHMARKS.md, section "Gemma 3 270M"):
#   llama.cpp: its vocabulary tables (id -> text/score/attributes, text -> id, the token-to-piece cache), the RSS
#     growth of `Llama(gguf, vocab_only=True)`: Gemma 44.3 MiB, SmolLM2 18.5 MiB -> (44.3 - 18.5) MiB / (262144 -
#     49152) tokens = 127 bytes a token;
#   onnxruntime: OnnxRunner's tokenizer (the `tokenizers` library reading tokenizer.json, vocabulary and merges), RSS
#     after loading it and trimming the heap as the runner does: Gemma 101.9 MiB, SmolLM2 18.3 MiB -> 411 bytes a
#     token. Without this term the Gemma estimates were 7 % (llama.cpp) and 7-12 % (onnxruntime) below the peaks.
RUNTIME_VOCAB_BYTES_PER_TOKEN: dict[str, int] = {
    "llama.cpp": 127,
    "onnxruntime": 411,
}
_DEMO_VOCAB = 49152  # SmolLM2's vocabulary, on which RUNTIME_PROCESS_BYTES was fitted
RUNTIME_PROCESS_BYTES: dict[str, int] = {
    "llama.cpp": 78 * MIB - _DEMO_VOCAB * RUNTIME_VOCAB_BYTES_PER_TOKEN["llama.cpp"],
    "onnxruntime": 94 * MIB - _DEMO_VOCAB * RUNTIME_VOCAB_BYTES_PER_TOKEN["onnxruntime"],
}
# ggml-alloc does not reuse memory perfectly and the CPU backend adds work buffers: measured compute use was
# ~1.25 x the largest region (fit on the llama.cpp runs of the first calibration).
LLAMA_CPP_COMPUTE_FACTOR = 1.25
# OnnxRunner.default_batch_size in runtimes/onnx_runner.py: tokens per ORT call, so the prefill of a long prompt
# is a series of calls of this many tokens. runtimes never import toolkit; tests/test_memory.py asserts the two
# agree.
ORT_PREFILL_CHUNK = 128
# exporters/onnx_exporter.py defaults for weight-only schemes (LM_HEAD in its docstring): lm_head untied as
# MatMulNBits and embedding as GatherBlockQuantized, both 8 bits in blocks of 32 along the hidden size.
ORT_HEAD_EMBEDDING_BITS = 8
ORT_HEAD_EMBEDDING_BLOCK = 32
# onnxruntime constant-folds a tied lm_head's Transpose(embedding) into a second, transposed copy at session
# creation (float graphs only; the weight-only exports untie the head): +108 MiB = 49152 x 576 x 4 on the demo.
# MLAS prepacks MatMulNBits weights at session creation (blocked codes + per-block scales and sums for the int8
# compute path, accuracy_level 4); the int4_b32 demo kept 0.36 x its MatMulNBits bytes extra after loading
# (256.4 - 94 process - 127.4 weights = 35.0 MiB over 96.1 MiB). Float MatMul weights showed no extra copy once
# the heap is trimmed (the first calibration's 0.7 x was measured without OnnxRunner's malloc_trim).
ORT_NBITS_PREPACK_FACTOR = 0.36
# Session creation of a float graph with a tied head peaks above the loaded session: while constant folding
# builds the transposed head (above), ORT holds more of it than the copy it keeps. A float export whose head is
# large next to its running buffers then peaks while loading, not at the context:
#   load_peak = weights + runtime.process + tied head transposed x (1 + ORT_TIED_HEAD_FOLD_FACTOR)
# and the estimate counts max(load_peak, running total) as `runtime.load_peak_excess` = the difference when
# positive. Measured: Gemma 3 270M fp32 (head 640 MiB) loaded 1826.3 MiB, peaked at 2627.6 MiB during loading at
# every context (its running peak at 2048 is 2374.1): 801.3 MiB = 1.25 x the head; the demo's fp32 peak at context
# 512 (841.2 MiB, 715.0 loaded, head 108 MiB) bounds its own excess by 1.17 x. docs/BENCHMARKS.md, "Gemma 3 270M".
ORT_TIED_HEAD_FOLD_FACTOR = 1.2
# KV-cache copies ORT's arena holds beyond past + present (onnxruntime_arena_kv_factor), fitted on the onnxruntime
# runs of the calibration record (least squares on log2(context / 128)): int4_b32 (measured - every other term)
# / KV = 0.10, 0.39, 0.82, 0.87, 1.34, 1.30 at 512, 1024, 1536, 2048, 3072, 4096; the fp32 runs (not fitted) then
# agree within 4 %.
ORT_ARENA_KV_BASE = -0.82
ORT_ARENA_KV_PER_DOUBLING = 0.44

# CUDA context (driver state, loaded kernels, cuBLAS handle/workspace) in the model tier. Profiles already hold
# it inside `reserved_gib` (toolkit.target.profiles: "OS, desktop, CUDA context and other tenants"; the rtx3050-4gb and
# jetson4gb sources cite the 287 MB lazy-loaded context of pytorch/pytorch#86509), so the estimate reports it
# as `reserved.cuda_context` for the record and does not add it again.
#   device (discrete GPU): 287,047,680 bytes measured with CUDA_MODULE_LOADING=LAZY vs 666,632,192 eager
#     (pytorch/pytorch#86509); lazy loading is the Linux default since CUDA 12.2 (CUDA C Programming Guide).
#   unified (Jetson): 200 MiB, an estimate (JetPack 6 = CUDA 12.2+, lazy loading; fewer SMs to provision).
#     CALIBRATE on the device (tegrastats) in the runtimes issue.
CUDA_CONTEXT_BYTES: dict[str, int] = {"device": 287_047_680, "unified": 200 * MIB}


@dataclass(frozen=True)
class RuntimeSettings:
    """Runtime parameters that change memory. Defaults are llama-cpp-python 0.3.36's `Llama()` defaults.

    flash_attn None means what LlamaCppRunner runs (`flash_attention`): on with CUDA and whenever the KV cache is
    quantized (a quantized V cache requires it), off on a CPU with an f16 cache (llama-cpp-python's default).
    prefill_tokens: tokens of onnxruntime's longest single call (default ORT_PREFILL_CHUNK, what OnnxRunner
    does; pass the context for a runner that prefills the whole prompt in one call).
    mmap: whether llama.cpp maps the GGUF file. None is LlamaCppRunner's default (runtimes.llamacpp_runner.
    default_mmap): mapped unless the CPU repacks weights, so repacked weights count once; True counts them twice.
    """

    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool | None = None
    logits_all: bool = False
    prefill_tokens: int | None = None
    images: int = 1
    mmap: bool | None = None


@dataclass(frozen=True)
class Deployment:
    """What estimate_memory needs of a candidate: format, scheme, depth, vision dtype, runtime, context, and for
    llama.cpp the KV-cache precision and placement (see the module docstring)."""

    format: str
    quant: str
    layers_removed: int = 0
    vision_dtype: str | None = None
    runtime: str | None = None
    context: int | None = None
    imatrix: bool = False
    kv_cache_dtype: str | None = (
        None  # llama.cpp: None = the profile's kv_cache_dtype; ONNX: its graph's float
    )
    kv_on_host: bool = False  # llama.cpp offload_kqv = false
    gpu_layers: int | None = None  # llama.cpp n_gpu_layers; None = all (every layer and the output head)

    @property
    def placed_on_host(self) -> bool:
        """Whether anything besides the input embedding is placed in host memory beside the GPU."""
        return self.kv_on_host or self.gpu_layers is not None


def model_tier(profile: DeviceProfile) -> MemoryTier:
    """The tier named by profile.model_tier (where weights, KV cache and buffers must fit)."""
    return profile.model_memory_tier


def host_tier(profile: DeviceProfile) -> MemoryTier | None:
    """The host memory beside a discrete GPU: the fastest tier linked to the model tier (the simulator's spill
    tier, toolkit.plan.simulator.make_target); None on CPU hosts, unified memory or without a link."""
    model = profile.model_memory_tier
    if profile.compute.accelerator != "cuda" or model.kind != "device":
        return None
    linked = []
    for link in profile.links:
        if model.name in link.between:
            other = link.between[0] if link.between[1] == model.name else link.between[1]
            linked.extend(tier for tier in profile.memory_tiers if tier.name == other)
    return max(linked, key=lambda tier: tier.effective_bandwidth_bytes_per_s, default=None)


def host_budget(profile: DeviceProfile) -> int | None:
    """Bytes of the host tier a deployment may use: capacity * (1 - headroom_pct / 100), as the simulator counts
    it (profiles give no reserve for it); None without a host tier."""
    tier = host_tier(profile)
    if tier is None:
        return None
    return int(tier.capacity_bytes * (1 - profile.headroom_pct.value / 100))


def kv_cache_dtype_of(deployment: Deployment, profile: DeviceProfile) -> str:
    """The KV-cache element type of a deployment: ONNX Runtime keeps its graph's float type (f32 or f16: the
    export has no quantized cache); llama.cpp the deployment's choice, else the profile's default."""
    if deployment.format == "onnx":
        return "f16" if ONNX_SCHEMES[deployment.quant].float_dtype == "fp16" else "f32"
    return deployment.kv_cache_dtype or profile.kv_cache_dtype


def flash_attention(
    deployment: Deployment, profile: DeviceProfile, settings: RuntimeSettings | None = None
) -> bool:
    """Whether llama.cpp runs flash attention for this deployment: on with CUDA and whenever the KV cache is
    quantized (a quantized V cache needs it), else off; `settings.flash_attn` overrides. This is what
    LlamaCppRunner passes (llama-cpp-python's own default is off); llama.cpp's LLAMA_FLASH_ATTN_TYPE_AUTO would
    also turn it on for a CPU that supports it, so a bundle's runtime.json and launch files state it (-fa on/off).
    """
    if settings is not None and settings.flash_attn is not None:
        return settings.flash_attn
    return (
        profile.compute.accelerator == "cuda"
        or kv_cache_dtype_of(deployment, profile) in QUANTIZED_KV_CACHE_DTYPES
    )


def memory_budget(profile: DeviceProfile) -> int:
    """Bytes a deployment may use: (capacity - reserved) * (1 - headroom_pct / 100) (profiles.available_bytes)."""
    return available_bytes(profile)


def runtime_for(format_name: str, profile: DeviceProfile | None = None) -> str:
    """The first runtime of the profile (preferred first) that loads `format_name`, else the first that does."""
    candidates = [r for r, formats in RUNTIMES.items() if format_name in formats]
    if not candidates:
        raise BedsideError(f"no runtime loads format '{format_name}'")
    if profile is not None:
        for runtime in profile.runtimes:
            if runtime in candidates:
                return runtime
    return candidates[0]


def _as_deployment(plan_or_candidate: Plan | Candidate | Deployment, context: int | None) -> Deployment:
    if isinstance(plan_or_candidate, Deployment):
        return plan_or_candidate if context is None else _replace_context(plan_or_candidate, context)
    if isinstance(plan_or_candidate, Plan):
        if plan_or_candidate.chosen is None:
            raise BedsideError("the plan has no chosen candidate to estimate")
        candidate = plan_or_candidate.chosen
        context = context if context is not None else plan_or_candidate.context_length
    else:
        candidate = plan_or_candidate
    return deployment_of(candidate, context)


def deployment_of(candidate: Candidate, context: int | None = None) -> Deployment:
    """The Deployment a plan's candidate describes (KV precision and placement included)."""
    return Deployment(
        format=candidate.format,
        quant=candidate.quant,
        layers_removed=candidate.layers_removed,
        vision_dtype=candidate.vision_dtype,
        runtime=candidate.runtime,
        context=context,
        kv_cache_dtype=candidate.kv_cache_dtype if candidate.format != "onnx" else None,
        kv_on_host=candidate.kv_on_host,
        gpu_layers=candidate.gpu_layers,
    )


def _replace_context(deployment: Deployment, context: int) -> Deployment:
    return dataclasses.replace(deployment, context=context)


def _validate(facts: ModelFacts, deployment: Deployment) -> None:
    if deployment.format not in FORMATS:
        raise BedsideError(f"unknown format '{deployment.format}'; known: {', '.join(FORMATS)}")
    if deployment.quant not in FORMATS[deployment.format]:
        raise BedsideError(
            f"scheme '{deployment.quant}' is not a {deployment.format} scheme; "
            f"{deployment.format} has: {', '.join(FORMATS[deployment.format])}"
        )
    if not 0 <= deployment.layers_removed < facts.num_layers:
        raise BedsideError(
            f"layers removed must be between 0 and {facts.num_layers - 1} for this model, got {deployment.layers_removed}"
        )


def text_weights(facts: ModelFacts, deployment: Deployment) -> list[StoredTensor]:
    """The text tensors of the deployment with their stored types (toolkit.model.storage_types).

    ONNX weight-only schemes get the exporter's default head and embedding (onnx_export_head_and_embedding).
    """
    kept = facts.num_layers - deployment.layers_removed
    tensors = tensor_types(facts, deployment.format, deployment.quant, kept, deployment.imatrix)
    if deployment.format == "onnx":
        tensors = onnx_export_head_and_embedding(facts, deployment.quant, tensors)
    return tensors


def onnx_export_head_and_embedding(
    facts: ModelFacts, quant: str, tensors: list[StoredTensor]
) -> list[StoredTensor]:
    """`tensors` with the embedding and lm_head that exporters/onnx_exporter.py writes by default.

    Weight-only schemes (bits set): the embedding becomes GatherBlockQuantized and the lm_head its own (untied)
    MatMulNBits weight, both 8 bits in blocks of ORT_HEAD_EMBEDDING_BLOCK along the hidden size, each
    vocab * hidden + vocab * n_blocks * (scale bytes + 1 zero-point byte if asymmetric) bytes
    (format_types.matmul_nbits_bytes). Float schemes are returned unchanged (a tied head stays
    Transpose(embedding), counted as runtime.tied_lm_head_transposed).
    """
    scheme = ONNX_SCHEMES[quant]
    if scheme.bits is None:
        return tensors
    float_bytes = ONNX_FLOAT_BYTES[scheme.float_dtype]
    embedding = next((t for t in facts.global_tensors if t.role == "token_embd"), None)
    if embedding is None or len(embedding.shape) != 2:
        return tensors
    vocab, hidden = embedding.shape
    size = matmul_nbits_bytes(
        vocab, hidden, ORT_HEAD_EMBEDDING_BITS, ORT_HEAD_EMBEDDING_BLOCK, float_bytes, scheme.symmetric
    ).total
    dtype = f"int{ORT_HEAD_EMBEDDING_BITS}_b{ORT_HEAD_EMBEDDING_BLOCK}"
    kept = [t for t in tensors if t.role not in ("token_embd", "output")]
    head = StoredTensor("output.weight", "output", None, (vocab, hidden), dtype, size)
    embd = StoredTensor("token_embd.weight", "token_embd", None, (vocab, hidden), dtype, size)
    return [embd, *kept, head]


def kv_cache_bytes(facts: ModelFacts, kept_layers: int, tokens: int, bytes_per_element: float) -> int:
    """2 * kept_layers * kv_heads * head_dim * tokens * bytes_per_element (K and V for every kept layer)."""
    return int(round(2 * kept_layers * facts.num_kv_heads * facts.head_dim * tokens * bytes_per_element))


def llama_cpp_compute_regions(
    facts: ModelFacts, n_ctx: int, settings: RuntimeSettings, flash_attn: bool, outputs: int | None = None
) -> dict[str, int]:
    """Candidate peaks of llama.cpp's compute buffer (ggml-alloc reuses memory between them; the buffer is the max).

    The buffer is sized by a worst-case graph reserved at init: T = min(n_ctx, n_ubatch) tokens against
    n_kv = n_ctx cached positions, all T rows output (llama-context.cpp graph_reserve). In f32:
      attention (no flash attention) = n_heads * n_kv * T * 4   (KQ; soft_max runs in place)
                                     + n_kv * T * 4             (KQ mask)  + 3 * T * hidden * 4
      attention (flash attention)    = n_heads * head_dim * T * 4 + n_kv * T * 2 (f16 mask) + 3 * T * hidden * 4
      ffn                            = 2 * T * intermediate * 4 + 2 * T * hidden * 4
      logits                         = vocab * O * 4 + T * hidden * 4
    O = T for the reservation (what a GPU allocates); on a CPU only touched pages count, so O = the rows really
    output (1 per sequence when generating, T with logits_all). Check: Llama-2-7B at n_ctx 512, n_ubatch 512,
    O = T gives max = logits = 62.5 + 8 = 70.5 MiB, the compute buffer llama.cpp has long logged for that setting.
    The buffer is LLAMA_CPP_COMPUTE_FACTOR x the largest region (calibrated, see above).
    """
    tokens = min(n_ctx, settings.n_ubatch)
    outputs = tokens if outputs is None else min(outputs, tokens)
    hidden_act = tokens * facts.hidden_size * F32
    if flash_attn:
        attention = facts.num_heads * facts.head_dim * tokens * F32 + n_ctx * tokens * 2 + 3 * hidden_act
    else:
        attention = facts.num_heads * n_ctx * tokens * F32 + n_ctx * tokens * F32 + 3 * hidden_act
    ffn = 2 * tokens * facts.intermediate_size * F32 + 2 * hidden_act
    logits = facts.vocab_size * outputs * F32 + hidden_act
    return {"attention": attention, "ffn": ffn, "logits": logits}


def onnxruntime_compute_regions(
    facts: ModelFacts, prefill_tokens: int, batch: int, float_bytes: int, kv_tokens: int | None = None
) -> dict[str, int]:
    """Candidate peaks of one onnxruntime call of P tokens against T cached positions (optimum export, eager).

      attention = batch * n_heads * P * T * b * 4   (scores, masked scores, softmax, its NaN guard)
                  + 3 * batch * n_heads * T * head_dim * b  (one layer's K and V repeated to all heads, K^T)
                  + 4 * batch * P * hidden * b
      ffn       = 3 * batch * P * intermediate * b  (gate, up, act*up)  + 2 * batch * P * hidden * b
      logits    = 2 * batch * P * vocab * b  (the export returns logits for every position of the call; the
                  runner copies them out to numpy)  + batch * P * hidden * b
    P = the runner's chunk (ORT_PREFILL_CHUNK, or RuntimeSettings.prefill_tokens), T = the context (default P).
    b = bytes of the graph's float type. ORT's CPU arena keeps what it grew to, so the compute memory is the SUM
    of the regions.
    """
    p, b = prefill_tokens, float_bytes
    t = p if kv_tokens is None else kv_tokens
    hidden_act = batch * p * facts.hidden_size * b
    attention = (
        batch * facts.num_heads * p * t * b * 4
        + 3 * batch * facts.num_heads * t * facts.head_dim * b
        + 4 * hidden_act
    )
    ffn = 3 * batch * p * facts.intermediate_size * b + 2 * hidden_act
    logits = 2 * batch * p * facts.vocab_size * b + hidden_act
    return {"attention": attention, "ffn": ffn, "logits": logits}


def onnxruntime_arena_kv_factor(kv_tokens: int, chunk: int) -> float:
    """KV-cache copies ORT's CPU arena holds beyond past + present after filling `kv_tokens` in `chunk` calls.

      factor = max(0, ORT_ARENA_KV_BASE + ORT_ARENA_KV_PER_DOUBLING * log2(kv_tokens / chunk))

    Each call outputs presents `chunk` positions longer than the pasts it frees, so the best-fit arena cannot put
    them back in place; it extends by doubling regions (kNextPowerOfTwo) and keeps the partly used old ones.
    Fitted on the demo (docs/RUNTIMES.md, section "Calibration record of the estimator's constants (2026-11-23)").
    """
    doublings = math.log2(max(1.0, kv_tokens / max(1, chunk)))
    return max(0.0, ORT_ARENA_KV_BASE + ORT_ARENA_KV_PER_DOUBLING * doublings)


def llama_cpp_repacked(tensor: StoredTensor, compute: Compute) -> bool:
    """Whether llama.cpp's CPU backend keeps an interleaved copy of `tensor` (CPU_REPACK extra buffer type).

    ggml-cpu/repack.cpp ggml_repack_get_optimal_repack_type (llama-cpp-python 0.3.36): matrix-multiplied 2-D
    weights (not the token embedding, a GET_ROWS) of type Q4_0, Q4_K, IQ4_NL or MXFP4 with rows % 8 == 0 on AVX2
    (x86); on ARM with dotprod or i8mm Q4_0, IQ4_NL, MXFP4, Q8_0 (rows % 4) and Q4_K, Q5_K, Q6_K (rows % 8).
    The copy lives in anonymous memory; if the file is mapped, the pages it was read from stay resident too, so
    those weights count twice: measured on the demo mapped, Q4_0 241.2 vs 184.6 MiB with extra buffers off
    (+56.6 = its 57.0 MiB of Q4_0), Q4_K_M +7.8 (7.6 MiB Q4_K). LlamaCppRunner therefore reads such files
    (use_mmap=False) and they count once.
    The runner turns extra buffers off on AMX builds (runtimes/llamacpp_runner.py), so AMX profiles get none.
    """
    if tensor.role == "token_embd" or len(tensor.shape) != 2:
        return False
    rows = tensor.shape[0]
    arch = compute.architecture.lower()
    features = {f.lower() for f in (compute.cpu_features or [])}
    if "amx" in arch or "amx" in " ".join(features):
        return False
    if arch.startswith(("x86_64", "amd64", "x86")) and (
        "avx2" in arch or "avx512" in arch or "avx2" in features
    ):
        return tensor.dtype in ("Q4_0", "Q4_K", "IQ4_NL", "MXFP4") and rows % 8 == 0
    if arch.startswith(("aarch64", "arm64")):
        dotprod = "dotprod" in features or "asimddp" in features
        i8mm = "i8mm" in features
        if tensor.dtype in ("Q4_0", "IQ4_NL", "MXFP4", "Q8_0") and (dotprod or i8mm):
            return rows % 4 == 0
        if tensor.dtype in ("Q4_K", "Q5_K", "Q6_K") and (dotprod or i8mm):
            return rows % 8 == 0
    return False


def vision_activation_bytes(vision: VisionFacts, text_hidden: int, images: int) -> dict[str, int]:
    """One image through the ViT (f32) plus the projected embeddings of `images` images.

    encoder = heads * T^2 * 4 + T * intermediate * 4 + 4 * T * hidden * 4 + 3 * S^2 * 4,  T = (S / patch)^2 + 1
    image_embeddings = images * image_tokens * text_hidden * 4
    """
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    encoder = (
        vision.num_heads * tokens * tokens * F32
        + tokens * vision.intermediate_size * F32
        + 4 * tokens * vision.hidden_size * F32
        + 3 * vision.image_size**2 * F32
    )
    embeddings = images * vision.image_tokens_per_image * text_hidden * F32
    return {"encoder": encoder, "image_embeddings": embeddings}


def estimate_memory(
    facts: ModelFacts,
    plan_or_candidate: Plan | Candidate | Deployment,
    profile: DeviceProfile,
    settings: RuntimeSettings | None = None,
    context: int | None = None,
    text_tensors: list[StoredTensor] | None = None,
) -> MemoryEstimate:
    """Estimated peak memory of a deployment in the profile's model tier, every term in `detail`.

    See the module docstring for the formula of each term. `context` overrides the plan's/profile's context.
    `text_tensors` (text_weights() of the same deployment) saves recomputing the type table in a search loop.
    """
    settings = settings or RuntimeSettings()
    deployment = _as_deployment(plan_or_candidate, context)
    _validate(facts, deployment)
    runtime = deployment.runtime or runtime_for(deployment.format, profile)
    if deployment.format not in RUNTIMES.get(runtime, ()):
        raise BedsideError(f"runtime '{runtime}' does not load format '{deployment.format}'")
    tier = model_tier(profile)
    ctx = deployment.context or profile.context_length
    if ctx <= 0:
        raise BedsideError(f"context must be a positive number of tokens, got {ctx}")
    batch = profile.batch_size
    kept = facts.num_layers - deployment.layers_removed
    gpu = profile.compute.accelerator == "cuda"
    discrete = gpu and tier.kind == "device"

    detail: dict[str, int] = {
        "param.context_tokens": ctx,
        "param.batch": batch,
        "param.kept_layers": kept,
    }
    counted: dict[str, int] = {}
    host_only: dict[str, int] = {}
    tensors = text_tensors if text_tensors is not None else text_weights(facts, deployment)

    # placement beside a discrete GPU (module docstring): the first `host_layers` layers and, with n_gpu_layers 0,
    # the output head live in host memory
    host_layers, head_on_host = 0, False
    if deployment.placed_on_host:
        if runtime != "llama.cpp" or not discrete or host_tier(profile) is None:
            raise BedsideError(
                f"placing layers or the KV cache in host memory needs llama.cpp on a discrete GPU with host memory "
                f"linked to it; profile '{profile.name}' runs {runtime} on {tier.kind} memory '{tier.name}'"
            )
        if deployment.gpu_layers is not None:
            if not 0 <= deployment.gpu_layers <= kept + 1:
                raise BedsideError(
                    f"gpu layers must be between 0 and {kept + 1} (the {kept} kept layers and the output head), "
                    f"got {deployment.gpu_layers}"
                )
            host_layers = min(kept, kept + 1 - deployment.gpu_layers)
            head_on_host = deployment.gpu_layers == 0
            detail["param.gpu_layers"] = deployment.gpu_layers
        detail["param.kv_on_host"] = int(deployment.kv_on_host)

    # weights; llama.cpp keeps the input embedding on the CPU even when every layer is offloaded
    # (llama-model.cpp: "there is very little benefit to offloading the input layer, so always keep it on the CPU")
    weights: dict[str, int] = {}
    host_layer_bytes: dict[int, int] = {}
    for tensor in tensors:
        if discrete and runtime == "llama.cpp" and tensor.role == "token_embd":
            host_only[f"host_only.weights.token_embd.{tensor.dtype}"] = tensor.nbytes
            continue
        if tensor.layer is not None and tensor.layer < host_layers:
            key = f"host_only.weights.layers.{tensor.dtype}"
            host_only[key] = host_only.get(key, 0) + tensor.nbytes
            host_layer_bytes[tensor.layer] = host_layer_bytes.get(tensor.layer, 0) + tensor.nbytes
            continue
        if tensor.layer is None and head_on_host:
            key = f"host_only.weights.output.{tensor.dtype}"
            host_only[key] = host_only.get(key, 0) + tensor.nbytes
            continue
        weights[tensor.dtype] = weights.get(tensor.dtype, 0) + tensor.nbytes
    for dtype, nbytes in sorted(weights.items()):
        counted[f"weights.{dtype}"] = nbytes
    weights_total = sum(weights.values())

    # KV cache and compute buffers, per runtime
    if runtime == "llama.cpp":
        kv_dtype = kv_cache_dtype_of(deployment, profile)
        if kv_dtype not in KV_CACHE_DTYPES:
            raise BedsideError(f"unknown KV-cache dtype '{kv_dtype}'; known: {', '.join(KV_CACHE_DTYPES)}")
        n_ctx = math.ceil(ctx * batch / LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD
        detail["param.kv_tokens"] = n_ctx
        element = KV_CACHE_DTYPES[kv_dtype]
        host_kv_layers = kept if deployment.kv_on_host else host_layers
        half = kv_cache_bytes(facts, kept - host_kv_layers, n_ctx, element) // 2
        counted["kv_cache.k"] = half
        counted["kv_cache.v"] = half
        if host_kv_layers:
            host_half = kv_cache_bytes(facts, host_kv_layers, n_ctx, element) // 2
            host_only["host_only.kv_cache.k"] = host_half
            host_only["host_only.kv_cache.v"] = host_half
        flash = flash_attention(deployment, profile, settings)
        detail["param.flash_attn"] = int(flash)
        detail["param.n_ubatch"] = settings.n_ubatch
        if not gpu:  # CPU_REPACK: an interleaved copy of the weights the CPU kernels prefer
            repacked = sum(
                t.nbytes
                for t in (text_tensors if text_tensors is not None else text_weights(facts, deployment))
                if llama_cpp_repacked(t, profile.compute)
            )
            mapped = settings.mmap if settings.mmap is not None else not repacked
            detail["param.mmap"] = int(mapped)
            if repacked and mapped:  # the mapped file pages stay resident beside the copy
                counted["runtime.repacked_weights"] = repacked
        outputs = settings.n_ubatch if (gpu or settings.logits_all) else batch
        regions = llama_cpp_compute_regions(facts, n_ctx, settings, flash, outputs)
        compute = int(max(regions.values()) * LLAMA_CPP_COMPUTE_FACTOR)
        if deployment.placed_on_host:
            # op offload: a prefill batch's ops on host-resident tensors run on the GPU with those tensors copied in
            head = sum(v for k, v in host_only.items() if k.startswith("host_only.weights.output."))
            layer_kv = kv_cache_bytes(facts, 1, n_ctx, element) if deployment.kv_on_host else 0
            counted["compute.offload_copy"] = max(max(host_layer_bytes.values(), default=0), head, layer_kv)
            # the CPU runs the host-resident part of a decoded token's graph (one token, one output row)
            one_token = dataclasses.replace(settings, n_ubatch=1, n_batch=1)
            cpu_regions = llama_cpp_compute_regions(facts, n_ctx, one_token, flash, 1)
            host_only["host_only.compute.buffer"] = int(max(cpu_regions.values()) * LLAMA_CPP_COMPUTE_FACTOR)
        # llama_context's output buffer: one row per sequence, n_batch rows with logits_all
        logits_host = facts.vocab_size * (settings.n_batch if settings.logits_all else batch) * F32
        if settings.logits_all:  # llama-cpp-python keeps a (n_ctx, vocab) float32 `scores` array
            logits_host += n_ctx * facts.vocab_size * F32
    elif runtime == "onnxruntime":
        scheme = ONNX_SCHEMES[deployment.quant]
        float_bytes = ONNX_FLOAT_BYTES[scheme.float_dtype]
        kv_tokens = ctx * batch
        detail["param.kv_tokens"] = kv_tokens
        kv = kv_cache_bytes(facts, kept, kv_tokens, float_bytes)
        counted["kv_cache.past"] = kv
        counted["kv_cache.present"] = kv
        chunk = min(ctx, settings.prefill_tokens or ORT_PREFILL_CHUNK)
        detail["param.prefill_tokens"] = chunk
        counted["kv_cache.arena_held"] = int(kv * onnxruntime_arena_kv_factor(ctx, chunk))
        regions = onnxruntime_compute_regions(facts, chunk, batch, float_bytes, ctx)
        compute = sum(regions.values())
        logits_host = batch * facts.vocab_size * F32  # the last position's logits, float32
        tensors = text_tensors if text_tensors is not None else text_weights(facts, deployment)
        if scheme.bits is None:
            if not any(t.role == "output" for t in tensors):
                counted["runtime.tied_lm_head_transposed"] = (
                    facts.vocab_size * facts.hidden_size * float_bytes
                )
        else:
            nbits = sum(t.nbytes for t in tensors if onnx_quantizes(t.role, t.shape) or t.role == "output")
            counted["runtime.prepacked_matmul_nbits"] = int(nbits * ORT_NBITS_PREPACK_FACTOR)
    else:
        raise BedsideError(f"no memory model for runtime '{runtime}'; known: llama.cpp, onnxruntime")
    kv_total = sum(v for k, v in counted.items() if k.startswith("kv_cache."))

    for name, nbytes in regions.items():
        detail[f"compute.region.{name}"] = nbytes
    counted["compute.buffer"] = compute

    # vision tower + projector
    vision_total = 0
    if facts.vision is not None:
        vision_dtype = deployment.vision_dtype or "f16"
        for dtype, nbytes in sorted(
            vision_weight_bytes(facts.vision, deployment.format, vision_dtype).items()
        ):
            counted[f"vision.weights.{dtype}"] = nbytes
        for name, nbytes in vision_activation_bytes(facts.vision, facts.hidden_size, settings.images).items():
            counted[f"vision.{name}"] = nbytes
        # the image's positions are part of the context the KV cache holds (counted in kv_cache.*)
        detail["param.image_positions"] = settings.images * facts.vision.image_tokens_per_image
        vision_total = sum(v for k, v in counted.items() if k.startswith("vision."))

    # fixed overhead
    vocabulary = facts.vocab_size * RUNTIME_VOCAB_BYTES_PER_TOKEN.get(runtime, 0)
    process = RUNTIME_PROCESS_BYTES.get(runtime, 0) + vocabulary
    if discrete:
        host_only["host_only.runtime.process"] = process
        host_only["host_only.runtime.logits_host"] = logits_host
    else:
        counted["runtime.process"] = process
        counted["runtime.logits_host"] = logits_host
    if gpu:  # inside profile.reserved_gib already: shown, not added
        detail["reserved.cuda_context"] = CUDA_CONTEXT_BYTES["device" if discrete else "unified"]
    head = counted.get("runtime.tied_lm_head_transposed", 0)
    if head and "runtime.process" in counted:  # a float ONNX graph may peak while its session is built
        load_peak = weights_total + counted["runtime.process"] + head + int(head * ORT_TIED_HEAD_FOLD_FACTOR)
        detail["param.load_peak_bytes"] = load_peak
        running = sum(counted.values())
        if load_peak > running:
            counted["runtime.load_peak_excess"] = load_peak - running
    overhead_total = sum(v for k, v in counted.items() if k.startswith(("compute.", "runtime.")))

    total = weights_total + kv_total + vision_total + overhead_total
    assert total == sum(counted.values()), "every counted term belongs to exactly one group"
    detail.update(counted)
    detail.update(host_only)
    return MemoryEstimate(
        total_bytes=total,
        weights_bytes=weights_total,
        kv_cache_bytes=kv_total,
        vision_bytes=vision_total,
        overhead_bytes=overhead_total,
        host_bytes=sum(host_only.values()),
        detail=detail,
    )


def decode_bytes_by_tier(
    facts: ModelFacts,
    deployment: Deployment,
    profile: DeviceProfile,
    text_tensors: list[StoredTensor] | None = None,
) -> dict[str, int]:
    """Bytes read from each memory tier to generate one token (bandwidth-bound decode), by tier name.

    = text weights - token_embd + one token_embd row (a Gather reads one row) + the KV cache at the full context
    (every past position's K and V is read once per token, at the deployment's KV precision). Vision runs once per
    image, not per token. Everything is read from the model tier, except beside a discrete GPU under llama.cpp:
    the embedding row, and the layers, head and KV cache a placement puts in host memory (estimate_memory), are
    read from the host tier.
    """
    tensors = text_tensors if text_tensors is not None else text_weights(facts, deployment)
    model = model_tier(profile).name
    spill = host_tier(profile)
    on_host = (
        spill is not None and (deployment.runtime or runtime_for(deployment.format, profile)) == "llama.cpp"
    )
    host = spill.name if spill is not None and on_host else model
    kept = facts.num_layers - deployment.layers_removed
    host_layers = 0 if deployment.gpu_layers is None else min(kept, kept + 1 - deployment.gpu_layers)
    head_on_host = deployment.gpu_layers == 0
    read = {model: 0, host: 0}
    for tensor in tensors:
        if tensor.role == "token_embd":
            read[host] += tensor.nbytes // max(1, tensor.shape[0])
        elif (tensor.layer is not None and tensor.layer < host_layers) or (
            tensor.layer is None and head_on_host
        ):
            read[host] += tensor.nbytes
        else:
            read[model] += tensor.nbytes
    ctx = deployment.context or profile.context_length
    element = KV_CACHE_DTYPES[kv_cache_dtype_of(deployment, profile)]
    host_kv_layers = kept if deployment.kv_on_host else host_layers
    read[model] += kv_cache_bytes(facts, kept - host_kv_layers, ctx, element)
    read[host] += kv_cache_bytes(facts, host_kv_layers, ctx, element)
    return read


def decode_seconds_per_token(
    facts: ModelFacts,
    deployment: Deployment,
    profile: DeviceProfile,
    text_tensors: list[StoredTensor] | None = None,
    efficiency: float = 1.0,
) -> float:
    """Roofline time of one decoded token: sum over tiers of bytes read there / (its bandwidth x efficiency), the
    bandwidth being the tier's sustained figure when the profile gives it, else its peak."""
    tiers = {tier.name: tier for tier in profile.memory_tiers}
    return sum(
        nbytes / (tiers[name].effective_bandwidth_bytes_per_s * efficiency)
        for name, nbytes in decode_bytes_by_tier(facts, deployment, profile, text_tensors).items()
        if nbytes
    )


def decode_bytes_per_token(
    facts: ModelFacts,
    deployment: Deployment,
    profile: DeviceProfile,
    text_tensors: list[StoredTensor] | None = None,
) -> int:
    """Bytes read from memory to generate one token, all tiers together (decode_bytes_by_tier)."""
    return sum(decode_bytes_by_tier(facts, deployment, profile, text_tensors).values())
