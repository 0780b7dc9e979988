"""The planner: enumerate deployments of a model on a device, keep those that fit, choose the best.

Search space: format (the profile's, or the pinned one) x quantization scheme (the profile's schemes of that
format) x decoder layers removed (0 .. num_layers // 2, or the pinned count) x vision dtype (for a LLaVA-style model,
what the format's exporter writes: GGUF f16 or q8_0, ONNX its graph's float; toolkit.core.formats) x KV-cache precision (llama.cpp: the profile's kv_cache_dtypes, e.g. f16, q8_0, q4_0, or the
pinned one; ONNX Runtime keeps its graph's float KV cache, one choice) x placement. Placement is searched for
llama.cpp on a discrete GPU with host memory linked to it (toolkit.plan.memory.host_tier), and only for a
combination whose all-on-GPU candidate does not fit: the KV cache in host memory (offload_kqv = false) and the
largest n_gpu_layers that fits the GPU (llama.cpp users' manual search, here a bisection). For each candidate:

  memory      estimate_memory (toolkit.plan.memory): total bytes in the profile's model tier, and host_bytes
  fits        total <= available = (tier capacity - reserved_gib) * (1 - headroom_pct / 100), and host_bytes <=
              the host tier's capacity * (1 - headroom_pct / 100) (toolkit.plan.memory.host_budget)
  bound       decode tokens/s <= 1 / sum over tiers of bytes read there per token / the tier's bandwidth
              (sustained when the profile gives it, else peak; toolkit.plan.memory.decode_bytes_by_tier: weights +
              KV cache at the full context, at the KV precision, each from the tier the placement puts it in)
  predicted   the simulator's decode tokens/s on the profile at the plan's context, with the candidate's
              placement and KV precision (toolkit.plan.simulator.predict_decode_tokens_per_s; the figure
              `bedside simulate --plan plan.json` prints for the chosen candidate); it ranks host placements
  passes      fits and predicted >= profile.min_decode_tokens_per_s (the bound is recorded beside it and named in
              the reason of a candidate below the floor). The CPU efficiencies are fitted relative to the
              peak of the instruction set each runtime uses (toolkit.target.host.runtime_peak_share), so they
              transfer to other CPU profiles; GPU efficiencies are assumptions (docs/SIMULATOR.md, "The planner's
              speed floor")
  quality     predicted perplexity increase (toolkit.plan.quality_priors.predict_quality; the KV precision is
              one more factor)

Choice among passing candidates: the lowest predicted loss, so depth and bits are weighed on one scale (the
perplexity ratio of each term, measured where the compression stage measured it, else its prior; priors and
their sources in docs/PRIORS.md; `healed` picks the healed or one-shot depth curve). Losses within QUALITY_TIE_PCT of the best are ties (below the resolution of the published perplexity tables:
the Llama-3-8B scoreboard's ΔPPL standard errors are ~0.001-0.002 on 6.23, i.e. ~0.02-0.03 %). A tie goes to
everything on the GPU before a host placement. All on the GPU, the more precise KV cache wins (f16 before q8_0
before q4_0: quantizing the cache is a memory lever, used when it buys a better scheme or depth), then the
smaller total; so f16 KV is chosen whenever a candidate with it is within the tie of the best, and q8_0 / q4_0
when only they fit a better candidate. Among host placements the faster predicted decode wins (speed is what a
placement costs), then the more precise KV cache. The profile's quality floor is reported, not enforced:
predictions are priors until the validate stage measures the real loss.
"""

import dataclasses
from dataclasses import dataclass

from toolkit.core.errors import BedsideError
from toolkit.core.formats import FORMATS, KV_CACHE_DTYPES, format_of_scheme, resolve_scheme, vision_dtypes_for
from toolkit.core.units import GIB
from toolkit.model.facts import ModelFacts
from toolkit.model.storage_types import StoredTensor
from toolkit.plan.calibration import read_calibration
from toolkit.plan.memory import (
    Deployment,
    RuntimeSettings,
    decode_seconds_per_token,
    estimate_memory,
    host_budget,
    host_tier,
    kv_cache_dtype_of,
    memory_budget,
    model_tier,
    runtime_for,
    text_weights,
)
from toolkit.plan.quality_priors import (
    QualityPrediction,
    Sensitivities,
    depth_coefficient,
    depth_prior_group,
    predict_quality,
)
from toolkit.plan.schema import Candidate, MemoryEstimate, Plan, PredictedQuality
from toolkit.plan.simulator import predict_decode_tokens_per_s
from toolkit.plan.workload import make_workload
from toolkit.target.profiles import DeviceProfile

QUALITY_TIE_PCT = 0.05


@dataclass
class _Scored:
    candidate: Candidate
    quality: QualityPrediction
    passes: bool


def _gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def placement_label(candidate: Candidate, num_layers: int) -> str:
    """Where the candidate's weights and KV cache live, in words ("GPU" when nothing is placed on the host)."""
    if candidate.gpu_layers is None and not candidate.kv_on_host:
        return "all on the device"
    parts = []
    if candidate.gpu_layers is not None:
        kept = num_layers - candidate.layers_removed
        on_gpu = max(0, min(kept, candidate.gpu_layers - 1))
        head = "head and " if candidate.gpu_layers >= 1 else ""
        parts.append(
            f"-ngl {candidate.gpu_layers}: {head}{on_gpu} of {kept} layers on the GPU, the rest in host memory"
        )
    if candidate.kv_on_host:
        parts.append("KV cache in host memory")
    return "; ".join(parts)


def _describe(candidate: Candidate, num_layers: int) -> str:
    vision = f", vision {candidate.vision_dtype}" if candidate.vision_dtype else ""
    kv = f", KV cache {candidate.kv_cache_dtype}" if candidate.kv_cache_dtype else ""
    placed = (
        f", {placement_label(candidate, num_layers)}"
        if candidate.gpu_layers is not None or candidate.kv_on_host
        else ""
    )
    return (
        f"{candidate.format} {candidate.quant}, {candidate.layers_removed} of {num_layers} layers removed"
        f"{vision}{kv}{placed}"
    )


MIN_TEXT_WITH_IMAGE = 64  # tokens of prompt and answer a vision-language context must hold beside one image


def _validate_pins(
    facts: ModelFacts,
    profile: DeviceProfile,
    format_name: str | None,
    quant: str | None,
    prune_layers: int | None,
    context: int | None,
    kv_cache_dtype: str | None = None,
) -> list[tuple[str, list[str]]]:
    """Check the pinned options and return the (format, schemes) pairs to search."""
    if kv_cache_dtype is not None:
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise BedsideError(
                f"unknown KV-cache dtype '{kv_cache_dtype}'; known: {', '.join(KV_CACHE_DTYPES)}"
            )
        if kv_cache_dtype not in profile.kv_cache_dtypes:
            raise BedsideError(
                f"profile '{profile.name}' does not allow KV-cache dtype '{kv_cache_dtype}'; it allows: "
                f"{', '.join(profile.kv_cache_dtypes)}"
            )
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
    window = context if context is not None else profile.context_length
    if facts.vision is not None and window < facts.vision.image_tokens_per_image + MIN_TEXT_WITH_IMAGE:
        raise BedsideError(
            f"a context of {window} tokens cannot hold one image ({facts.vision.image_tokens_per_image} positions) "
            f"and a question: plan for at least {facts.vision.image_tokens_per_image + MIN_TEXT_WITH_IMAGE} (--context)"
        )

    formats = [format_name] if format_name else [f for f in profile.formats if f in FORMATS]
    pairs = []
    for f in formats:
        schemes = [quant] if quant else [s for s in FORMATS[f] if s in profile.quant_schemes]
        if schemes:
            pairs.append((f, schemes))
    if not pairs:
        raise BedsideError(f"profile '{profile.name}' allows no quantization scheme of its formats")
    return pairs


def _kv_choices(
    format_name: str, runtime: str, profile: DeviceProfile, pinned: str | None
) -> list[str | None]:
    """KV-cache dtypes to search: llama.cpp the profile's (or the pin); ONNX Runtime none (its float cache)."""
    if runtime != "llama.cpp":
        return [None]
    return [pinned] if pinned is not None else list(profile.kv_cache_dtypes)


@dataclass
class _Search:
    """What scoring a candidate needs besides the candidate itself."""

    facts: ModelFacts
    profile: DeviceProfile
    settings: RuntimeSettings | None
    sensitivities: Sensitivities | None
    budget: int
    host_budget: int | None
    min_speed: float
    healed: bool = True
    calibration: dict | None = None  # the simulator's calibration record, read once per plan


def _score(search: _Search, deployment: Deployment, tensors: list[StoredTensor]) -> _Scored:
    facts, profile = search.facts, search.profile
    memory = estimate_memory(facts, deployment, profile, search.settings, text_tensors=tensors)
    kv_dtype = kv_cache_dtype_of(deployment, profile)
    quality = predict_quality(
        facts,
        deployment.quant,
        deployment.layers_removed,
        search.sensitivities,
        deployment.vision_dtype,
        kv_cache_dtype=kv_dtype if deployment.format != "onnx" else None,
        healed=search.healed,
    )
    bound = 1.0 / decode_seconds_per_token(facts, deployment, profile, tensors)
    workload = make_workload(facts, deployment, profile, tensors=tensors, placement_given=True)
    context = deployment.context or profile.context_length
    speed = predict_decode_tokens_per_s(workload, profile, context, record=search.calibration)
    fits_model = memory.total_bytes <= search.budget
    fits_host = search.host_budget is None or memory.host_bytes <= search.host_budget
    reasons = []
    if not fits_model:
        reasons.append(f"needs {_gib(memory.total_bytes)}, over the {_gib(search.budget)} budget")
    if not fits_host:
        host = host_tier(profile)
        name = host.name if host is not None else "host"
        reasons.append(
            f"needs {_gib(memory.host_bytes)} of {name}, over its {_gib(search.host_budget or 0)} budget"
        )
    if speed < search.min_speed:
        reasons.append(
            f"predicted {speed:.1f} tok/s decode (simulator; bandwidth bound {bound:.1f}), below the "
            f"{search.min_speed:g} tok/s minimum"
        )
    candidate = Candidate(
        format=deployment.format,
        quant=deployment.quant,
        runtime=deployment.runtime or runtime_for(deployment.format, profile),
        layers_removed=deployment.layers_removed,
        layers=quality.layers,
        vision_dtype=deployment.vision_dtype,
        kv_cache_dtype=kv_dtype,
        kv_on_host=deployment.kv_on_host,
        gpu_layers=deployment.gpu_layers,
        memory=memory,
        fits=fits_model and fits_host,
        predicted_quality_loss=round(quality.total_pct, 4),
        predicted_decode_tokens_per_s=round(speed, 2),
        decode_bound_tokens_per_s=round(bound, 2),
        reason="; ".join(reasons),
    )
    return _Scored(candidate, quality, candidate.fits and speed >= search.min_speed)


def _largest_gpu_layers(search: _Search, deployment: Deployment, tensors: list[StoredTensor]) -> int | None:
    """The largest n_gpu_layers whose GPU part fits the budget (bisection: GPU bytes grow with N); None if even
    0 does not fit. N = kept + 1 (everything) is the all-on-GPU candidate, already scored."""
    kept = search.facts.num_layers - deployment.layers_removed

    def fits(count: int) -> bool:
        placed = dataclasses.replace(deployment, gpu_layers=count)
        memory = estimate_memory(search.facts, placed, search.profile, search.settings, text_tensors=tensors)
        return memory.total_bytes <= search.budget

    if not fits(0):
        return None
    low, high = 0, kept + 1  # low fits, high does not (the caller saw the all-on-GPU candidate fail)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


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
    kv_cache_dtype: str | None = None,
    host_placement: bool = True,
    healed: bool = True,
) -> Plan:
    """Enumerate, estimate and choose (see the module docstring for the rules). Never raises for "no fit":
    the Plan then has fits=False, chosen=None and a reason with the smallest candidate's size against the budget.
    `kv_cache_dtype` pins llama.cpp's KV-cache precision (one of the profile's kv_cache_dtypes); a quantized pin
    leaves ONNX out, whose runtime keeps a float KV cache. `host_placement` False keeps every candidate wholly
    in the model tier (no KV cache or layers in host memory beside a GPU).
    """
    pairs = _validate_pins(facts, profile, format, quant, prune_layers, context, kv_cache_dtype)
    if kv_cache_dtype is not None and kv_cache_dtype not in ("f32", "f16"):
        pairs = [(f, schemes) for f, schemes in pairs if runtime_for(f, profile) == "llama.cpp"]
        if not pairs:
            raise BedsideError(
                f"KV-cache dtype '{kv_cache_dtype}' is a llama.cpp setting, and no format searched here runs on "
                "llama.cpp (ONNX Runtime keeps a float KV cache)"
            )
    ctx = context or profile.context_length
    search = _Search(
        facts=facts,
        profile=profile,
        settings=settings,
        sensitivities=sensitivities,
        budget=memory_budget(profile),
        host_budget=host_budget(profile),
        min_speed=profile.min_decode_tokens_per_s.value,
        healed=healed,
        calibration=read_calibration(),
    )
    depths = [prune_layers] if prune_layers is not None else list(range(facts.num_layers // 2 + 1))
    by_layers = sensitivities is not None and sensitivities.has_layer_data

    scored: list[_Scored] = []
    for format_name, schemes in pairs:
        runtime = runtime_for(format_name, profile)
        kv_dtypes = _kv_choices(format_name, runtime, profile, kv_cache_dtype)
        placements = host_placement and runtime == "llama.cpp" and host_tier(profile) is not None
        for scheme in schemes:
            vision_dtypes = vision_dtypes_for(format_name, scheme) if facts.vision is not None else (None,)
            for k in depths:
                tensors = text_weights(facts, Deployment(format_name, scheme, k))
                for vision_dtype in vision_dtypes:
                    for kv_dtype in kv_dtypes:
                        deployment = Deployment(
                            format_name, scheme, k, vision_dtype, runtime, ctx, kv_cache_dtype=kv_dtype
                        )
                        device = _score(search, deployment, tensors)
                        scored.append(device)
                        if not placements or device.candidate.memory.total_bytes <= search.budget:
                            continue
                        kv_host = _score(search, dataclasses.replace(deployment, kv_on_host=True), tensors)
                        if kv_host.candidate.memory.total_bytes <= search.budget:
                            scored.append(kv_host)
                        count = _largest_gpu_layers(search, deployment, tensors)
                        if count is not None:
                            scored.append(
                                _score(search, dataclasses.replace(deployment, gpu_layers=count), tensors)
                            )

    passing = [s for s in scored if s.passes]
    chosen = _choose(passing)
    ordered = _order(scored, chosen)
    for each in passing:  # a re-plan may pick any passing candidate; its report shows the terms beside the measured
        each.candidate.predicted = _predicted_terms(facts, each, healed)
    fp16_bytes = facts.total_params * 2
    plan = Plan(
        model=model_name,
        profile=profile.name,
        context_length=ctx,
        budget_bytes=search.budget,
        fp16_bytes=fp16_bytes,
        fits=chosen is not None,
        chosen=chosen.candidate if chosen else None,
        candidates=[s.candidate for s in ordered],
        reason="",
    )
    plan.reason = (
        _chosen_reason(facts, profile, plan, chosen, by_layers)
        if chosen
        else _nothing_fits_reason(facts, profile, scored, search.budget, search.min_speed)
    )
    return plan


def _kv_rank(candidate: Candidate) -> int:
    """0 for the most precise KV cache (f32, f16), then q8_0, q4_0: the order of KV_CACHE_DTYPES."""
    order = list(KV_CACHE_DTYPES)
    dtype = candidate.kv_cache_dtype or "f16"
    return max(0, order.index(dtype) - order.index("f16")) if dtype in order else len(order)


def _tie_key(s: _Scored) -> tuple:
    """Within a quality tie: all on the GPU before a host placement; on the GPU the more precise KV cache, then
    the smaller total; among host placements the faster predicted decode (what the placement costs), then the
    more precise KV cache."""
    c = s.candidate
    placed = c.kv_on_host or c.gpu_layers is not None
    if placed:
        return (
            1,
            -(c.predicted_decode_tokens_per_s or 0.0),
            _kv_rank(c),
            c.memory.total_bytes,
            s.quality.total_pct,
        )
    return (0, _kv_rank(c), c.memory.total_bytes, 0.0, s.quality.total_pct)


def _choose(passing: list[_Scored]) -> _Scored | None:
    """The lowest predicted loss (depth and bits weighed by the same perplexity scale); losses within
    QUALITY_TIE_PCT of the best are ties, settled by _tie_key."""
    if not passing:
        return None
    best = min(s.quality.total_pct for s in passing)
    ties = [s for s in passing if s.quality.total_pct <= best + QUALITY_TIE_PCT]
    return min(ties, key=_tie_key)


def _order(scored: list[_Scored], chosen: _Scored | None) -> list[_Scored]:
    """Chosen first, then passing candidates by predicted loss, then the rest by loss and size."""

    def key(s: _Scored) -> tuple:
        return (not s.passes, round(s.quality.total_pct, 6), s.candidate.memory.total_bytes)

    rest = sorted((s for s in scored if s is not chosen), key=key)
    return ([chosen] if chosen else []) + rest


def _predicted_terms(facts: ModelFacts, scored: _Scored, healed: bool) -> PredictedQuality:
    """A candidate's quality terms, with the depth curve named when the depth term is a prior."""
    q, k = scored.quality, scored.candidate.layers_removed
    depth_prior = ""
    if q.depth_source == "prior" and k > 0:
        group = depth_prior_group(facts)
        c = depth_coefficient(facts.text_params, k / facts.num_layers, group, healed)
        depth_prior = (
            f"{group} family curve at {facts.text_params / 1e9:.2g}B text parameters, "
            f"{'healed' if healed else 'one-shot'}: ln(PPL ratio) = {c:.2f} x {k}/{facts.num_layers} "
            "(docs/PRIORS.md)"
        )
    return PredictedQuality(
        total_pct=round(q.total_pct, 4),
        quant_pct=round(q.quant_pct, 4),
        quant_source=q.quant_source,
        depth_pct=round(q.depth_pct, 4),
        depth_source=q.depth_source,
        depth_prior=depth_prior,
        kv_pct=round(q.kv_pct, 4),
        kv_source=q.kv_source,
        vision_pct=round(q.vision_pct, 4),
    )


def _memory_line(memory: MemoryEstimate) -> str:
    return (
        f"weights {_gib(memory.weights_bytes)}, KV cache {_gib(memory.kv_cache_bytes)}, "
        f"vision {_gib(memory.vision_bytes)}, overhead {_gib(memory.overhead_bytes)}"
    )


def _host_line(profile: DeviceProfile, candidate: Candidate) -> str:
    """What a host placement puts in host memory, against that tier's budget ("" when nothing is placed)."""
    if not (candidate.kv_on_host or candidate.gpu_layers is not None):
        return ""
    tier, budget = host_tier(profile), host_budget(profile)
    detail = candidate.memory.detail
    layers = sum(
        v
        for k, v in detail.items()
        if k.startswith(("host_only.weights.layers.", "host_only.weights.output."))
    )
    kv = sum(v for k, v in detail.items() if k.startswith("host_only.kv_cache."))
    return (
        f"; in host memory ({tier.name if tier else 'host'}): {_gib(candidate.memory.host_bytes)} of its "
        f"{_gib(budget or 0)} budget (layers and head {_gib(layers)}, KV cache {_gib(kv)})"
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
        "lowest predicted loss, depth from measured layer sensitivities"
        if by_layers
        else "lowest predicted loss, depth and bits weighed by their priors"
    )
    depth_source = (
        f"{q.depth_source}: {c.predicted.depth_prior}"
        if c.predicted and c.predicted.depth_prior
        else q.depth_source
    )
    floor = profile.quality_floor.max_perplexity_increase_pct.value
    floor_note = (
        f"; above the profile's {floor:g} % perplexity floor by prediction: validate must confirm with measurements"
        if q.total_pct > floor
        else ""
    )
    if c.runtime == "llama.cpp":
        kv = f", KV cache {c.kv_cache_dtype} +{q.kv_pct:.2f} % {q.kv_source}"
    else:
        kv = f"; KV cache {c.kv_cache_dtype}: {c.runtime} keeps the graph's float KV cache"
    return (
        f"chose {_describe(c, facts.num_layers)} on {c.runtime}: {_gib(c.memory.total_bytes)} of the "
        f"{_budget_line(profile, plan.budget_bytes)}; {_memory_line(c.memory)}{_host_line(profile, c)}; "
        f"weights+vision {saving:.0%} below fp16; predicted +{q.total_pct:.2f} % perplexity (quantization "
        f"+{q.quant_pct:.2f} % {q.quant_source}, depth +{q.depth_pct:.2f} % {depth_source}{kv}); predicted "
        f"{c.predicted_decode_tokens_per_s:g} tok/s decode on the target (simulator, docs/SIMULATOR.md); "
        f"rule: {rule}{floor_note}"
    )


def _host_weights(memory: MemoryEstimate) -> int:
    """Weights llama.cpp keeps on the host (the input embedding on a discrete GPU, and placed layers)."""
    return sum(v for k, v in memory.detail.items() if k.startswith("host_only.weights."))


def _nothing_fits_reason(
    facts: ModelFacts, profile: DeviceProfile, scored: list[_Scored], budget: int, min_speed: float
) -> str:
    smallest = min(scored, key=lambda s: s.candidate.memory.total_bytes).candidate
    fitting = [s for s in scored if s.candidate.fits]
    if not fitting and smallest.memory.total_bytes <= budget:  # the GPU part fits; host memory does not
        return (
            f"nothing fits on '{profile.name}': the smallest candidate ({_describe(smallest, facts.num_layers)}) "
            f"fits the {_budget_line(profile, budget)} but {smallest.reason}"
        )
    if fitting:
        fastest = max(fitting, key=lambda s: s.candidate.predicted_decode_tokens_per_s or 0.0).candidate
        return (
            f"nothing passes on '{profile.name}': {len(fitting)} candidates fit in memory, but the fastest "
            f"({_describe(fastest, facts.num_layers)}) is predicted at {fastest.predicted_decode_tokens_per_s:g} "
            f"tok/s decode (simulator; bandwidth bound {fastest.decode_bound_tokens_per_s:g}), below the "
            f"profile's minimum of {min_speed:g} tok/s"
        )
    return (
        f"nothing fits on '{profile.name}': the smallest candidate ({_describe(smallest, facts.num_layers)}) needs "
        f"{_gib(smallest.memory.total_bytes)} ({_memory_line(smallest.memory)}) but the {_budget_line(profile, budget)} "
        f"is {_gib(smallest.memory.total_bytes - budget)} short"
    )
