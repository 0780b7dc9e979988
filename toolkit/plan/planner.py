"""The planner: enumerate deployments of a model on a device, keep those that fit, choose the best.

Search space: format (the profile's, or the pinned one) x quantization scheme (the profile's schemes of that
format) x decoder layers removed (0 .. num_layers // 2, or the pinned count) x vision dtype (f16, q8_0 for a
LLaVA-style model). For each candidate:

  memory      estimate_memory (toolkit.plan.memory): total bytes in the profile's model tier
  fits        total <= available = (tier capacity - reserved_gib) * (1 - headroom_pct / 100)
  speed       decode tokens/s <= bandwidth(model tier; sustained when the profile gives it, else peak)
              * DECODE_BANDWIDTH_EFFICIENCY / bytes read per token
              (toolkit.plan.memory.decode_bytes_per_token: weights + KV cache at the full context)
  passes      fits and speed >= profile.min_decode_tokens_per_s
  quality     predicted perplexity increase (toolkit.plan.quality_priors.predict_quality)

Choice among passing candidates:
  * priors only (no measured per-layer sensitivities): fewest layers removed first (lower precision is preferred
    before removing layers: depth priors are coarse), then the lowest predicted loss, then the smallest total;
  * measured per-layer sensitivities given: the lowest predicted loss, then the smallest total.
Losses within QUALITY_TIE_PCT of the best are ties (below the resolution of the published perplexity tables:
the Llama-3-8B scoreboard's ΔPPL standard errors are ~0.001-0.002 on 6.23, i.e. ~0.02-0.03 %), and the smaller
candidate wins a tie. The profile's quality floor is reported, not enforced: predictions are priors until the
validate stage measures the real loss.
"""

from dataclasses import dataclass

from toolkit.core.errors import BedsideError
from toolkit.core.formats import FORMATS, format_of_scheme, resolve_scheme
from toolkit.core.units import GIB
from toolkit.model.facts import ModelFacts
from toolkit.model.storage_types import VISION_DTYPES
from toolkit.plan.memory import (
    Deployment,
    RuntimeSettings,
    decode_bytes_per_token,
    estimate_memory,
    memory_budget,
    model_tier,
    runtime_for,
    text_weights,
)
from toolkit.plan.quality_priors import QualityPrediction, Sensitivities, predict_quality
from toolkit.plan.schema import Candidate, MemoryEstimate, Plan
from toolkit.target.profiles import DeviceProfile

# Roofline: decode reads every weight once per token at the tier's peak bandwidth. 1.0 makes the estimate an
# upper bound, so the minimum-speed filter only rejects candidates that cannot reach it at all; the simulator
# issue replaces this with measured efficiency.
DECODE_BANDWIDTH_EFFICIENCY = 1.0
QUALITY_TIE_PCT = 0.05


@dataclass
class _Scored:
    candidate: Candidate
    quality: QualityPrediction
    passes: bool


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _describe(candidate: Candidate, num_layers: int) -> str:
    vision = f", vision {candidate.vision_dtype}" if candidate.vision_dtype else ""
    return f"{candidate.format} {candidate.quant}, {candidate.layers_removed} of {num_layers} layers removed{vision}"


def _validate_pins(
    facts: ModelFacts,
    profile: DeviceProfile,
    format_name: str | None,
    quant: str | None,
    prune_layers: int | None,
    context: int | None,
) -> list[tuple[str, list[str]]]:
    """Check the pinned options and return the (format, schemes) pairs to search."""
    if format_name is not None:
        if format_name not in FORMATS:
            raise BedsideError(f"unknown format '{format_name}'; known: {', '.join(FORMATS)}")
        if format_name not in profile.formats:
            raise BedsideError(
                f"profile '{profile.name}' does not run format '{format_name}'; it runs: {', '.join(profile.formats)}"
            )
    if quant is not None:
        owner = format_of_scheme(quant)
        if owner is not None:
            quant = resolve_scheme(owner, quant)[1]  # canonical spelling: int4 -> int4_b32, q4_k_m -> Q4_K_M
        owners = [f for f, schemes in FORMATS.items() if quant in schemes]
        if not owners:
            known = ", ".join(f"{f}: {', '.join(s)}" for f, s in FORMATS.items())
            raise BedsideError(f"unknown quantization scheme '{quant}'; known: {known}")
        if format_name is not None and format_name not in owners:
            raise BedsideError(
                f"scheme '{quant}' is not a {format_name} scheme; {format_name} has: {', '.join(FORMATS[format_name])}"
            )
        if quant not in profile.quant_schemes:
            raise BedsideError(
                f"profile '{profile.name}' does not allow scheme '{quant}'; it allows: {', '.join(profile.quant_schemes)}"
            )
        if format_name is None:
            allowed = [f for f in owners if f in profile.formats]
            if not allowed:
                raise BedsideError(
                    f"scheme '{quant}' belongs to {owners[0]}, which profile '{profile.name}' does not run"
                )
            format_name = allowed[0]
    if prune_layers is not None and not 0 <= prune_layers < facts.num_layers:
        raise BedsideError(
            f"--prune-layers must be between 0 and {facts.num_layers - 1} (the model has {facts.num_layers} "
            f"decoder layers), got {prune_layers}"
        )
    if context is not None and context <= 0:
        raise BedsideError(f"--context must be a positive number of tokens, got {context}")

    formats = [format_name] if format_name else [f for f in profile.formats if f in FORMATS]
    pairs = []
    for f in formats:
        schemes = [quant] if quant else [s for s in FORMATS[f] if s in profile.quant_schemes]
        if schemes:
            pairs.append((f, schemes))
    if not pairs:
        raise BedsideError(f"profile '{profile.name}' allows no quantization scheme of its formats")
    return pairs


def make_plan(
    facts: ModelFacts,
    profile: DeviceProfile,
    model_name: str,
    format: str | None = None,  # noqa: A002 - the CLI option's name
    quant: str | None = None,
    prune_layers: int | None = None,
    context: int | None = None,
    sensitivities: Sensitivities | None = None,
    settings: RuntimeSettings | None = None,
) -> Plan:
    """Enumerate, estimate and choose (see the module docstring for the rules). Never raises for "no fit":
    the Plan then has fits=False, chosen=None and a reason with the smallest candidate's size against the budget.
    """
    pairs = _validate_pins(facts, profile, format, quant, prune_layers, context)
    ctx = context or profile.context_length
    budget = memory_budget(profile)
    tier = model_tier(profile)
    bandwidth = tier.effective_bandwidth_bytes_per_s * DECODE_BANDWIDTH_EFFICIENCY
    min_speed = profile.min_decode_tokens_per_s.value
    depths = [prune_layers] if prune_layers is not None else list(range(facts.num_layers // 2 + 1))
    vision_dtypes: tuple[str | None, ...] = VISION_DTYPES if facts.vision is not None else (None,)
    by_layers = sensitivities is not None and sensitivities.has_layer_data

    scored: list[_Scored] = []
    for format_name, schemes in pairs:
        runtime = runtime_for(format_name, profile)
        for scheme in schemes:
            for k in depths:
                tensors = text_weights(facts, Deployment(format_name, scheme, k))
                for vision_dtype in vision_dtypes:
                    deployment = Deployment(format_name, scheme, k, vision_dtype, runtime, ctx)
                    memory = estimate_memory(facts, deployment, profile, settings, text_tensors=tensors)
                    quality = predict_quality(facts, scheme, k, sensitivities, vision_dtype)
                    speed = bandwidth / decode_bytes_per_token(facts, deployment, profile, tensors)
                    fits = memory.total_bytes <= budget
                    reasons = []
                    if not fits:
                        reasons.append(f"needs {_gib(memory.total_bytes)}, over the {_gib(budget)} budget")
                    if speed < min_speed:
                        reasons.append(
                            f"decodes at most {speed:.1f} tok/s, below the {min_speed:g} tok/s minimum"
                        )
                    candidate = Candidate(
                        format=format_name,
                        quant=scheme,
                        runtime=runtime,
                        layers_removed=k,
                        layers=quality.layers,
                        vision_dtype=vision_dtype,
                        memory=memory,
                        fits=fits,
                        predicted_quality_loss=round(quality.total_pct, 4),
                        predicted_decode_tokens_per_s=round(speed, 2),
                        reason="; ".join(reasons),
                    )
                    scored.append(_Scored(candidate, quality, fits and speed >= min_speed))

    passing = [s for s in scored if s.passes]
    chosen = _choose(passing, by_layers)
    ordered = _order(scored, chosen, by_layers)
    fp16_bytes = facts.total_params * 2
    plan = Plan(
        model=model_name,
        profile=profile.name,
        context_length=ctx,
        budget_bytes=budget,
        fp16_bytes=fp16_bytes,
        fits=chosen is not None,
        chosen=chosen.candidate if chosen else None,
        candidates=[s.candidate for s in ordered],
        reason="",
    )
    plan.reason = (
        _chosen_reason(facts, profile, plan, chosen, by_layers)
        if chosen
        else _nothing_fits_reason(facts, profile, scored, budget, min_speed)
    )
    return plan


def _choose(passing: list[_Scored], by_layers: bool) -> _Scored | None:
    """Fewest layers removed (priors only), then loss within QUALITY_TIE_PCT of the best, then smallest total."""
    if not passing:
        return None
    pool = passing
    if not by_layers:
        fewest = min(s.candidate.layers_removed for s in pool)
        pool = [s for s in pool if s.candidate.layers_removed == fewest]
    best = min(s.quality.total_pct for s in pool)
    ties = [s for s in pool if s.quality.total_pct <= best + QUALITY_TIE_PCT]
    return min(ties, key=lambda s: (s.candidate.memory.total_bytes, s.quality.total_pct))


def _order(scored: list[_Scored], chosen: _Scored | None, by_layers: bool) -> list[_Scored]:
    """Chosen first, then passing candidates by the choice rule, then the rest by size."""

    def key(s: _Scored) -> tuple:
        layers = 0 if by_layers else s.candidate.layers_removed
        return (not s.passes, layers, round(s.quality.total_pct, 6), s.candidate.memory.total_bytes)

    rest = sorted((s for s in scored if s is not chosen), key=key)
    return ([chosen] if chosen else []) + rest


def _memory_line(memory: MemoryEstimate) -> str:
    return (
        f"weights {_gib(memory.weights_bytes)}, KV cache {_gib(memory.kv_cache_bytes)}, "
        f"vision {_gib(memory.vision_bytes)}, overhead {_gib(memory.overhead_bytes)}"
    )


def _budget_line(profile: DeviceProfile, budget: int) -> str:
    tier = model_tier(profile)
    return (
        f"{_gib(budget)} budget ({tier.capacity_gib.value:g} GiB {tier.name} - {profile.reserved_gib.value:g} GiB "
        f"reserved, {profile.headroom_pct.value:g} % headroom)"
    )


def _chosen_reason(
    facts: ModelFacts, profile: DeviceProfile, plan: Plan, chosen: _Scored, by_layers: bool
) -> str:
    c = chosen.candidate
    q = chosen.quality
    saving = 1 - (c.memory.weights_bytes + _host_weights(c.memory) + c.memory.vision_bytes) / plan.fp16_bytes
    rule = (
        "lowest predicted loss using measured layer sensitivities"
        if by_layers
        else "fewest layers removed that fit (lower precision before depth pruning), then lowest predicted loss"
    )
    floor = profile.quality_floor.max_perplexity_increase_pct.value
    floor_note = (
        f"; above the profile's {floor:g} % perplexity floor by prediction: validate must confirm with measurements"
        if q.total_pct > floor
        else ""
    )
    return (
        f"chose {_describe(c, facts.num_layers)} on {c.runtime}: {_gib(c.memory.total_bytes)} of the "
        f"{_budget_line(profile, plan.budget_bytes)}; {_memory_line(c.memory)}; weights+vision {saving:.0%} "
        f"below fp16; predicted +{q.total_pct:.2f} % perplexity (quantization +{q.quant_pct:.2f} % {q.quant_source}, "
        f"depth +{q.depth_pct:.2f} % {q.depth_source}); up to {c.predicted_decode_tokens_per_s:g} tok/s; rule: {rule}"
        f"{floor_note}"
    )


def _host_weights(memory: MemoryEstimate) -> int:
    """Weights llama.cpp keeps on the host (the input embedding on a discrete GPU)."""
    return sum(v for k, v in memory.detail.items() if k.startswith("host_only.weights."))


def _nothing_fits_reason(
    facts: ModelFacts, profile: DeviceProfile, scored: list[_Scored], budget: int, min_speed: float
) -> str:
    smallest = min(scored, key=lambda s: s.candidate.memory.total_bytes).candidate
    fitting = [s for s in scored if s.candidate.fits]
    if fitting:
        fastest = max(fitting, key=lambda s: s.candidate.predicted_decode_tokens_per_s or 0.0).candidate
        return (
            f"nothing passes on '{profile.name}': {len(fitting)} candidates fit in memory, but the fastest "
            f"({_describe(fastest, facts.num_layers)}) decodes at most {fastest.predicted_decode_tokens_per_s:g} "
            f"tok/s, below the profile's minimum of {min_speed:g} tok/s"
        )
    return (
        f"nothing fits on '{profile.name}': the smallest candidate ({_describe(smallest, facts.num_layers)}) needs "
        f"{_gib(smallest.memory.total_bytes)} ({_memory_line(smallest.memory)}) but the {_budget_line(profile, budget)} "
        f"is {_gib(smallest.memory.total_bytes - budget)} short"
    )
