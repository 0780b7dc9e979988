"""Device profiles: load a target from device_profiles/*.yaml, a user's YAML file, or "host" (measured now).

Every figure is a `Figure` with the value and where it came from (toolkit/target/schema.py). A wrong
profile is a user error: `load_profile` turns it into one `BedsideError` line naming the file, the
field path and the allowed values.
"""

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from toolkit.core.errors import BedsideError
from toolkit.core.paths import PROFILES_DIR, REPO_ROOT
from toolkit.target.host import detect_host_profile
from toolkit.target.schema import (
    GB,
    HOST_PROFILE_NAME,
    Compute,
    DeviceProfile,
    Figure,
    Link,
    MemoryTier,
    QualityFloor,
    Strict,
    available_bytes,
    budget_bytes,
    join_allowed,
)

PROFILE_SUFFIXES = (".yaml", ".yml")

__all__ = [
    "GB", "HOST_PROFILE_NAME", "Compute", "DeviceProfile", "Figure", "Link", "MemoryTier", "QualityFloor",
    "Strict", "available_bytes", "budget_bytes",
]  # fmt: skip


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
        f"unknown device profile {name_or_path!r} (available: {join_allowed(list_profiles())}; "
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
        message = f"unknown key {loc[-1]!r} (allowed: {join_allowed(_keys_allowed_at(loc[:-1]))})"
    elif kind == "literal_error":
        message = f"unknown value {_short_repr(given)} (allowed: {ctx.get('expected', '?')})"
    elif kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        message = f"{first['msg'].replace('Input should be', 'must be')} (got {_short_repr(given)})"
    elif kind in ("model_type", "dict_type") and _keys_allowed_at(loc):
        message = f"expected a mapping with keys {join_allowed(_keys_allowed_at(loc))} (got {_short_repr(given)})"
    elif kind == "value_error" and "error" in ctx:
        message = str(ctx["error"])  # our own checks already start with their field path
    else:
        message = f"{first['msg']} (got {_short_repr(given)})"
    path = _format_location(loc)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    located = f"{path}: {message}" if path else message
    return _one_line(f"{where}: {located}{more}")
