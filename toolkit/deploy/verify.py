"""`bedside verify BUNDLE`: check a deployment bundle on the machine that will run it.

Why: between the build host and the hospital's device a bundle is copied, unpacked and perhaps
altered; verify proves it is the bundle that was validated and that it runs within the profile here.

Checks, each PASS/FAIL with number and threshold:
- `sha256 <path>` for every file in manifest.json (`files`): present, same sha256 (a truncated or
  tampered file fails with its path); `unlisted files`: no file beside the manifest's;
- `load`: the model loads on the local runtime named in runtime.json, with its context;
- `smoke prompt`: greedy generation from the bundle's smoke prompt yields at least one token;
- `peak memory`: peak memory of the runtime in a child process (runtimes.measure) with the KV cache
  filled to the profile's context, against the profile's budget (the `--profile` given, else the
  profile recorded in the manifest).
Bad input (missing path, not a bundle, malformed manifest, unknown profile) is a BedsideError (exit 2).
"""

from __future__ import annotations

import contextlib
import json
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes import RuntimeLoadError, load_runner
from runtimes.measure import MeasureJob, measure_in_child
from toolkit.core.errors import BedsideError
from toolkit.deploy.bundle import MANIFEST, RUNTIME_CONFIG, SMOKE_PROMPT, file_sha256
from toolkit.plan.memory import memory_budget
from toolkit.target.profiles import load_profile, profile_from_mapping
from toolkit.validate.checks import Check, measured_memory_bytes

SMOKE_TOKENS = 16
MEASURE_DECODE_TOKENS = 16


@dataclass
class VerifyResult:
    """The checks of one verification and the bundle they were run on."""

    bundle: Path
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


@contextlib.contextmanager
def opened_bundle(path: Path) -> Iterator[Path]:
    """Yield the bundle folder: `path` itself, or a .tar.gz unpacked into a temporary folder."""
    if not path.exists():
        raise BedsideError(f"bundle '{path}' not found: pass a bundle folder or its .tar.gz")
    if path.is_dir():
        yield path
        return
    if not tarfile.is_tarfile(path):
        raise BedsideError(f"bundle '{path}' is neither a folder nor a readable .tar.gz archive")
    with tempfile.TemporaryDirectory(prefix="bedside-verify-") as folder:
        try:
            with tarfile.open(path, "r:*") as tar:
                tar.extractall(folder, filter="data")  # refuses absolute paths, '..' and device files
        except (tarfile.TarError, OSError, EOFError) as error:
            raise BedsideError(
                f"bundle archive '{path}' cannot be unpacked ({error}): it is truncated or damaged"
            ) from None
        roots = [p for p in Path(folder).iterdir() if p.is_dir()]
        if len(roots) != 1:
            raise BedsideError(f"bundle archive '{path}' does not hold exactly one bundle folder")
        yield roots[0]


def read_manifest(folder: Path) -> dict[str, Any]:
    """manifest.json of a bundle folder, with its required keys checked."""
    path = folder / MANIFEST
    if not path.is_file():
        raise BedsideError(f"'{folder}' is not a Bedside bundle: {MANIFEST} is missing")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BedsideError(
            f"{MANIFEST} in '{folder}' is not valid JSON ({error}): the bundle is damaged"
        ) from None
    missing = [
        key
        for key in ("files", "profile", "plan", "runtime")
        if not isinstance(manifest, dict) or key not in manifest
    ]
    if missing or not isinstance(manifest.get("files"), dict):
        raise BedsideError(
            f"{MANIFEST} in '{folder}' lacks {', '.join(missing) or 'a files map'}: the bundle is damaged"
        )
    return manifest


def hash_checks(folder: Path, manifest: dict[str, Any]) -> list[Check]:
    """One check per listed file (missing, or sha256 differs) and one for files the manifest does not list."""
    checks = []
    for relative, expected in sorted(manifest["files"].items()):
        path = folder / relative
        if not path.is_file():
            checks.append(
                Check(f"sha256 {relative}", False, None, None, "==", detail=f"{relative} is missing")
            )
            continue
        actual = file_sha256(path)
        size = path.stat().st_size
        expected_size = manifest.get("sizes", {}).get(relative)
        detail = (
            "matches the manifest"
            if actual == expected
            else (
                f"{relative} differs from the manifest (sha256 {actual[:12]} != {str(expected)[:12]}"
                + (
                    f", {size} of {expected_size} bytes: truncated"
                    if expected_size and size < expected_size
                    else ""
                )
                + ")"
            )
        )
        checks.append(Check(f"sha256 {relative}", actual == expected, None, None, "==", detail=detail))
    listed = set(manifest["files"]) | {MANIFEST}
    extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    extra = [name for name in extra if name not in listed]
    checks.append(
        Check(
            "unlisted files",
            not extra,
            float(len(extra)),
            0.0,
            "<=",
            detail=("none" if not extra else "not in the manifest: " + ", ".join(extra[:5])),
        )
    )
    return checks


def _profile(manifest: dict[str, Any], profile: str | None) -> Any:
    if profile is not None:
        return load_profile(profile)
    return profile_from_mapping(manifest["profile"], f"{MANIFEST} profile")


def runtime_checks(
    folder: Path, manifest: dict[str, Any], device_profile: Any, n_threads: int | None
) -> list[Check]:
    """Load, smoke prompt and peak memory on the local runtime."""

    runtime = manifest["runtime"]
    model_path = folder / runtime["model"]
    context = int(device_profile.context_length)
    threads = n_threads or runtime.get("threads")
    checks: list[Check] = []
    try:
        with load_runner(
            model_path, runtime["runtime"], n_ctx=min(context, 512), n_threads=threads
        ) as runner:
            checks.append(
                Check("load", True, None, None, "", detail=f"{runtime['runtime']} loaded {runtime['model']}")
            )
            prompt = runtime.get("smoke_prompt") or SMOKE_PROMPT
            result = runner.generate([{"role": "user", "content": prompt}], max_new_tokens=SMOKE_TOKENS)
            text = result.text.strip().replace("\n", " ")
            checks.append(
                Check(
                    "smoke prompt",
                    len(result.token_ids) >= 1,
                    float(len(result.token_ids)),
                    1.0,
                    ">=",
                    "tokens",
                    detail=f"answer: {text[:80]!r}",
                )
            )
    except (RuntimeLoadError, ValueError, OSError) as error:
        checks.append(Check("load", False, None, None, "", detail=f"{runtime['model']}: {error}"))
        return checks
    budget = memory_budget(device_profile)
    try:
        measured = measure_in_child(
            runtime["runtime"],
            model_path,
            MeasureJob(
                context=context, decode_tokens=min(MEASURE_DECODE_TOKENS, context - 1), n_threads=threads
            ),
        )
    except RuntimeLoadError as error:
        checks.append(Check("peak memory", False, None, float(budget), "<=", "bytes", detail=str(error)))
        return checks
    peak = measured_memory_bytes(
        {"peak_rss_bytes": measured.peak_rss_bytes, "peak_vram_bytes": measured.peak_vram_bytes},
        device_profile,
    )
    checks.append(
        Check(
            "peak memory",
            peak <= budget,
            float(peak),
            float(budget),
            "<=",
            "bytes",
            detail=f"KV cache filled to {context} tokens on {measured.device}; "
            f"decode {measured.decode_tokens_per_s:.1f} tok/s on this host",
        )
    )
    return checks


def verify_bundle(bundle: Path, profile: str | None = None, n_threads: int | None = None) -> VerifyResult:
    """Run every check on `bundle` (folder or .tar.gz); BedsideError for bad input."""
    bundle = Path(bundle)
    with opened_bundle(bundle) as folder:
        manifest = read_manifest(folder)
        device_profile = _profile(manifest, profile)
        if not (folder / RUNTIME_CONFIG).is_file() and RUNTIME_CONFIG not in manifest["files"]:
            raise BedsideError(f"'{bundle}' has no {RUNTIME_CONFIG}: the bundle is damaged")
        checks = hash_checks(folder, manifest)
        model_relative = manifest["runtime"]["model"]
        model_failed = [
            c
            for c in checks
            if not c.passed
            and c.name.startswith("sha256 ")
            and (c.name[7:] == model_relative or c.name[7:].startswith(model_relative.rstrip("/") + "/"))
        ]
        if model_failed:
            checks.append(
                Check(
                    "load",
                    False,
                    None,
                    None,
                    "",
                    detail=f"not run: {model_failed[0].name[7:]} failed its hash check",
                )
            )
        else:
            checks.extend(runtime_checks(folder, manifest, device_profile, n_threads))
    return VerifyResult(bundle, checks)
