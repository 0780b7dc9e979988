"""What a deploy produced, typed: its attempts, the one it ends with, the checks, memory figures and paths.

Why: `toolkit.deploy.pipeline.run_deploy` builds one `DeployOutcome` and hands it to
`toolkit.deploy.report` (report.json, report.html) and `toolkit.deploy.bundle` (the bundle); they read
attributes, not string keys of a shared dict. The records other stages wrote (compression.json, export.json,
the evaluation) stay as they were read, one writer each; the outcome points at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from toolkit.plan.schema import Candidate, MemoryEstimate, Plan
from toolkit.target.profiles import DeviceProfile
from toolkit.validate.checks import Check, Number, Record, blocking_failures

PEAK_MEMORY_CHECK = "peak_memory_bytes"


class StageRecord(Record):
    """Seconds and resumed flag of one pipeline stage, plus what that stage adds (folder, chosen, stages)."""

    model_config = ConfigDict(extra="allow")

    seconds: float | None = None  # None while the stage runs (the bundle stage when the report is written)
    resumed: bool = False

    @model_serializer(mode="wrap")
    def _without_pending_seconds(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if self.seconds is None:
            data.pop("seconds", None)
        return data


class Attempt(Record):
    """One compress -> export -> validate round of the re-plan loop."""

    attempt: int  # 1, 2, ...
    plan: Plan  # the plan this attempt followed; its `chosen` is the candidate tried
    compression: dict[str, Any] = Field(default_factory=dict)  # compression.json of the compressed checkpoint
    checkpoint: Path  # the compressed Hugging Face checkpoint (tokenizer files for the bundle)
    export_dir: Path  # the finished export folder (work/exports/<fmt>-<quant>-<hash12>)
    export: dict[str, Any] = Field(default_factory=dict)  # its export.json, as the exporter wrote it
    artifact: Path  # the file (GGUF) or folder (ONNX) the runtime loads
    evaluation: dict[str, Any] = Field(default_factory=dict)  # evaluate() result; {"error": ...} on a crash
    # the simulator's speed of the export on the profile (toolkit.validate.target_speed); None when not run
    target_speed: dict[str, Any] | None = None
    checks: list[Check] = Field(default_factory=list)
    stages: dict[str, StageRecord] = Field(default_factory=dict)  # the stages so far, when this attempt ended
    corrections: dict[str, Any] | None = None  # replan.Corrections after a failure
    next: str | None = None  # why the next candidate was chosen (or why none was)

    @property
    def candidate(self) -> Candidate:
        """The candidate this attempt tried."""
        assert self.plan.chosen is not None, "an attempt follows a plan that chose a candidate"
        return self.plan.chosen

    @property
    def failures(self) -> list[Check]:
        """The failed blocking checks."""
        return blocking_failures(self.checks)

    @property
    def passed(self) -> bool:
        """Every blocking check passed."""
        return not self.failures

    @property
    def runtime_failed(self) -> bool:
        """The runtime could not run the export (a failed check, but nothing to re-plan from)."""
        return "error" in self.evaluation

    @property
    def layers_removed(self) -> list[int] | None:
        """Original indices of the decoder layers compress removed, as compression.json records them."""
        return self.compression.get("layers_removed")

    @property
    def quality(self) -> dict[str, Any]:
        """Perplexity per compress stage (original, pruned, healed, quantized) from compression.json."""
        return self.compression.get("quality") or {}

    def check(self, name: str) -> Check | None:
        """The check called `name`, if this attempt has one."""
        return next((check for check in self.checks if check.name == name), None)


class MemoryFigures(Record):
    """Memory of the deployment: budget, the planner's estimate and what validation measured (report `memory`)."""

    budget_bytes: int
    estimate: MemoryEstimate | None
    measured_peak_bytes: Number | None  # the peak_memory_bytes check: what competes for the budget
    scoring_peak_rss_bytes: Number | None
    peak_vram_bytes: Number | None
    context: int | None  # tokens the KV cache was filled to

    @classmethod
    def of(cls, attempt: Attempt, budget_bytes: int) -> MemoryFigures:
        memory_check = attempt.check(PEAK_MEMORY_CHECK)
        evaluation = attempt.evaluation
        return cls(
            budget_bytes=budget_bytes,
            estimate=attempt.plan.chosen.memory if attempt.plan.chosen else None,
            measured_peak_bytes=memory_check.value if memory_check else None,
            scoring_peak_rss_bytes=evaluation.get("scoring_peak_rss_bytes"),
            peak_vram_bytes=evaluation.get("peak_vram_bytes"),
            context=evaluation.get("context"),
        )


class ModelSummary(Record):
    """The model deployed: what `--model` named, its weights' sha256 and size."""

    name: str
    source_sha256: str
    num_layers: int
    total_params: int


class BundleNames(Record):
    """Names, under `--out`, of the bundle folder and its archive."""

    folder: str
    tarball: str


class DeployOutcome(Record):
    """Everything report and bundle need from a deploy; `attempts[-1]` is the attempt it ends with."""

    model: ModelSummary
    threads: int | None  # --threads (None: the runtime's default)
    profile: DeviceProfile
    first_plan: Plan  # the planner's plan (attempts after the first follow re-plans of it)
    attempts: list[Attempt] = Field(min_length=1)
    passed: bool
    reason: str
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    disk_estimate_bytes: int = 0
    bundle: BundleNames | None = None  # set when every blocking check passed

    @property
    def final(self) -> Attempt:
        """The last attempt: the one that passed, or the last one that failed."""
        return self.attempts[-1]

    @property
    def plan(self) -> Plan:
        """The plan of the final attempt."""
        return self.final.plan

    @property
    def candidate(self) -> Candidate:
        """The candidate of the final attempt (the one deployed when `passed`)."""
        return self.final.candidate

    @property
    def checks(self) -> list[Check]:
        """The checks of the final attempt."""
        return self.final.checks

    @property
    def memory(self) -> MemoryFigures:
        """Budget, estimate and measured memory of the final attempt."""
        return MemoryFigures.of(self.final, self.first_plan.budget_bytes)
