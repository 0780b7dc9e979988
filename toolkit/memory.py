"""Peak-memory estimate of a deployment: weights, KV cache, runtime buffers, fixed overhead, vision tower.

    total = weights + kv_cache + vision + overhead            (bytes in the profile's model tier)

  weights   sum over text tensors of rows * ncols / block(type) * bytes_per_block(type), with the types the
            format really writes (toolkit.format_types: llama.cpp's K-quant mixes and fallbacks, MatMulNBits).
  kv_cache  llama.cpp: 2 * kept_layers * kv_heads * head_dim * pad256(context * batch) * bytes(kv dtype)
            (llama-context.cpp pads n_ctx to a multiple of 256; K and V each in the profile's kv dtype).
            onnxruntime: the same in the graph's float type, twice: past_key_values (inputs) and present
            (outputs) are both alive during a step.
  vision    tower + projector weights at the vision dtype + one image's encoder activations + the projected
            image embeddings handed to the decoder.
  overhead  runtime compute buffer + host logits + runtime process (+ onnxruntime's load-time copies: the
            transposed tied lm_head, prepacked float MatMul weights). The CUDA context of GPU profiles is part of
            the profile's reserved_gib, so it is shown (`reserved.cuda_context`) but not added.
            compute buffer: llama.cpp = LLAMA_CPP_COMPUTE_FACTOR x max(attention, ffn, logits regions);
            onnxruntime = sum of the regions (its arena keeps them all), see the *_compute_regions docstrings.

Where each term lives: on a discrete GPU (model tier of kind "device") the compute buffer, KV cache and the
offloaded weights occupy VRAM; the Python process, host logits and llama.cpp's input embedding (always kept on
the CPU) do not, so they are reported under `host_only.*` and left out of the total. On unified memory (Jetson)
and CPU hosts every term counts.

`detail` keeps every term: keys starting with `param.` are inputs (tokens, layers), `compute.region.` are the
candidate peaks the compute buffer is derived from, `host_only.` are outside the model tier, `reserved.` are
already inside the profile's `reserved_gib` (the CUDA context); all other keys add up to `total_bytes` exactly.
The CPU constants are calibrated against measured peak RSS of the demo model (record below); the runtimes issue
re-checks `bedside plan --profile host` against its own measurements (target: within 10 %) and calibrates the
GPU terms marked CALIBRATE on real devices.
"""

import math
from dataclasses import dataclass

from toolkit.errors import BedsideError
from toolkit.facts import ModelFacts, VisionFacts
from toolkit.format_types import (
    ONNX_FLOAT_BYTES,
    ONNX_SCHEMES,
    StoredTensor,
    onnx_quantizes,
    tensor_types,
    vision_weight_bytes,
)
from toolkit.plan_schema import Candidate, MemoryEstimate, Plan
from toolkit.profiles import DeviceProfile, MemoryTier, available_bytes
from toolkit.schemes import FORMATS, KV_CACHE_DTYPES, RUNTIMES

MIB = 1024**2
GIB = 1024**3
F32 = 4

# llama.cpp pads the context to a multiple of 256 (llama-context.cpp: cparams.n_ctx = GGML_PAD(n_ctx, 256)).
LLAMA_CPP_CTX_PAD = 256

# Calibration (2026-11, this machine kind: 2 cores, Python 3.11, llama-cpp-python 0.3.36 AVX2 build, onnxruntime
# 1.31.1): peak RSS (ru_maxrss) of the demo model (SmolLM2-135M) filling the context with a prompt, then decoding.
#   `import llama_cpp` / `import onnxruntime` alone: 49.7 / 52.2 MiB RSS.
#   llama.cpp, prompt = context - 48:   Q8_0 ctx 2048: 321.7 MiB, ctx 4096: 416.0; Q4_K_M 2048: 291.6, 4096: 386.0
#   onnxruntime, optimum export, prefill P then 8 steps:  fp32 P=512: 1174.7, P=2048: 1793.0;
#                                     int4 b32 asymmetric P=512: 592.2, P=2048: 1258.4
# With the constants below the estimate is within 1.2 % of the four llama.cpp runs and within 8 % of the four
# onnxruntime runs (tests/test_memory.py::test_calibration_record). The runtimes issue re-checks on `--profile host`.

# Runtime process: the interpreter + the runtime's libraries (measured above) + what the runtime allocates at load
# besides weights, KV cache and compute buffer (llama.cpp: vocab and merges, graph metadata, thread pool; ORT:
# session state, graph copies). Fitted: llama.cpp 49.7 + ~40 MiB; onnxruntime 52.2 + ~60 MiB.
RUNTIME_PROCESS_BYTES: dict[str, int] = {
    "llama.cpp": 90 * MIB,
    "onnxruntime": 110 * MIB,
}
# ggml-alloc does not reuse memory perfectly and the CPU backend adds work buffers: measured compute use was
# ~1.25 x the largest region (fit on the four llama.cpp runs above).
LLAMA_CPP_COMPUTE_FACTOR = 1.25
# onnxruntime constant-folds the tied lm_head's Transpose(embedding) into a second, transposed copy at session
# creation (measured: +108 MiB = 49152 x 576 x 4 on the demo, int4 and fp32 alike).
# MLAS prepacks float MatMul weights; the fp32 demo kept ~0.6-0.8 x its MatMul weights extra after loading
# (241-336 MiB over 406 MiB); MatMulNBits graphs showed no such copy.
ORT_FLOAT_PREPACK_FACTOR = 0.7

# CUDA context (driver state, loaded kernels, cuBLAS handle/workspace) in the model tier. Profiles already hold
# it inside `reserved_gib` (toolkit.profiles: "OS, desktop, CUDA context and other tenants"; the rtx3050-4gb and
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

    flash_attn None means llama.cpp's own default, LLAMA_FLASH_ATTN_TYPE_AUTO: on where the backend supports it
    (CUDA) and whenever the KV cache is quantized (a quantized V cache requires it), off on CPU. llama-cpp-python's
    `Llama(flash_attn=False)` default differs: the runner must pass flash_attn=True on CUDA to match this estimate.
    prefill_tokens: onnxruntime's longest single forward (default: the context).
    """

    n_batch: int = 512
    n_ubatch: int = 512
    flash_attn: bool | None = None
    logits_all: bool = False
    prefill_tokens: int | None = None
    images: int = 1


@dataclass(frozen=True)
class Deployment:
    """What estimate_memory needs of a candidate: format, scheme, depth, vision dtype, runtime, context."""

    format: str
    quant: str
    layers_removed: int = 0
    vision_dtype: str | None = None
    runtime: str | None = None
    context: int | None = None
    imatrix: bool = False


def model_tier(profile: DeviceProfile) -> MemoryTier:
    """The tier named by profile.model_tier (where weights, KV cache and buffers must fit)."""
    return profile.model_memory_tier


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
    return Deployment(
        format=candidate.format,
        quant=candidate.quant,
        layers_removed=candidate.layers_removed,
        vision_dtype=candidate.vision_dtype,
        runtime=candidate.runtime,
        context=context,
    )


def _replace_context(deployment: Deployment, context: int) -> Deployment:
    return Deployment(
        deployment.format,
        deployment.quant,
        deployment.layers_removed,
        deployment.vision_dtype,
        deployment.runtime,
        context,
        deployment.imatrix,
    )


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
    """The text tensors of the deployment with their stored types (toolkit.format_types)."""
    kept = facts.num_layers - deployment.layers_removed
    return tensor_types(facts, deployment.format, deployment.quant, kept, deployment.imatrix)


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
    facts: ModelFacts, prefill_tokens: int, batch: int, float_bytes: int
) -> dict[str, int]:
    """Candidate peaks of one onnxruntime prefill of P tokens (optimum-style export, eager attention).

      attention = batch * n_heads * P^2 * b * 2   (scores and softmax output)  + 4 * batch * P * hidden * b
      ffn       = 3 * batch * P * intermediate * b (gate, up, act*up)         + 2 * batch * P * hidden * b
      logits    = batch * P * vocab * b            (the export returns logits for every position)
                  + batch * P * hidden * b
    b = bytes of the graph's float type. ORT's CPU arena keeps what it grew to and reuses chunks of the same size
    only, so the compute memory is the SUM of the regions (measured on the demo: within 5 % at P = 2048).
    """
    p, b = prefill_tokens, float_bytes
    hidden_act = batch * p * facts.hidden_size * b
    attention = batch * facts.num_heads * p * p * b * 2 + 4 * hidden_act
    ffn = 3 * batch * p * facts.intermediate_size * b + 2 * hidden_act
    logits = batch * p * facts.vocab_size * b + hidden_act
    return {"attention": attention, "ffn": ffn, "logits": logits}


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

    # weights; llama.cpp keeps the input embedding on the CPU even when every layer is offloaded
    # (llama-model.cpp: "there is very little benefit to offloading the input layer, so always keep it on the CPU")
    weights: dict[str, int] = {}
    for tensor in text_tensors if text_tensors is not None else text_weights(facts, deployment):
        if discrete and runtime == "llama.cpp" and tensor.role == "token_embd":
            host_only[f"host_only.weights.token_embd.{tensor.dtype}"] = tensor.nbytes
            continue
        weights[tensor.dtype] = weights.get(tensor.dtype, 0) + tensor.nbytes
    for dtype, nbytes in sorted(weights.items()):
        counted[f"weights.{dtype}"] = nbytes
    weights_total = sum(weights.values())

    # KV cache and compute buffers, per runtime
    if runtime == "llama.cpp":
        kv_dtype = profile.kv_cache_dtype
        if kv_dtype not in KV_CACHE_DTYPES:
            raise BedsideError(f"unknown KV-cache dtype '{kv_dtype}'; known: {', '.join(KV_CACHE_DTYPES)}")
        n_ctx = math.ceil(ctx * batch / LLAMA_CPP_CTX_PAD) * LLAMA_CPP_CTX_PAD
        detail["param.kv_tokens"] = n_ctx
        half = kv_cache_bytes(facts, kept, n_ctx, KV_CACHE_DTYPES[kv_dtype]) // 2
        counted["kv_cache.k"] = half
        counted["kv_cache.v"] = half
        auto_flash = gpu or kv_dtype not in ("f16", "f32")
        flash = settings.flash_attn if settings.flash_attn is not None else auto_flash
        detail["param.flash_attn"] = int(flash)
        detail["param.n_ubatch"] = settings.n_ubatch
        outputs = settings.n_ubatch if (gpu or settings.logits_all) else batch
        regions = llama_cpp_compute_regions(facts, n_ctx, settings, flash, outputs)
        compute = int(max(regions.values()) * LLAMA_CPP_COMPUTE_FACTOR)
        # llama_context's output buffer: one row per sequence, n_batch rows with logits_all
        logits_host = facts.vocab_size * (settings.n_batch if settings.logits_all else batch) * F32
        if settings.logits_all:  # llama-cpp-python keeps a (n_ctx, vocab) float32 `scores` array
            logits_host += n_ctx * facts.vocab_size * F32
    elif runtime == "onnxruntime":
        float_bytes = ONNX_FLOAT_BYTES[ONNX_SCHEMES[deployment.quant].float_dtype]
        kv_tokens = ctx * batch
        detail["param.kv_tokens"] = kv_tokens
        kv = kv_cache_bytes(facts, kept, kv_tokens, float_bytes)
        counted["kv_cache.past"] = kv
        counted["kv_cache.present"] = kv
        prefill = min(ctx, settings.prefill_tokens or ctx)
        detail["param.prefill_tokens"] = prefill
        regions = onnxruntime_compute_regions(facts, prefill, batch, float_bytes)
        compute = sum(regions.values())
        logits_host = batch * facts.vocab_size * F32  # the last position's logits copied out to numpy
        if not any(t.role == "output" for t in facts.global_tensors):
            counted["runtime.tied_lm_head_transposed"] = facts.vocab_size * facts.hidden_size * float_bytes
        if ONNX_SCHEMES[deployment.quant].bits is None:
            float_matmul = sum(
                t.nbytes
                for t in (text_tensors or text_weights(facts, deployment))
                if onnx_quantizes(t.role, t.shape)
            )
            counted["runtime.prepacked_matmul"] = int(float_matmul * ORT_FLOAT_PREPACK_FACTOR)
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
        vision_total = sum(v for k, v in counted.items() if k.startswith("vision."))

    # fixed overhead
    process = RUNTIME_PROCESS_BYTES.get(runtime, 0)
    if discrete:
        host_only["host_only.runtime.process"] = process
        host_only["host_only.runtime.logits_host"] = logits_host
    else:
        counted["runtime.process"] = process
        counted["runtime.logits_host"] = logits_host
    if gpu:  # inside profile.reserved_gib already: shown, not added
        detail["reserved.cuda_context"] = CUDA_CONTEXT_BYTES["device" if discrete else "unified"]
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
        detail=detail,
    )


def decode_bytes_per_token(
    facts: ModelFacts,
    deployment: Deployment,
    profile: DeviceProfile,
    text_tensors: list[StoredTensor] | None = None,
) -> int:
    """Bytes read from memory to generate one token (bandwidth-bound decode).

    = text weights - token_embd + one token_embd row (a Gather reads one row) + the KV cache at the full context
    (every past position's K and V is read once per token). Vision runs once per image, not per token.
    """
    tensors = text_tensors if text_tensors is not None else text_weights(facts, deployment)
    total = 0
    for tensor in tensors:
        if tensor.role == "token_embd":
            total += tensor.nbytes // max(1, tensor.shape[0])
        else:
            total += tensor.nbytes
    kept = facts.num_layers - deployment.layers_removed
    ctx = deployment.context or profile.context_length
    if deployment.format == "onnx":
        kv_bytes = ONNX_FLOAT_BYTES[ONNX_SCHEMES[deployment.quant].float_dtype]
    else:
        kv_bytes = KV_CACHE_DTYPES.get(profile.kv_cache_dtype, 2.0)
    total += kv_cache_bytes(facts, kept, ctx, kv_bytes)
    return total
