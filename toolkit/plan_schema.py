"""plan.json: the planner's decision, consumed by compress, export, validate and deploy."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from toolkit import SCHEMA_VERSION


class MemoryEstimate(BaseModel):
    """Estimated peak memory of a deployment, in bytes, every term visible."""

    model_config = ConfigDict(extra="forbid")

    total_bytes: int
    weights_bytes: int  # text decoder weights in the exported types (incl. embeddings, output, norms)
    kv_cache_bytes: int
    vision_bytes: int  # vision tower + projector weights + image-token activations
    overhead_bytes: int  # runtime compute buffers + fixed runtime/CUDA-context overhead
    detail: dict[str, int] = {}  # finer terms (per tensor type, compute buffer, context, ...)


class Candidate(BaseModel):
    """One point of the search space with its estimated memory and predicted quality loss."""

    model_config = ConfigDict(extra="forbid")

    format: str
    quant: str
    runtime: str
    layers_removed: int
    layers: list[int] | None = None  # original indices to remove, once measured
    vision_dtype: str | None = None
    memory: MemoryEstimate
    fits: bool
    predicted_quality_loss: float  # predicted perplexity increase, percent
    predicted_decode_tokens_per_s: float | None = None
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
