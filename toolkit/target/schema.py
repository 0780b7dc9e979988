"""The device profile schema: a typed description of a target (memory tiers, compute, runtimes, floors).

Every figure is a `Figure` with the value and where it came from (datasheet URL or the command
that measured it), so a profile can be audited line by line. Profiles live as YAML files in
device_profiles/ (or anywhere the user points to); "host" is measured on the running machine.
A wrong profile is a user error: `load_profile` turns it into one `BedsideError` line naming the
file, the field path and the allowed values.
"""

import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from toolkit.core.formats import FORMATS, KV_CACHE_DTYPES, RUNTIMES
from toolkit.core.records import SCHEMA_VERSION
from toolkit.core.units import GIB

GB = 1e9
HOST_PROFILE_NAME = "host"


class Strict(BaseModel):
    """Base of every profile part: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Figure(Strict):
    """A number with its source."""

    value: float = Field(ge=0, allow_inf_nan=False, strict=True)  # strict: `true` is not the number 1
    source: str = Field(min_length=3)


class MemoryTier(Strict):
    """One level of the memory hierarchy the model can live in (device, unified, host, CXL-attached expander)."""

    name: str = Field(min_length=1)
    kind: Literal["unified", "device", "host", "cxl"]
    capacity_gib: Figure
    bandwidth_gbs: Figure  # GB/s (1e9 bytes per second), peak (datasheet) unless the source says measured
    latency_ns: Figure
    # What a streaming read really reaches (STREAM-like); speed models prefer it over the peak.
    sustained_bandwidth_gbs: Figure | None = None
    # Optional direction-specific figures (GB/s) for the simulator (toolkit/plan/simulator.py); when absent
    # reads and writes both run at the sustained (else peak) bandwidth. CXL expanders and some DRAM
    # configurations write markedly slower than they read.
    read_bandwidth_gbs: Figure | None = None
    write_bandwidth_gbs: Figure | None = None

    @property
    def capacity_bytes(self) -> int:
        return int(self.capacity_gib.value * GIB)

    @property
    def bandwidth_bytes_per_s(self) -> float:
        return self.bandwidth_gbs.value * GB

    @property
    def effective_bandwidth_bytes_per_s(self) -> float:
        """Sustained bandwidth when the profile knows it, else the peak: what decode speed scales with."""
        figure = self.sustained_bandwidth_gbs or self.bandwidth_gbs
        return figure.value * GB


class Link(Strict):
    """A path between two tiers (e.g. PCIe from host RAM to VRAM, a CXL link to a memory expander)."""

    name: str = Field(min_length=1)
    between: tuple[str, str]
    bandwidth_gbs: Figure  # per direction, after line encoding
    latency_ns: Figure
    # Optional description of the link (the bandwidth above is what models use; these say where it comes from).
    kind: Literal["pcie", "cxl", "nvlink", "c2c", "other"] | None = None
    generation: Figure | None = None  # PCIe / CXL generation (e.g. 3 for PCIe 3.0)
    lanes: Figure | None = None  # link width in lanes (x8 -> 8)


class Compute(Strict):
    """Where the matrix maths runs."""

    accelerator: Literal["cuda", "cpu"]
    architecture: str = Field(min_length=1)  # e.g. sm_87, x86_64-avx2
    cores: Figure  # CUDA cores or CPU cores
    fp16_tflops: Figure
    int8_tops: Figure
    cpu_model: str | None = None  # the host CPU, which also runs llama.cpp's CPU fallback
    cpu_features: list[str] = []  # ISA extensions the runtimes pick kernels by (avx2, avx512f, amx_tile...)
    # Peak of the host CPU (FP32-or-better FLOP/s, in TFLOPS) where layers not offloaded to the accelerator run;
    # optional, the simulator states its assumption when a GPU profile lacks it. On CPU profiles fp16_tflops is it.
    cpu_tflops: Figure | None = None


class QualityFloor(Strict):
    """The least quality a deployment must keep against the uncompressed model."""

    max_perplexity_increase_pct: Figure
    min_accuracy_retention_pct: Figure


class DeviceProfile(Strict):
    """A target device. `model_tier` names the tier the weights, KV cache and buffers must fit in."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(min_length=1)
    description: str
    memory_tiers: list[MemoryTier] = Field(min_length=1)
    links: list[Link] = []
    model_tier: str
    reserved_gib: Figure  # OS, desktop, CUDA context and other tenants, not available to the model
    headroom_pct: Figure  # kept free beyond the estimate, for estimator error and fragmentation
    compute: Compute
    runtimes: list[str] = Field(min_length=1)  # preferred first
    formats: list[str] = Field(min_length=1)  # preferred first
    quant_schemes: list[str] = Field(min_length=1)
    context_length: int = Field(gt=0, strict=True)  # strict: `true` is not a context of 1 token
    batch_size: int = Field(gt=0, strict=True)
    # KV-cache precisions the planner may choose for llama.cpp, largest first (toolkit.core.formats
    # KV_CACHE_DTYPES); `kv_cache_dtype` is the first of them, what runs where no plan chose one. A profile may
    # give either: an older profile's single `kv_cache_dtype` allows that one precision only.
    kv_cache_dtypes: list[str] = Field(min_length=1)
    kv_cache_dtype: str
    quality_floor: QualityFloor
    min_decode_tokens_per_s: Figure
    assumptions: list[str] = []  # what the figures take for granted (OS image, power mode, ...)

    @model_validator(mode="before")
    @classmethod
    def _kv_cache_dtypes_or_one(cls, data: typing.Any) -> typing.Any:
        """`kv_cache_dtype: f16` alone (older profiles) means `kv_cache_dtypes: [f16]`; a list alone sets the
        default to its first entry."""
        if not isinstance(data, dict):
            return data
        single, allowed = data.get("kv_cache_dtype"), data.get("kv_cache_dtypes")
        if allowed is None and single is not None:
            return {**data, "kv_cache_dtypes": [single]}
        if single is None and isinstance(allowed, list) and allowed:
            return {**data, "kv_cache_dtype": allowed[0]}
        return data

    @model_validator(mode="after")
    def _names_are_known(self) -> "DeviceProfile":
        """Cross-field checks; each message starts with the field path so errors point at the line."""
        problems = list(_naming_problems(self))
        if problems:
            raise ValueError(problems[0])
        return self

    @property
    def model_memory_tier(self) -> MemoryTier:
        """The tier named by `model_tier` (validated to exist)."""
        return next(tier for tier in self.memory_tiers if tier.name == self.model_tier)


def join_allowed(values: typing.Iterable[str]) -> str:
    return ", ".join(values) or "none"


def _naming_problems(profile: DeviceProfile) -> typing.Iterator[str]:
    """Names that must refer to toolkit.core.formats or to this profile's own tiers, in field order."""
    tier_names = [tier.name for tier in profile.memory_tiers]
    for index, name in enumerate(tier_names):
        if name in tier_names[:index]:
            yield f"memory_tiers[{index}].name: duplicate tier name {name!r} (names must be unique)"
    for index, link in enumerate(profile.links):
        for end, tier in enumerate(link.between):
            if tier not in tier_names:
                yield (
                    f"links[{index}].between[{end}]: unknown tier {tier!r} (allowed: {join_allowed(tier_names)})"
                )
    if profile.model_tier not in tier_names:
        yield f"model_tier: unknown tier {profile.model_tier!r} (allowed: {join_allowed(tier_names)})"
    else:
        capacity = profile.model_memory_tier.capacity_gib.value
        if profile.reserved_gib.value >= capacity:
            yield (
                f"reserved_gib.value: {profile.reserved_gib.value:g} GiB reserved leaves nothing of the "
                f"{capacity:g} GiB model tier {profile.model_tier!r} (must be below {capacity:g})"
            )
    if profile.headroom_pct.value >= 100:
        yield f"headroom_pct.value: must be below 100 (got {profile.headroom_pct.value:g})"
    retention = profile.quality_floor.min_accuracy_retention_pct.value
    if retention > 100:
        yield f"quality_floor.min_accuracy_retention_pct.value: must be at most 100 (got {retention:g})"
    for index, runtime in enumerate(profile.runtimes):
        if runtime not in RUNTIMES:
            yield f"runtimes[{index}]: unknown runtime {runtime!r} (allowed: {join_allowed(RUNTIMES)})"
    for index, export_format in enumerate(profile.formats):
        if export_format not in FORMATS:
            yield f"formats[{index}]: unknown format {export_format!r} (allowed: {join_allowed(FORMATS)})"
        elif not any(export_format in RUNTIMES.get(runtime, ()) for runtime in profile.runtimes):
            readers = [runtime for runtime, formats in RUNTIMES.items() if export_format in formats]
            yield (
                f"formats[{index}]: no listed runtime reads {export_format!r} "
                f"(add one of: {join_allowed(readers)} to runtimes)"
            )
    known_formats = [f for f in profile.formats if f in FORMATS]
    schemes = [scheme for f in known_formats for scheme in FORMATS[f]]
    for index, scheme in enumerate(profile.quant_schemes):
        if scheme not in schemes:
            yield (
                f"quant_schemes[{index}]: unknown scheme {scheme!r} for formats "
                f"{join_allowed(known_formats)} (allowed: {join_allowed(schemes)})"
            )
    for index, dtype in enumerate(profile.kv_cache_dtypes):
        if dtype not in KV_CACHE_DTYPES:
            yield (
                f"kv_cache_dtypes[{index}]: unknown KV cache dtype {dtype!r} (allowed: {join_allowed(KV_CACHE_DTYPES)})"
            )
        elif dtype in profile.kv_cache_dtypes[:index]:
            yield f"kv_cache_dtypes[{index}]: {dtype!r} is listed twice"
    if profile.kv_cache_dtype not in KV_CACHE_DTYPES:
        yield (
            f"kv_cache_dtype: unknown KV cache dtype {profile.kv_cache_dtype!r} "
            f"(allowed: {join_allowed(KV_CACHE_DTYPES)})"
        )
    elif profile.kv_cache_dtype not in profile.kv_cache_dtypes:
        yield (
            f"kv_cache_dtype: {profile.kv_cache_dtype!r} is not one of kv_cache_dtypes "
            f"({join_allowed(profile.kv_cache_dtypes)})"
        )


# ---------------------------------------------------------------------------------------------
# Memory budget


def budget_bytes(profile: DeviceProfile) -> int:
    """Bytes of the model tier the deployment may use at all.

    budget = (capacity_gib - reserved_gib) * 2**30, where `reserved_gib` is what the OS,
    desktop, CUDA context and other tenants hold on that tier.
    """
    tier = profile.model_memory_tier
    return tier.capacity_bytes - int(profile.reserved_gib.value * GIB)


def available_bytes(profile: DeviceProfile) -> int:
    """Bytes a memory estimate (weights + KV cache + runtime buffers) must stay under.

    available = budget * (1 - headroom_pct / 100): the headroom absorbs estimator error and
    allocator fragmentation, so "fits" means estimate <= available, not estimate <= budget.
    """
    return int(budget_bytes(profile) * (1 - profile.headroom_pct.value / 100))
