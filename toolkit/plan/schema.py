"""plan.json: the planner's decision, consumed by compress, export, validate and deploy; its read and write."""

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolkit.core.atomic import write_text_atomic
from toolkit.core.errors import BedsideError
from toolkit.core.records import PLAN_RECORD, SCHEMA_VERSION


class MemoryEstimate(BaseModel):
    """Estimated peak memory of a deployment, in bytes, every term visible."""

    model_config = ConfigDict(extra="forbid")

    total_bytes: int
    weights_bytes: int  # text decoder weights in the exported types (incl. embeddings, output, norms)
    kv_cache_bytes: int
    vision_bytes: int  # vision tower + projector weights + image-token activations
    overhead_bytes: int  # runtime compute buffers + fixed runtime/CUDA-context overhead
    # Bytes in the host memory beside a discrete GPU (the `host_only.*` terms: the process, llama.cpp's input
    # embedding, and the layers, head and KV cache a placement moves there); not part of total_bytes.
    host_bytes: int = 0
    detail: dict[str, int] = {}  # finer terms (per tensor type, compute buffer, context, ...)


class PredictedQuality(BaseModel):
    """The terms of a candidate's predicted perplexity increase (percent) and where each came from, so a report
    can set the measured value beside the prior (formulas and sources: docs/PRIORS.md)."""

    model_config = ConfigDict(extra="forbid")

    total_pct: float
    quant_pct: float
    quant_source: str  # "prior", "prior (imatrix)" or "measured"
    depth_pct: float
    depth_source: str
    depth_prior: str = ""  # the depth curve used: family group, text parameters, healed or one-shot
    kv_pct: float = 0.0
    kv_source: str = "prior"
    vision_pct: float = 0.0


class Candidate(BaseModel):
    """One point of the search space with its estimated memory and predicted quality loss."""

    model_config = ConfigDict(extra="forbid")

    format: str
    quant: str
    runtime: str
    layers_removed: int
    layers: list[int] | None = None  # original indices to remove, once measured
    vision_dtype: str | None = None
    # KV-cache element type: llama.cpp's -ctk/-ctv (f16, q8_0, q4_0); ONNX Runtime keeps its graph's float (f32/f16).
    # None in plans written before the planner chose it: the profile's kv_cache_dtype.
    kv_cache_dtype: str | None = None
    # Placement beside a discrete GPU (llama.cpp): the KV cache in host memory (offload_kqv = false), and
    # n_gpu_layers (the output head and the last N - 1 decoder layers on the GPU; None = all).
    kv_on_host: bool = False
    gpu_layers: int | None = None
    memory: MemoryEstimate
    fits: bool
    predicted_quality_loss: float  # predicted perplexity increase, percent
    predicted_decode_tokens_per_s: float | None = None  # the simulator's (toolkit.plan.simulator)
    decode_bound_tokens_per_s: float | None = None  # bandwidth upper bound, recorded beside the prediction
    predicted: PredictedQuality | None = None  # the terms of predicted_quality_loss (candidates that pass)
    reason: str = ""


class Plan(BaseModel):
    """The planner's output: budget, fp16 reference size, the chosen candidate and all considered."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    model: str
    profile: str
    context_length: int
    budget_bytes: int
    fp16_bytes: int
    fits: bool
    chosen: Candidate | None
    candidates: list[Candidate] = Field(default_factory=list)
    reason: str = ""
    # the build host's memory per compress stage (toolkit.plan.compression_memory), beside the target's
    compression: dict[str, Any] | None = None


def write_plan(plan: Plan, path: Path) -> None:
    """Write plan.json atomically; a folder gets `plan.json` inside."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_RECORD
    try:
        write_text_atomic(path, plan.model_dump_json(indent=2) + "\n")
    except OSError as error:
        raise BedsideError(f"cannot write {path}: {error.strerror or error}") from None


def read_plan(path: Path) -> Plan:
    """Load and validate plan.json; a one-line BedsideError when missing or invalid."""
    path = Path(path)
    if path.is_dir():
        path = path / PLAN_RECORD
    if not path.is_file():
        raise BedsideError(f"plan file '{path}' not found: write one with `bedside plan ... --out {path}`")
    try:
        return Plan.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "file"
        raise BedsideError(
            f"plan file '{path}' is not a valid plan.json ({where}: {first.get('msg', 'invalid')}): "
            "re-create it with `bedside plan --out`"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise BedsideError(f"cannot read plan file '{path}': {error}") from None
