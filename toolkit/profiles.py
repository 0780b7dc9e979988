"""Device profiles: a typed description of a target (memory tiers, compute, runtimes, floors).

Every figure is a `Figure` with the value and where it came from (datasheet URL or the command
that measured it), so a profile can be audited line by line. Profiles live as YAML files in
device_profiles/ (or anywhere the user points to); "host" is measured on the running machine.
A wrong profile is a user error: `load_profile` turns it into one `BedsideError` line naming the
file, the field path and the allowed values.
"""

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toolkit import SCHEMA_VERSION
from toolkit.errors import BedsideError
from toolkit.paths import PROFILES_DIR, REPO_ROOT
from toolkit.schemes import FORMATS, KV_CACHE_DTYPES, RUNTIMES

GIB = 1024**3
GB = 1e9
HOST_PROFILE_NAME = "host"
PROFILE_SUFFIXES = (".yaml", ".yml")


class Strict(BaseModel):
    """Base of every profile part: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Figure(Strict):
    """A number with its source."""

    value: float = Field(ge=0, allow_inf_nan=False)
    source: str = Field(min_length=3)


class MemoryTier(Strict):
    """One level of the memory hierarchy the model can live in (device, unified, host)."""

    name: str = Field(min_length=1)
    kind: Literal["unified", "device", "host"]
    capacity_gib: Figure
    bandwidth_gbs: Figure  # GB/s (1e9 bytes per second), peak (datasheet) unless the source says measured
    latency_ns: Figure
    # What a streaming read really reaches (STREAM-like); speed models prefer it over the peak.
    sustained_bandwidth_gbs: Figure | None = None

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
    """A path between two tiers (e.g. PCIe from host RAM to VRAM)."""

    name: str = Field(min_length=1)
    between: tuple[str, str]
    bandwidth_gbs: Figure
    latency_ns: Figure


class Compute(Strict):
    """Where the matrix maths runs."""

    accelerator: Literal["cuda", "cpu"]
    architecture: str = Field(min_length=1)  # e.g. sm_87, x86_64-avx2
    cores: Figure  # CUDA cores or CPU cores
    fp16_tflops: Figure
    int8_tops: Figure
    cpu_model: str | None = None  # the host CPU, which also runs llama.cpp's CPU fallback
    cpu_features: list[str] = []  # ISA extensions the runtimes pick kernels by (avx2, avx512f, amx_tile...)


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
    context_length: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    kv_cache_dtype: str
    quality_floor: QualityFloor
    min_decode_tokens_per_s: Figure
    assumptions: list[str] = []  # what the figures take for granted (OS image, power mode, ...)

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


def _allowed(values: typing.Iterable[str]) -> str:
    return ", ".join(values) or "none"


def _naming_problems(profile: DeviceProfile) -> typing.Iterator[str]:
    """Names that must refer to toolkit.schemes or to this profile's own tiers, in field order."""
    tier_names = [tier.name for tier in profile.memory_tiers]
    for index, name in enumerate(tier_names):
        if name in tier_names[:index]:
            yield f"memory_tiers[{index}].name: duplicate tier name {name!r} (names must be unique)"
    for index, link in enumerate(profile.links):
        for end, tier in enumerate(link.between):
            if tier not in tier_names:
                yield (
                    f"links[{index}].between[{end}]: unknown tier {tier!r} (allowed: {_allowed(tier_names)})"
                )
    if profile.model_tier not in tier_names:
        yield f"model_tier: unknown tier {profile.model_tier!r} (allowed: {_allowed(tier_names)})"
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
            yield f"runtimes[{index}]: unknown runtime {runtime!r} (allowed: {_allowed(RUNTIMES)})"
    for index, export_format in enumerate(profile.formats):
        if export_format not in FORMATS:
            yield f"formats[{index}]: unknown format {export_format!r} (allowed: {_allowed(FORMATS)})"
        elif not any(export_format in RUNTIMES.get(runtime, ()) for runtime in profile.runtimes):
            readers = [runtime for runtime, formats in RUNTIMES.items() if export_format in formats]
            yield (
                f"formats[{index}]: no listed runtime reads {export_format!r} "
                f"(add one of: {_allowed(readers)} to runtimes)"
            )
    known_formats = [f for f in profile.formats if f in FORMATS]
    schemes = [scheme for f in known_formats for scheme in FORMATS[f]]
    for index, scheme in enumerate(profile.quant_schemes):
        if scheme not in schemes:
            yield (
                f"quant_schemes[{index}]: unknown scheme {scheme!r} for formats "
                f"{_allowed(known_formats)} (allowed: {_allowed(schemes)})"
            )
    if profile.kv_cache_dtype not in KV_CACHE_DTYPES:
        yield (
            f"kv_cache_dtype: unknown KV cache dtype {profile.kv_cache_dtype!r} "
            f"(allowed: {_allowed(KV_CACHE_DTYPES)})"
        )


# ---------------------------------------------------------------------------------------------
# Memory budget


def budget_bytes(profile: DeviceProfile) -> int:
    """Bytes of the model tier the deployment may use at all.

    budget = capacity_gib * 2**30 - reserved_gib * 2**30, where `reserved_gib` is what the OS,
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


# ---------------------------------------------------------------------------------------------
# Loading


def list_profiles() -> list[str]:
    """Names `load_profile` accepts: the shipped device_profiles/*.yaml, then "host"."""
    shipped = sorted(
        path.stem for path in PROFILES_DIR.glob("*") if path.suffix in PROFILE_SUFFIXES and path.is_file()
    )
    return [*shipped, HOST_PROFILE_NAME]


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by shipped name (device_profiles/<name>.yaml), "host" (measured now), or YAML path."""
    if name_or_path == HOST_PROFILE_NAME:
        from toolkit.host_profile import detect_host_profile

        return detect_host_profile()
    return load_profile_file(_resolve_profile_path(name_or_path))


def _resolve_profile_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    looks_like_path = candidate.suffix in PROFILE_SUFFIXES or "/" in name_or_path or "\\" in name_or_path
    if candidate.is_file():
        return candidate
    if looks_like_path:
        raise BedsideError(f"profile file not found: {name_or_path}")
    for suffix in PROFILE_SUFFIXES:
        shipped = PROFILES_DIR / f"{name_or_path}{suffix}"
        if shipped.is_file():
            return shipped
    raise BedsideError(
        f"unknown device profile {name_or_path!r} (available: {_allowed(list_profiles())}; "
        "or give the path to a profile .yaml)"
    )


def display_path(path: Path) -> str:
    """A path as the user should read it: relative to the repository or the working directory."""
    resolved = path.resolve()
    for base in (REPO_ROOT, Path.cwd()):
        try:
            return str(resolved.relative_to(base))
        except ValueError:
            continue
    return str(path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_profile_file(path: Path) -> DeviceProfile:
    """Parse and validate one profile YAML; any problem becomes a one-line BedsideError."""
    where = display_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BedsideError(f"{where}: cannot read profile ({error.__class__.__name__}: {error})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as error:
        raise BedsideError(f"{where}: {_describe_yaml_error(error)}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise BedsideError(f"{where}: expected a mapping of profile fields, got {got}")
    return profile_from_mapping(data, where)


def profile_from_mapping(data: dict[str, Any], where: str) -> DeviceProfile:
    """Validate already-parsed profile data; `where` names its origin in the error line."""
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as error:
        raise BedsideError(describe_validation_error(error, where)) from None


def profile_to_yaml(profile: DeviceProfile) -> str:
    """The profile as YAML that `load_profile` reads back unchanged (e.g. to freeze a host profile)."""
    return yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        problem = error.problem or error.context or "syntax error"
        if mark is not None:
            return f"malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {_one_line(problem)}"
        return f"malformed YAML: {_one_line(problem)}"
    return f"malformed YAML: {_one_line(str(error))}"


def _format_location(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return options[0] if len(options) == 1 else annotation
    return annotation


def _keys_allowed_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model found by walking `loc` down from DeviceProfile ([] if not a model)."""
    current: Any = DeviceProfile
    for part in loc:
        current = _strip_optional(current)
        if isinstance(part, int):
            args = typing.get_args(current)
            current = args[0] if args else None
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return []
    current = _strip_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_validation_error(error: ValidationError, where: str) -> str:
    """Turn pydantic's multi-line report into `where: field.path: what is wrong (allowed: ...)`."""
    errors = error.errors()
    first = errors[0]
    loc = tuple(first["loc"])
    kind = first["type"]
    ctx = first.get("ctx") or {}
    given = first.get("input")
    if kind == "missing":
        message = "missing required field"
    elif kind == "extra_forbidden":
        message = f"unknown key {loc[-1]!r} (allowed: {_allowed(_keys_allowed_at(loc[:-1]))})"
    elif kind == "literal_error":
        message = f"unknown value {_short_repr(given)} (allowed: {ctx.get('expected', '?')})"
    elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        message = f"{first['msg'].replace('Input should be', 'must be')} (got {_short_repr(given)})"
    elif kind in ("model_type", "dict_type") and _keys_allowed_at(loc):
        message = f"expected a mapping with keys {_allowed(_keys_allowed_at(loc))} (got {_short_repr(given)})"
    elif kind == "value_error" and "error" in ctx:
        message = str(ctx["error"])  # our own checks already start with their field path
    else:
        message = f"{first['msg']} (got {_short_repr(given)})"
    path = _format_location(loc)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    located = f"{path}: {message}" if path else message
    return _one_line(f"{where}: {located}{more}")
