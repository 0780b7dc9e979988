"""Re-planning after a failed validation: the next candidate, with measured figures correcting the estimates.

Why: the planner ranks candidates by estimated memory and predicted quality loss; validation measures
both. When an attempt misses the quality floor or the memory budget, the estimates of every other
candidate are corrected by what that attempt showed, and the best candidate that then passes is tried:

    memory_ratio  = measured_peak_bytes / estimated_total_bytes          (of the failed attempt)
    quality_ratio = measured_increase_pct / max(predicted_loss_pct, 1)   (of the failed attempt)
    corrected_memory(c)  = c.memory.total_bytes * memory_ratio          must be <= budget
    corrected_loss(c)    = max(c.predicted_quality_loss, 1) * quality_ratio  must be <= floor

and, in the direction the failure points: after a quality failure only candidates with a lower
predicted loss than the failed one (fewer layers removed or more bits); after a memory failure only
candidates with a smaller estimate; after a speed failure (only on the "host" profile, where the measured
speed is the target's) only candidates predicted faster than the failed one. The planner's other constraint
holds too, corrected when the target's speed was measured:

    speed_ratio = measured_decode_tokens_per_s / predicted_decode_tokens_per_s   (of a host-profile attempt)
    corrected_speed(c) = c.predicted_decode_tokens_per_s * speed_ratio  must be >= profile minimum

Until a speed was measured on the target, speed_ratio is 1: the floor is checked on the prediction, as the
planner checks it (toolkit/plan/planner.py).

Among the rest, the planner's own order (chosen rule) decides.
Ratios from several attempts are combined by taking the most pessimistic one (largest memory and quality
ratio, smallest speed ratio).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from toolkit.plan.schema import Candidate, Plan

MIN_PREDICTED_PCT = 1.0


CandidateKey = tuple[str, str, int, str | None, str | None, bool, int | None]


def candidate_key(candidate: Candidate) -> CandidateKey:
    """Identity of a candidate across plans: format, scheme, layers removed, vision dtype, KV-cache dtype,
    KV cache in host memory, GPU layers."""
    return (
        candidate.format,
        candidate.quant,
        candidate.layers_removed,
        candidate.vision_dtype,
        candidate.kv_cache_dtype,
        candidate.kv_on_host,
        candidate.gpu_layers,
    )


@dataclass
class Corrections:
    """Measured-over-estimated ratios gathered from failed attempts (1.0 until something is measured)."""

    memory_ratio: float = 1.0
    quality_ratio: float = 1.0
    tried: list[CandidateKey] = field(default_factory=list)
    failed_quality_loss: float | None = None  # predicted loss of the last quality failure
    failed_memory_bytes: int | None = None  # estimate of the last memory failure
    speed_ratio: float = 1.0  # measured / predicted decode speed, where the measurement is the target's
    speed_measured: bool = False  # True once a target measurement set speed_ratio
    failed_speed: float | None = None  # predicted decode speed of the fastest speed failure

    def learn(
        self,
        candidate: Candidate,
        measured_memory: int | None,
        measured_increase_pct: float | None,
        quality_failed: bool,
        memory_failed: bool,
        target_speed: float | None = None,
        speed_failed: bool = False,
    ) -> None:
        """Fold one attempt's measurements into the ratios; `target_speed` is a decode speed measured on the
        target itself (the "host" profile), None elsewhere."""
        self.tried.append(candidate_key(candidate))
        predicted_speed = candidate.predicted_decode_tokens_per_s
        if target_speed is not None and predicted_speed:
            ratio = target_speed / predicted_speed
            self.speed_ratio = min(self.speed_ratio, ratio) if self.speed_measured else ratio
            self.speed_measured = True
        if speed_failed and predicted_speed is not None:
            self.failed_speed = max(predicted_speed, self.failed_speed or predicted_speed)
        if measured_memory is not None and candidate.memory.total_bytes > 0:
            self.memory_ratio = max(self.memory_ratio, measured_memory / candidate.memory.total_bytes)
        if measured_increase_pct is not None:
            predicted = max(candidate.predicted_quality_loss, MIN_PREDICTED_PCT)
            self.quality_ratio = max(self.quality_ratio, max(measured_increase_pct, 0.0) / predicted)
        if quality_failed:
            self.failed_quality_loss = min(
                candidate.predicted_quality_loss, self.failed_quality_loss or candidate.predicted_quality_loss
            )
        if memory_failed:
            self.failed_memory_bytes = min(
                candidate.memory.total_bytes, self.failed_memory_bytes or candidate.memory.total_bytes
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "memory_ratio": round(self.memory_ratio, 4),
            "quality_ratio": round(self.quality_ratio, 4),
            "speed_ratio": round(self.speed_ratio, 4),
            "tried": [list(key) for key in self.tried],
        }


def next_candidate(
    plan: Plan, corrections: Corrections, floor_pct: float, min_speed: float = 0.0
) -> tuple[Candidate | None, str]:
    """The next candidate to try and why (None and the reason when no candidate is left)."""
    considered = too_slow = 0
    for candidate in plan.candidates:
        if candidate_key(candidate) in corrections.tried:
            continue
        if corrections.failed_quality_loss is not None and (
            candidate.predicted_quality_loss >= corrections.failed_quality_loss
        ):
            continue
        if corrections.failed_memory_bytes is not None and (
            candidate.memory.total_bytes >= corrections.failed_memory_bytes
        ):
            continue
        speed = candidate.predicted_decode_tokens_per_s
        if corrections.failed_speed is not None and (speed is None or speed <= corrections.failed_speed):
            continue
        floor_speed = speed * corrections.speed_ratio if speed is not None else candidate.decode_bound_tokens_per_s
        if floor_speed is not None and floor_speed < min_speed:
            too_slow += 1
            continue
        considered += 1
        memory = candidate.memory.total_bytes * corrections.memory_ratio
        loss = max(candidate.predicted_quality_loss, MIN_PREDICTED_PCT) * corrections.quality_ratio
        if memory <= plan.budget_bytes and loss <= floor_pct:
            return candidate, (
                f"{candidate.format} {candidate.quant} with {candidate.layers_removed} layers removed"
                f"{_kv_words(candidate)}: corrected "
                f"memory {memory / 2**20:.1f} MiB (x{corrections.memory_ratio:.2f}) within the "
                f"{plan.budget_bytes / 2**20:.1f} MiB budget, corrected loss {loss:.1f} % "
                f"(x{corrections.quality_ratio:.2f}) within the {floor_pct:g} % floor"
            )
    return None, (
        f"no candidate left that the measurements say could pass ({considered} in the direction of the failure"
        f"{f', {too_slow} more below the {min_speed:g} tok/s speed floor' if too_slow else ''}; "
        f"memory x{corrections.memory_ratio:.2f}, quality x{corrections.quality_ratio:.2f} against the estimates)"
    )


def _kv_words(candidate: Candidate) -> str:
    if candidate.runtime != "llama.cpp" or candidate.kv_cache_dtype is None:
        return ""
    placed = []
    if candidate.gpu_layers is not None:
        placed.append(f"-ngl {candidate.gpu_layers}")
    if candidate.kv_on_host:
        placed.append("KV cache in host memory")
    return f", KV cache {candidate.kv_cache_dtype}" + (f" ({', '.join(placed)})" if placed else "")


def with_chosen(plan: Plan, candidate: Candidate, reason: str) -> Plan:
    """A copy of `plan` that chose `candidate` (listed first), with `reason`."""
    rest = [c for c in plan.candidates if candidate_key(c) != candidate_key(candidate)]
    return plan.model_copy(
        update={"chosen": candidate, "candidates": [candidate, *rest], "fits": True, "reason": reason}
    )
