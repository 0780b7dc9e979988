"""Predict prefill and decode speed on a target device: a memory-tier epoch model in the spirit of CXLMemSim.

CXLMemSim (arXiv 2303.06153) cuts a run into epochs and computes each epoch's time on another memory
hierarchy. Here one epoch is one forward step of the runtime: a prefill chunk of T tokens (llama.cpp: n_batch
512; OnnxRunner: 128) or one decoded token (T = 1), at p tokens already cached.

Target (from the device profile, toolkit/target/schema.py): the model tier (usable = profile.available_bytes),
a spill tier (the fastest other tier linked to a discrete GPU's memory: host DRAM or a CXL expander; usable =
capacity x (1 - headroom)), the link between them, the accelerator's peaks (fp16_tflops, int8_tops) and the
host CPU's (compute.cpu_tflops; on a CPU profile the compute block itself, scaled by threads / cores).
Read bandwidth = read_bandwidth_gbs, else sustained, else peak; writes likewise with write_bandwidth_gbs.

Placement (what lives where):
  device      every layer, the KV cache and the head on the model tier, computed by the accelerator
  split:N     llama.cpp's n_gpu_layers = N: layers 0..N-1 (weights and their KV) on the model tier, the rest
              and the head on the spill tier, computed by the CPU; "split" = the largest N that fits
  kv-host     weights on the model tier, the KV cache on the spill tier with attention on the CPU
              (llama.cpp's offload_kqv = false)
  auto        the fastest placement that fits the context (device when it fits); a plan's or bundle's own
              placement (Candidate.kv_on_host / gpu_layers, runtime.json kv_offload / gpu_layers) when it has one:
              n_gpu_layers = N is split:N-1 with the head on the model tier (llama.cpp offloads the head first)

Per epoch and per segment (each decoder layer, the head), bytes at the tier that holds them and FLOPs:
  weights     the layer's tensors at their stored size (toolkit.plan.workload: the GGUF's own table or the
              memory estimator's)
  KV read     2 x kv_heads x head_dim x (p + T) x element bytes; KV written: the same for T tokens. The ONNX
              export copies its cache every call (present = Concat(past, new), a fresh tensor): + p read and
              + p written
  activations the residual stream in and out: 2 x T x hidden x 4
  FLOPs       2 x T x layer matrix elements (integer peak for quantized weights, float peak otherwise)
              + attention 4 x T x (p + (T + 1) / 2) x heads x head_dim (float peak)
  head        its weights + T embedding rows; 2 x rows x vocab x hidden FLOPs, rows = 1 per call for
              llama.cpp (logits of the last token), T for the ONNX export (logits of every position)
  segment time = max(read / (read_bw x e_bw) + written / (write_bw x e_bw),
                     int_flops / (int_peak x e_c) + float_flops / (float_peak x e_c))
  epoch time   = sum of segment times + step_overhead_s + link transfers
  link         per crossing: bytes / link bandwidth + link latency. device on a discrete GPU: embeddings in
               (T x hidden x 4) and logits out (rows x vocab x 4); split: the hidden state at the boundary;
               kv-host: per layer q, k, v out and the attention output back.
e_bw, e_c and step_overhead_s come from toolkit.plan.calibration (fitted on this host's measurements).

A simulation of context C follows the job `bedside eval --context C` measures (runtimes.measure): a prompt of
C - decode_tokens tokens prefilled in chunks, then decode_tokens greedy steps that fill the cache to C.
  ttft_s                 the prompt's prefill epochs
  prefill_tokens_per_s   prompt tokens / ttft_s
  decode_tokens_per_s    decode_tokens / the decode steps' time
  per_token_latency_s    one decode step's time at LATENCY_POINTS positions along 0..C-1
  oom_context            null when the placement fits C; else the first context that does not fit
Memory per tier comes from toolkit.plan.memory.estimate_memory (the planner's estimate), with the layers, KV
cache and head a placement moves off the model tier counted on the spill tier instead.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from toolkit.core.errors import BedsideError
from toolkit.core.units import GIB
from toolkit.plan.calibration import Efficiency, efficiency_for, read_calibration
from toolkit.plan.memory import estimate_memory
from toolkit.plan.workload import Workload
from toolkit.target.host import runtime_peak_share
from toolkit.target.profiles import GB, DeviceProfile, MemoryTier, available_bytes

F32 = 4
LATENCY_POINTS = 32
DECODE_TOKENS = 32  # what `bedside eval` decodes after the prefill (runtimes.measure.MeasureJob default)
PLACEMENTS = ("auto", "device", "split", "split:N", "kv-host")
# Host CPU of a GPU profile without compute.cpu_tflops: 4 cores x 3 GHz x 32 FLOP/cycle (AVX2, two FMA pipes),
# the estimate toolkit.target.host makes for a CPU; marked as an assumption in the output.
ASSUMED_CPU_TFLOPS = 0.384


@dataclass(frozen=True)
class TierSpec:
    name: str
    kind: str
    usable_bytes: int
    read_bytes_per_s: float
    write_bytes_per_s: float


@dataclass(frozen=True)
class Processor:
    name: str  # "cuda" or "cpu"
    float_flops: float
    int_ops: float
    efficiency: Efficiency


@dataclass(frozen=True)
class Target:
    """The parts of a profile the epoch model uses."""

    name: str
    model_tier: TierSpec
    spill_tier: TierSpec | None
    link_bytes_per_s: float | None
    link_latency_s: float
    main: Processor  # computes what lives on the model tier
    cpu: Processor  # computes what lives on the spill tier
    discrete: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    name: str  # device | split | kv-host
    gpu_layers: int  # layers on the model tier
    kv_on_spill: bool = False
    head_on_model: bool = (
        False  # split: the head stays on the model tier (a plan's llama.cpp n_gpu_layers >= 1)
    )

    def label(self, layers: int) -> str:
        if self.name == "split":
            head = ", head on the model tier" if self.head_on_model and self.gpu_layers < layers else ""
            kv = ", KV cache on the spill tier" if self.kv_on_spill else ""
            return (
                f"split:{self.gpu_layers} ({self.gpu_layers} of {layers} layers on the model tier{head}{kv})"
            )
        return self.name


def planned_placement(workload: Workload) -> Placement | None:
    """The placement a plan or bundle chose (its Deployment's gpu_layers / kv_on_host; all on the device when it
    placed nothing elsewhere), None for a bare export, which chose none."""
    deployment = workload.deployment
    layers = workload.num_layers
    if deployment.gpu_layers is None:
        if deployment.kv_on_host:
            return Placement("kv-host", layers, kv_on_spill=True)
        return Placement("device", layers) if workload.placement_given else None
    count = deployment.gpu_layers
    return Placement(
        "split", max(0, min(layers, count - 1)), kv_on_spill=deployment.kv_on_host, head_on_model=count >= 1
    )


@dataclass
class Simulation:
    """The prediction and what it rests on (to_json gives the machine-readable contract)."""

    profile: str
    workload: str
    runtime: str
    context: int
    prompt_tokens: int
    decode_tokens: int
    placement: Placement
    tier_bytes: dict[str, int]
    fits: bool
    oom_context: int | None
    ttft_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    latency_positions: list[int]
    per_token_latency_s: list[float]
    decode_epoch: dict[str, float]  # bytes per tier and FLOPs of the last decode step
    efficiency: dict[str, dict[str, object]]
    notes: list[str] = field(default_factory=list)
    alternatives: dict[str, float | None] = field(
        default_factory=dict
    )  # placement -> decode tok/s (None: no fit)
    # placement -> one decode step's seconds at latency_positions (None: no fit); the chosen one included
    latency_by_placement: dict[str, list[float] | None] = field(default_factory=dict)

    def to_json(self, layers: int) -> dict[str, object]:
        return {
            "profile": self.profile,
            "artifact": self.workload,
            "runtime": self.runtime,
            "context": self.context,
            "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "ttft_s": self.ttft_s,
            "placement": {
                "name": self.placement.name,
                "label": self.placement.label(layers),
                "gpu_layers": self.placement.gpu_layers,
                "layers": layers,
                "kv_cache_tier": self._kv_tier(),
                "tier_bytes": self.tier_bytes,
            },
            "fits": self.fits,
            "oom_context": self.oom_context,
            "latency_positions": self.latency_positions,
            "per_token_latency_s": self.per_token_latency_s,
            "decode_epoch": self.decode_epoch,
            "efficiency": self.efficiency,
            "alternatives": self.alternatives,
            "latency_by_placement": self.latency_by_placement,
            "notes": self.notes,
        }

    def _kv_tier(self) -> str:
        tiers = list(self.tier_bytes)
        if self.placement.kv_on_spill and len(tiers) > 1:
            return tiers[1]
        return tiers[0]


# ---------------------------------------------------------------------------------------------
# Target


def _tier_spec(tier: MemoryTier, usable: int) -> TierSpec:
    base = tier.effective_bandwidth_bytes_per_s
    read = tier.read_bandwidth_gbs.value * GB if tier.read_bandwidth_gbs else base
    write = tier.write_bandwidth_gbs.value * GB if tier.write_bandwidth_gbs else base
    if read <= 0 or write <= 0:
        raise BedsideError(
            f"memory tier {tier.name!r} has no bandwidth (0 GB/s): the simulator cannot use it"
        )
    return TierSpec(tier.name, tier.kind, usable, read, write)


def make_target(
    profile: DeviceProfile,
    runtime: str,
    threads: int | None = None,
    record: dict | None = None,
    scheme: str | None = None,
) -> Target:
    """The profile as the epoch model sees it; `threads` scales a CPU's peak (default: all its cores)."""
    record = read_calibration() if record is None else record
    notes: list[str] = []
    compute = profile.compute
    model = profile.model_memory_tier
    model_tier = _tier_spec(model, available_bytes(profile))
    cores = max(1.0, compute.cores.value)
    cpu_eff = efficiency_for(runtime, "cpu", record, scheme)
    if compute.accelerator == "cpu":
        share = min(cores, threads or cores) / cores
        flops_share, int8_share, isa_note = runtime_peak_share(runtime, compute.cpu_features or [])
        if isa_note:
            notes.append(isa_note)
        cpu = Processor(
            "cpu",
            compute.fp16_tflops.value * 1e12 * share * flops_share,
            compute.int8_tops.value * 1e12 * share * int8_share,
            cpu_eff,
        )
        main = cpu
    else:
        main = Processor(
            "cuda",
            compute.fp16_tflops.value * 1e12,
            compute.int8_tops.value * 1e12,
            efficiency_for(runtime, "cuda", record, scheme),
        )
        if compute.cpu_tflops is not None:
            cpu_flops = compute.cpu_tflops.value * 1e12
        else:
            cpu_flops = ASSUMED_CPU_TFLOPS * 1e12
            notes.append(
                f"host CPU peak assumed {ASSUMED_CPU_TFLOPS} TFLOPS (profile has no compute.cpu_tflops)"
            )
        cpu = Processor("cpu", cpu_flops, 2 * cpu_flops, cpu_eff)
    spill = None
    link_bw: float | None = None
    link_latency = 0.0
    discrete = compute.accelerator == "cuda" and model.kind == "device"
    if discrete:
        linked = []
        for link in profile.links:
            if model.name in link.between:
                other = link.between[0] if link.between[1] == model.name else link.between[1]
                tier = next(t for t in profile.memory_tiers if t.name == other)
                linked.append((tier.effective_bandwidth_bytes_per_s, tier, link))
        if linked:
            _, tier, link = max(linked, key=lambda item: item[0])
            usable = int(tier.capacity_bytes * (1 - profile.headroom_pct.value / 100))
            spill = _tier_spec(tier, usable)
            link_bw = link.bandwidth_gbs.value * GB
            link_latency = link.latency_ns.value * 1e-9
            notes.append(
                f"spill tier {tier.name}: no reserve known for it; usable = capacity x (1 - headroom)"
            )
        else:
            notes.append("no link from the model tier to another tier: only the device placement is possible")
    return Target(profile.name, model_tier, spill, link_bw, link_latency, main, cpu, discrete, tuple(notes))


# ---------------------------------------------------------------------------------------------
# Memory per placement


def tier_bytes(
    workload: Workload, profile: DeviceProfile, target: Target, placement: Placement, context: int
) -> dict[str, int]:
    """Bytes on each tier at `context` (estimate_memory's all-on-device total, moved terms to the spill tier)."""
    on_device = dataclasses.replace(workload.deployment, kv_on_host=False, gpu_layers=None)  # placement below
    estimate = estimate_memory(
        workload.facts, on_device, profile, context=context, text_tensors=list(workload.tensors)
    )
    layers = workload.num_layers
    kv_total = estimate.kv_cache_bytes
    moved = 0
    if placement.name == "split":
        off = range(placement.gpu_layers, layers)
        moved += sum(workload.layer_bytes[i] for i in off) + kv_total * len(off) // max(1, layers)
        if not placement.head_on_model:
            moved += workload.head_bytes if any(t.role == "output" for t in workload.tensors) else 0
        if placement.kv_on_spill:
            moved += kv_total - kv_total * len(off) // max(1, layers)
    elif placement.kv_on_spill:
        moved += kv_total
    host_only = sum(v for k, v in estimate.detail.items() if k.startswith("host_only."))
    result = {target.model_tier.name: estimate.total_bytes - moved}
    if target.spill_tier is not None:
        result[target.spill_tier.name] = moved + host_only
    return result


def fits(bytes_by_tier: dict[str, int], target: Target) -> bool:
    ok = bytes_by_tier[target.model_tier.name] <= target.model_tier.usable_bytes
    if target.spill_tier is not None:
        ok = ok and bytes_by_tier.get(target.spill_tier.name, 0) <= target.spill_tier.usable_bytes
    return ok


def first_oom_context(
    workload: Workload, profile: DeviceProfile, target: Target, placement: Placement, limit: int
) -> int | None:
    """The smallest context in 1..limit that does not fit (memory grows with context), None when limit fits."""
    if fits(tier_bytes(workload, profile, target, placement, limit), target):
        return None
    low, high = 0, limit  # low fits (0 = nothing cached), high does not
    while high - low > 1:
        middle = (low + high) // 2
        if fits(tier_bytes(workload, profile, target, placement, middle), target):
            low = middle
        else:
            high = middle
    return high


# ---------------------------------------------------------------------------------------------
# The epoch model


@dataclass
class Segment:
    """One roofline term: bytes and FLOPs handled by one processor against one tier."""

    processor: Processor
    tier: TierSpec
    read_bytes: float = 0.0
    written_bytes: float = 0.0
    int_flops: float = 0.0
    float_flops: float = 0.0

    def memory_units(self) -> float:
        """Seconds at efficiency 1."""
        return self.read_bytes / self.tier.read_bytes_per_s + self.written_bytes / self.tier.write_bytes_per_s

    def compute_units(self) -> float:
        return self.int_flops / self.processor.int_ops + self.float_flops / self.processor.float_flops

    def seconds(self) -> float:
        e = self.processor.efficiency
        return max(self.memory_units() / e.bandwidth, self.compute_units() / e.compute)


@dataclass
class Epoch:
    segments: list[Segment]
    link_seconds: float
    overhead_s: float

    def seconds(self) -> float:
        return sum(s.seconds() for s in self.segments) + self.link_seconds + self.overhead_s


def epoch(
    workload: Workload, target: Target, placement: Placement, cached: int, tokens: int, head_rows: int
) -> Epoch:
    """One forward step of `tokens` tokens with `cached` tokens in the KV cache."""
    facts = workload.facts
    layers = workload.num_layers
    spill = target.spill_tier or target.model_tier
    kv_token = workload.kv_bytes_per_token_layer()
    attention_flops = 4.0 * tokens * (cached + (tokens + 1) / 2) * facts.num_heads * facts.head_dim
    matmul_flops = 2.0 * tokens * workload.layer_matmul_params
    activations = 2.0 * tokens * facts.hidden_size * F32
    segments: list[Segment] = []
    link_bytes = 0.0
    crossings = 0
    for index in range(layers):
        on_model = placement.name != "split" or index < placement.gpu_layers
        processor = target.main if on_model else target.cpu
        tier = target.model_tier if on_model else spill
        layer = Segment(processor, tier, read_bytes=workload.layer_bytes[index] + activations / 2,
                        written_bytes=activations / 2)  # fmt: skip
        if workload.quantized:
            layer.int_flops += matmul_flops
        else:
            layer.float_flops += matmul_flops
        kv_read, kv_written = kv_token * (cached + tokens), kv_token * tokens
        if workload.kv_copied_per_call:  # Concat(past, new) -> present: the past read and written once more
            kv_read, kv_written = kv_read + kv_token * cached, kv_written + kv_token * cached
        if placement.kv_on_spill and on_model:
            segments.append(Segment(target.cpu, spill, kv_read, kv_written, float_flops=attention_flops))
            qkv = tokens * (facts.num_heads + 2 * facts.num_kv_heads) * facts.head_dim * F32
            link_bytes += qkv + tokens * facts.num_heads * facts.head_dim * F32
            crossings += 2
        else:
            layer.read_bytes += kv_read
            layer.written_bytes += kv_written
            layer.float_flops += attention_flops
        segments.append(layer)
    head_on_model = placement.name != "split" or placement.gpu_layers >= layers or placement.head_on_model
    head = Segment(
        target.main if head_on_model else target.cpu,
        target.model_tier if head_on_model else spill,
        read_bytes=workload.head_bytes + workload.other_bytes + tokens * workload.embedding_row_bytes,
        written_bytes=head_rows * facts.vocab_size * F32,
    )
    head_flops = 2.0 * head_rows * workload.head_params
    if workload.quantized:
        head.int_flops += head_flops
    else:
        head.float_flops += head_flops
    segments.append(head)
    if target.discrete and target.link_bytes_per_s:
        hidden_state = tokens * facts.hidden_size * F32
        if placement.name == "split" and 0 < placement.gpu_layers < layers:
            link_bytes += 2 * hidden_state  # embeddings in, the boundary's hidden state out
            crossings += 2
        elif placement.name != "split" or placement.gpu_layers >= layers:
            link_bytes += hidden_state + head_rows * facts.vocab_size * F32  # embeddings in, logits out
            crossings += 2
    link_seconds = (
        link_bytes / target.link_bytes_per_s + crossings * target.link_latency_s
        if target.link_bytes_per_s
        else 0.0
    )
    return Epoch(segments, link_seconds, target.main.efficiency.step_overhead_s)


def prefill_epochs(workload: Workload, prompt: int, start: int = 0) -> list[tuple[int, int, int]]:
    """(cached, tokens, head rows) of each call that prefills `prompt` tokens after `start` cached ones."""
    calls = []
    cached = start
    while cached < start + prompt:
        tokens = min(workload.prefill_chunk, start + prompt - cached)
        calls.append((cached, tokens, tokens if workload.head_rows_all else 1))
        cached += tokens
    return calls


def decode_epochs(prompt: int, decode_tokens: int) -> list[tuple[int, int, int]]:
    return [(prompt + step, 1, 1) for step in range(decode_tokens)]


# ---------------------------------------------------------------------------------------------
# Simulation


def parse_placement(name: str, layers: int) -> Placement | None:
    """'device', 'kv-host', 'split' (None layers: largest that fits), 'split:N'; None for 'auto'."""
    text = name.strip().lower()
    if text == "auto":
        return None
    if text == "device":
        return Placement("device", layers)
    if text == "kv-host":
        return Placement("kv-host", layers, kv_on_spill=True)
    if text == "split":
        return Placement("split", -1)
    if text.startswith("split:"):
        count = text.split(":", 1)[1]
        if count.isdigit() and 0 <= int(count) <= layers:
            return Placement("split", int(count))
        raise BedsideError(f"placement {name!r}: N must be a layer count 0..{layers} (split:N)")
    raise BedsideError(f"unknown placement {name!r} (choose one of: {', '.join(PLACEMENTS)})")


def _split_that_fits(
    workload: Workload, profile: DeviceProfile, target: Target, context: int
) -> Placement | None:
    for count in range(workload.num_layers, -1, -1):
        placement = Placement("split", count)
        if fits(tier_bytes(workload, profile, target, placement, context), target):
            return placement
    return None


def _decode_rate(
    workload: Workload, target: Target, placement: Placement, prompt: int, decode_tokens: int
) -> float:
    """Decode tokens/s over `decode_tokens` steps after a prompt of `prompt` tokens: the one formula behind
    Simulation.decode_tokens_per_s, its alternatives and predict_decode_tokens_per_s (the planner's figure).

    A step's time is linear in its cached position (the KV cache's bytes and FLOPs grow by one token per step;
    a segment's max() of memory and compute time bends at most once), so the sum over the steps is the
    trapezoid of the first and the last: decode_tokens * (t(first) + t(last)) / 2, exact on a straight run and
    above the sum by less than one step's change at a bend. Two epochs instead of one per step keep the planner,
    which scores every candidate with it, fast."""
    steps = decode_epochs(prompt, decode_tokens)
    first, last = (epoch(workload, target, placement, *steps[i]).seconds() for i in (0, -1))
    return 2.0 / (first + last)  # decode_tokens / (decode_tokens * (first + last) / 2)


def latency_positions(context: int) -> list[int]:
    """LATENCY_POINTS positions spread over 0..context-1 (fewer for a short context)."""
    count = min(LATENCY_POINTS, context)
    return sorted({round(i * (context - 1) / max(1, count - 1)) for i in range(count)})


def predict_decode_tokens_per_s(
    workload: Workload,
    profile: DeviceProfile,
    context: int,
    threads: int | None = None,
    decode_tokens: int = DECODE_TOKENS,
    record: dict | None = None,
) -> float:
    """Decode tokens/s of the workload's own placement (a plan's candidate: planned_placement, else all on the
    device) at `context`: the figure `simulate(workload, profile, context)` reports for a plan, without the
    memory search, prefill and latency series (the planner scores hundreds of candidates with it). Decodes
    min(decode_tokens, context - 1) steps, so a context too short for the default still has a figure."""
    target = make_target(profile, workload.runtime, threads, record, workload.quant)
    placement = planned_placement(workload) or Placement("device", workload.num_layers)
    if placement.name != "device" and target.spill_tier is None:
        placement = Placement("device", workload.num_layers)
    steps = max(1, min(decode_tokens, context - 1))
    return _decode_rate(workload, target, placement, max(0, context - steps), steps)


def simulate(
    workload: Workload,
    profile: DeviceProfile,
    context: int | None = None,
    placement: str = "auto",
    threads: int | None = None,
    decode_tokens: int = DECODE_TOKENS,
    record: dict | None = None,
) -> Simulation:
    """Predict the speed of `workload` on `profile` at `context` tokens (see the module docstring)."""
    ctx = context if context is not None else profile.context_length
    layers = workload.num_layers
    if ctx <= 0:
        raise BedsideError(f"--context must be a positive number of tokens, got {ctx}")
    if ctx > workload.max_context:
        raise BedsideError(
            f"context {ctx} is beyond the model's maximum of {workload.max_context} tokens (max_position_embeddings)"
        )
    if not 0 < decode_tokens < ctx:
        raise BedsideError(f"decode tokens must be in 1..{ctx - 1} at context {ctx}, got {decode_tokens}")
    target = make_target(profile, workload.runtime, threads, record, workload.quant)
    wanted = parse_placement(placement, layers)
    planned = planned_placement(workload) if wanted is None else None
    if planned is not None and target.spill_tier is not None:
        wanted = planned
    if wanted is not None and wanted.name != "device" and target.spill_tier is None:
        raise BedsideError(
            f"placement {placement!r} needs a second memory tier linked to the model tier; profile "
            f"{profile.name!r} has only {target.model_tier.name!r} for the model"
        )
    prompt = ctx - decode_tokens

    candidates: list[Placement] = []
    if wanted is None or wanted.name == "device":
        candidates.append(Placement("device", layers))
    if target.spill_tier is not None and (wanted is None or wanted.name != "device"):
        if wanted is None or wanted.name == "kv-host":
            candidates.append(Placement("kv-host", layers, kv_on_spill=True))
        if wanted is None or wanted.name == "split":
            if wanted is not None and wanted.gpu_layers >= 0:
                candidates.append(wanted)
            else:
                found = _split_that_fits(workload, profile, target, ctx) or _split_that_fits(
                    workload, profile, target, 1
                )
                if found is not None and (wanted is not None or found.gpu_layers < layers):
                    candidates.append(found)  # auto: split:all is the device placement, already a candidate
                elif found is None and wanted is not None:
                    candidates.append(Placement("split", 0))

    positions = latency_positions(ctx)
    alternatives: dict[str, float | None] = {}
    series: dict[str, list[float] | None] = {}
    scored: list[tuple[bool, int, float, Placement]] = []
    for option in candidates:
        oom = first_oom_context(workload, profile, target, option, ctx)
        usable = oom is None or oom > 1
        rate = _decode_rate(workload, target, option, prompt, decode_tokens) if usable else None
        alternatives[option.label(layers)] = None if rate is None else round(rate, 3)
        series[option.label(layers)] = (
            [epoch(workload, target, option, position, 1, 1).seconds() for position in positions]
            if usable
            else None
        )
        if usable:
            scored.append((oom is None, oom or ctx, rate or 0.0, option))
    if not scored:
        names = ", ".join(option.label(layers) for option in candidates)
        nbytes = tier_bytes(workload, profile, target, candidates[0], 1)
        shown = ", ".join(f"{tier} {value / GIB:.2f} GiB" for tier, value in nbytes.items())
        raise BedsideError(
            f"{workload.label} fits no tier of profile {profile.name!r} ({names}; needs {shown} at 1 token, "
            f"{target.model_tier.name} has {target.model_tier.usable_bytes / GIB:.2f} GiB usable)"
        )
    # fits the whole context first, then the longest context, then the fastest decode
    scored.sort(key=lambda item: (item[0], item[1], item[2]), reverse=True)
    whole, _, _, chosen = scored[0]
    oom = None if whole else first_oom_context(workload, profile, target, chosen, ctx)

    prefill_seconds = sum(
        epoch(workload, target, chosen, *call).seconds() for call in prefill_epochs(workload, prompt)
    )
    latencies = series[chosen.label(layers)] or []
    last = epoch(workload, target, chosen, ctx - 1, 1, 1)
    epoch_detail: dict[str, float] = {}
    for segment in last.segments:
        key = f"bytes_read.{segment.tier.name}"
        epoch_detail[key] = epoch_detail.get(key, 0.0) + segment.read_bytes
        key = f"bytes_written.{segment.tier.name}"
        epoch_detail[key] = epoch_detail.get(key, 0.0) + segment.written_bytes
        epoch_detail[f"flops.{segment.processor.name}"] = (
            epoch_detail.get(f"flops.{segment.processor.name}", 0.0) + segment.int_flops + segment.float_flops
        )
    epoch_detail["link_s"] = last.link_seconds
    epoch_detail["overhead_s"] = last.overhead_s
    epoch_detail["seconds"] = last.seconds()
    efficiency = {
        processor.name: {
            "bandwidth": processor.efficiency.bandwidth,
            "compute": processor.efficiency.compute,
            "step_overhead_s": processor.efficiency.step_overhead_s,
            "source": processor.efficiency.source,
        }
        for processor in (target.main, target.cpu)
    }
    notes = list(target.notes)
    if oom is not None:
        notes.append(
            f"memory runs out at {oom} tokens of context; speeds beyond it are what the step would take"
        )
    return Simulation(
        profile=profile.name,
        workload=workload.label,
        runtime=workload.runtime,
        context=ctx,
        prompt_tokens=prompt,
        decode_tokens=decode_tokens,
        placement=chosen,
        tier_bytes=tier_bytes(workload, profile, target, chosen, ctx),
        fits=oom is None,
        oom_context=oom,
        ttft_s=prefill_seconds,
        prefill_tokens_per_s=prompt / prefill_seconds if prefill_seconds > 0 else math.inf,
        decode_tokens_per_s=_decode_rate(workload, target, chosen, prompt, decode_tokens),
        latency_positions=positions,
        per_token_latency_s=latencies,
        decode_epoch=epoch_detail,
        efficiency=efficiency,
        notes=notes,
        alternatives=alternatives,
        latency_by_placement=series,
    )


# ---------------------------------------------------------------------------------------------
# Step by step (bedside emulate)


@dataclass(frozen=True)
class TargetClock:
    """Seconds of each forward step of one placement on the target: what `bedside emulate` makes the host wait
    for (CXLMemSim's delay injection), step by step as the chat runs instead of over a fixed prompt."""

    workload: Workload
    target: Target
    placement: Placement

    def prefill_seconds(self, tokens: int, cached: int = 0) -> float:
        """A prompt of `tokens` tokens after `cached` ones, in the runtime's prefill chunks (time to first token)."""
        return sum(
            epoch(self.workload, self.target, self.placement, *call).seconds()
            for call in prefill_epochs(self.workload, tokens, cached)
        )

    def decode_seconds(self, cached: int) -> float:
        """One decoded token with `cached` tokens in the KV cache."""
        return epoch(self.workload, self.target, self.placement, cached, 1, 1).seconds()


def target_clock(
    workload: Workload,
    profile: DeviceProfile,
    context: int | None = None,
    placement: str = "auto",
    threads: int | None = None,
    record: dict | None = None,
) -> tuple[TargetClock, Simulation]:
    """The clock of the placement `simulate` chooses at `context` (the same input checks), and that simulation."""
    record = read_calibration() if record is None else record
    result = simulate(workload, profile, context, placement, threads, record=record)
    target = make_target(profile, workload.runtime, threads, record, workload.quant)
    return TargetClock(workload, target, result.placement), result
