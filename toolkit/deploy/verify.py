"""`bedside verify BUNDLE`: check a deployment bundle on the machine that will run it.

Why: between the build host and the hospital's device a bundle is copied, unpacked and perhaps
altered; verify proves it is the bundle that was validated and that it runs within the profile here.

Checks, each PASS/FAIL with number and threshold:
- `signature` (only with `--trusted-key`): manifest.json.sig is the trusted key's Ed25519 signature of
  manifest.json (toolkit.deploy.signing); unsigned, signed by another key, or changed after signing fails;
- `sha256 <path>` for every file in manifest.json (`files`): a normalised relative path inside the
  bundle (`../x` or `/etc/x` fails unread), present as a regular file, same sha256 (a truncated or
  tampered file fails with its path); `unlisted files`: no file beside the manifest's (and its
  signature); `symlinks and special files`: none anywhere in the bundle (never followed);
- `load`: the model loads on the local runtime named in runtime.json, with its context and (llama.cpp) its
  KV-cache precision, flash attention, KV offload and GPU layers; the runtime
  settings come from the hashed runtime.json only (never the manifest's copy), its `model` must be a
  listed path (a folder model, as ONNX exports are, listed file by file), and nothing is loaded
  unless the signature and every file check passed;
- `smoke prompt`: greedy generation from the bundle's smoke prompt yields at least one token;
- `peak memory`: peak memory of the runtime in a child process (runtimes.measure) with the KV cache
  filled to the profile's context, at runtime.json's KV precision and placement, against the profile's budget (the `--profile` given, else the
  profile recorded in the manifest).

A .tar.gz is checked member by member before anything is extracted (filter="data" alone is not
enough on Python < 3.11.13, CVE-2025-4517): only regular files and folders with normalised relative
names inside one top folder, each named once; no links, devices or sparse files; the total size within
the manifest's `sizes` (plus MANIFEST_SLACK_BYTES), MAX_ARCHIVE_BYTES and the free space of the
temporary folder. The archive is then unpacked file by file with O_NOFOLLOW (the checks and the writing are
toolkit.core.safe_tar's, shared with the benchmarks' sdist extraction).
Bad input (missing path, not a bundle, unsafe or malformed archive, malformed manifest, unknown
profile, bad key file) is a BedsideError (exit 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtimes import RuntimeLoadError, load_runner
from runtimes.llamacpp_runner import runner_options
from runtimes.measure import MeasureJob, measure_in_child
from toolkit.core.errors import BedsideError
from toolkit.core.safe_tar import RefusedMember, check_members, is_safe_relative_path, write_members
from toolkit.core.units import GIB, MIB
from toolkit.core.vision import IMAGE_MARKER
from toolkit.deploy.bundle import MANIFEST, RUNTIME_CONFIG, SMOKE_PROMPT, file_sha256
from toolkit.deploy.signing import SIGNATURE, load_public_key, signature_check
from toolkit.plan.memory import memory_budget
from toolkit.target.profiles import load_profile, profile_from_mapping
from toolkit.validate.checks import Check, measured_memory_bytes

SMOKE_TOKENS = 16
MEASURE_DECODE_TOKENS = 16
MAX_ARCHIVE_BYTES = 512 * GIB  # absolute cap on what an archive may unpack to
MAX_ARCHIVE_MEMBERS = 100_000
MAX_MANIFEST_BYTES = 64 * MIB
MANIFEST_SLACK_BYTES = 1 * MIB  # beyond the manifest's sizes: the manifest, its signature, small strays
FREE_SPACE_MARGIN_BYTES = 64 * MIB
SYMLINK_CHECK = "symlinks and special files"
NOT_LOADABLE_FILES = {MANIFEST, SIGNATURE}  # beside the listed files: never hashed by the manifest


@dataclass
class VerifyResult:
    """The checks of one verification and the bundle they were run on."""

    bundle: Path
    checks: list[Check]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)


def _refuse(archive: Path, name: str, why: str) -> BedsideError:
    return BedsideError(f"bundle archive '{archive}' refused: member '{name}' {why}; nothing was extracted")


@dataclass
class _CheckedArchive:
    """An archive's members, every one checked, in archive order; its top folder and manifest.json's bytes."""

    top: str
    members: list[tuple[tarfile.TarInfo, str]]
    manifest: bytes | None


def _checked_members(tar: tarfile.TarFile, archive: Path) -> _CheckedArchive:
    """Check every member of `tar` (toolkit.core.safe_tar's rules) in one pass, reading manifest.json on the way."""
    manifest: list[bytes] = []

    def read_manifest(member: tarfile.TarInfo, name: str, top: str) -> None:
        if name == f"{top}/{MANIFEST}" and member.isfile() and member.size <= MAX_MANIFEST_BYTES:
            stream = tar.extractfile(member)  # read now, while the archive is read forward anyway
            manifest.extend([stream.read()] if stream is not None else [])

    try:
        top, members = check_members(tar, MAX_ARCHIVE_MEMBERS, read_manifest)
    except RefusedMember as error:
        raise _refuse(archive, error.name, error.why) from None
    except ValueError as error:
        raise BedsideError(f"bundle archive '{archive}' refused: {error}; nothing was extracted") from None
    return _CheckedArchive(top, members, manifest[0] if manifest else None)


def _listed_total(manifest: bytes | None) -> int | None:
    """Bytes the manifest lists (`sizes`) plus its own size; None when it lists none (or is no manifest)."""
    if manifest is None:
        return None
    try:
        sizes = json.loads(manifest).get("sizes")
    except (ValueError, AttributeError):
        return None
    if not isinstance(sizes, dict) or not all(
        isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in sizes.values()
    ):
        return None
    return sum(sizes.values()) + len(manifest)


def _check_sizes(checked: _CheckedArchive, archive: Path, folder: Path) -> None:
    total = sum(member.size for member, _ in checked.members if member.isfile())
    listed = _listed_total(checked.manifest)
    if listed is not None and total > listed + MANIFEST_SLACK_BYTES:
        raise BedsideError(
            f"bundle archive '{archive}' refused: it unpacks to {total} bytes, more than its manifest lists "
            f"({listed} bytes); nothing was extracted"
        )
    if total > MAX_ARCHIVE_BYTES:
        raise BedsideError(
            f"bundle archive '{archive}' refused: it unpacks to {total} bytes, more than the cap of "
            f"{MAX_ARCHIVE_BYTES} bytes; nothing was extracted"
        )
    free = shutil.disk_usage(folder).free
    if total + FREE_SPACE_MARGIN_BYTES > free:
        raise BedsideError(
            f"bundle archive '{archive}' unpacks to {total / GIB:.1f} GiB but '{folder}' has {free / GIB:.1f} GiB "
            "free: unpack it yourself (tar xzf) and verify the folder, or set TMPDIR to a larger disk"
        )


@contextlib.contextmanager
def opened_bundle(path: Path) -> Iterator[Path]:
    """Yield the bundle folder: `path` itself, or a .tar.gz checked and unpacked into a temporary folder."""
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
                checked = _checked_members(tar, path)
                _check_sizes(checked, path, Path(folder))
                write_members(tar, checked.members, Path(folder))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise BedsideError(
                f"bundle archive '{path}' cannot be unpacked ({error}): it is truncated or damaged"
            ) from None
        root = Path(folder) / checked.top
        if not root.is_dir():
            raise BedsideError(f"bundle archive '{path}' does not hold a bundle folder")
        yield root


def _manifest_bytes(folder: Path) -> bytes:
    path = folder / MANIFEST
    if path.is_symlink():
        raise BedsideError(
            f"{MANIFEST} in '{folder}' is a symlink: refused (a bundle holds regular files only)"
        )
    if not path.is_file():
        raise BedsideError(f"'{folder}' is not a Bedside bundle: {MANIFEST} is missing")
    try:
        with path.open("rb") as stream:
            data = stream.read(MAX_MANIFEST_BYTES + 1)
    except OSError as error:
        raise BedsideError(f"{MANIFEST} in '{folder}' cannot be read ({error.strerror or error})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise BedsideError(
            f"{MANIFEST} in '{folder}' is over {MAX_MANIFEST_BYTES // MIB} MiB: the bundle is damaged"
        )
    return data


def parse_manifest(data: bytes, folder: Path) -> dict[str, Any]:
    """The manifest of these exact bytes (the ones a signature covers), with its required keys checked."""
    try:
        manifest = json.loads(data)
    except ValueError as error:
        raise BedsideError(
            f"{MANIFEST} in '{folder}' is not valid JSON ({error}): the bundle is damaged"
        ) from None
    missing = [
        key for key in ("files", "profile", "plan") if not isinstance(manifest, dict) or key not in manifest
    ]
    if missing or not isinstance(manifest.get("files"), dict):
        raise BedsideError(
            f"{MANIFEST} in '{folder}' lacks {', '.join(missing) or 'a files map'}: the bundle is damaged"
        )
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """manifest.json of a bundle folder, with its required keys checked."""
    return parse_manifest(_manifest_bytes(folder), folder)


def bundle_entries(folder: Path) -> tuple[set[str], dict[str, str]]:
    """Regular files under `folder` (relative POSIX paths) and the refused entries (path: what it is).

    Never follows a link: a symlinked file or folder is refused, not read, and nothing below it is listed.
    """
    files: set[str] = set()
    refused: dict[str, str] = {}
    pending = [(folder, "")]
    while pending:
        current, prefix = pending.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                relative = prefix + entry.name
                if entry.is_symlink():
                    refused[relative] = "symlink"
                elif entry.is_dir(follow_symlinks=False):
                    pending.append((Path(entry.path), relative + "/"))
                elif entry.is_file(follow_symlinks=False):
                    files.add(relative)
                else:
                    refused[relative] = "special file"
    return files, refused


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _refused_above(relative: str, refused: dict[str, str]) -> str | None:
    """The refused entry at `relative` or at one of its folders, if any."""
    parts = relative.split("/")
    for depth in range(len(parts), 0, -1):
        prefix = "/".join(parts[:depth])
        if prefix in refused:
            return prefix
    return None


def _file_check(
    folder: Path, relative: str, expected: object, files: set[str], refused: dict[str, str], sizes: Any
) -> Check:
    def fail(detail: str) -> Check:
        return Check(f"sha256 {relative}", False, None, None, "==", detail=detail)

    if not is_safe_relative_path(relative):
        return fail(f"{relative} is outside the bundle or not a normalised relative path: refused, not read")
    if not _is_sha256(expected):
        return fail(f"{MANIFEST} lists no sha256 for {relative}")
    if relative not in files:
        link = _refused_above(relative, refused)
        if link is not None:
            return fail(f"{link} is a {refused[link]}: refused, not read")
        return fail(f"{relative} is missing")
    path = folder / relative
    actual = file_sha256(path)
    if actual == expected:
        return Check(f"sha256 {relative}", True, None, None, "==", detail="matches the manifest")
    size = path.stat().st_size
    expected_size = sizes.get(relative) if isinstance(sizes, dict) else None
    truncated = (
        f", {size} of {expected_size} bytes: truncated"
        if isinstance(expected_size, int) and size < expected_size
        else ""
    )
    return fail(
        f"{relative} differs from the manifest (sha256 {actual[:12]} != {str(expected)[:12]}{truncated})"
    )


def hash_checks(folder: Path, manifest: dict[str, Any]) -> list[Check]:
    """One check per listed file (outside the bundle, missing, a link, or sha256 differs), one for files the
    manifest does not list, and one for symlinks and special files anywhere in the bundle."""
    files, refused = bundle_entries(folder)
    checks = [
        _file_check(folder, relative, expected, files, refused, manifest.get("sizes"))
        for relative, expected in sorted(manifest["files"].items())
    ]
    extra = sorted(files - set(manifest["files"]) - NOT_LOADABLE_FILES)
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
    links = sorted(refused)
    checks.append(
        Check(
            SYMLINK_CHECK,
            not links,
            float(len(links)),
            0.0,
            "<=",
            detail=(
                "none"
                if not links
                else "refused, never followed: "
                + ", ".join(f"{name} ({refused[name]})" for name in links[:5])
            ),
        )
    )
    return checks


def read_runtime_config(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """runtime.json of the bundle, from bytes whose sha256 is the manifest's (never the manifest's own copy).

    BedsideError when it is not listed; ValueError when its bytes differ from the listed hash or it is malformed.
    """
    expected = manifest["files"].get(RUNTIME_CONFIG)
    if expected is None:
        raise BedsideError(f"{MANIFEST} in '{folder}' does not list {RUNTIME_CONFIG}: the bundle is damaged")
    path = folder / RUNTIME_CONFIG
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{RUNTIME_CONFIG} is missing or not a regular file")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{RUNTIME_CONFIG} failed its hash check")
    try:
        runtime = json.loads(data)
    except ValueError as error:
        raise ValueError(f"{RUNTIME_CONFIG} is not valid JSON ({error})") from None
    if not isinstance(runtime, dict) or not all(
        isinstance(runtime.get(key), str) for key in ("runtime", "model")
    ):
        raise ValueError(f"{RUNTIME_CONFIG} lacks its runtime or model")
    return runtime


def _why_not_load(
    folder: Path, manifest: dict[str, Any], checks: list[Check]
) -> tuple[dict[str, Any] | None, str]:
    """runtime.json's settings when the model may be loaded, else None and why not."""
    if any(c.name == "signature" and not c.passed for c in checks):
        return None, "the signature check failed: nothing of this bundle is trusted"
    try:
        runtime = read_runtime_config(folder, manifest)
    except ValueError as error:
        return None, str(error)
    model = runtime["model"].rstrip("/")
    if not is_safe_relative_path(model):
        return None, f"{RUNTIME_CONFIG}'s model '{runtime['model']}' is outside the bundle"
    listed = [name for name in manifest["files"] if name == model or name.startswith(model + "/")]
    if not listed:
        return None, f"{RUNTIME_CONFIG}'s model '{model}' is not listed in {MANIFEST}"
    model_failed = [
        c.name[len("sha256 ") :]
        for c in checks
        if not c.passed and c.name.startswith("sha256 ") and c.name[len("sha256 ") :] in listed
    ]
    if model_failed:
        return None, f"{model_failed[0]} failed its hash check"
    failed = [c.name for c in checks if not c.passed]
    if failed:
        return None, f"the bundle failed {failed[0]}: only a bundle whose every file checks out is loaded"
    return {**runtime, "model": model}, ""


def _profile(manifest: dict[str, Any], profile: str | None) -> Any:
    if profile is not None:
        return load_profile(profile)
    return profile_from_mapping(manifest["profile"], f"{MANIFEST} profile")


def _smoke_image(folder: Path, name: Any) -> Path | None:
    """The bundle's smoke image (runtime.json `smoke_image`), refused when it leads outside the bundle."""
    if not name:
        return None
    if not isinstance(name, str) or not is_safe_relative_path(name):
        raise ValueError(f"runtime.json smoke_image {name!r} is not a path inside the bundle")
    return folder / name


def runtime_checks(
    folder: Path, runtime: dict[str, Any], device_profile: Any, n_threads: int | None
) -> list[Check]:
    """Load, smoke prompt and peak memory on the local runtime, with the settings of runtime.json (`runtime`)."""

    model_path = folder / runtime["model"]
    context = int(device_profile.context_length)
    threads = n_threads or runtime.get("threads")
    options = runner_options(runtime) if runtime["runtime"] == "llama.cpp" else {}  # KV precision, placement
    checks: list[Check] = []
    try:
        with load_runner(
            model_path, runtime["runtime"], n_ctx=min(context, 512), n_threads=threads, options=options
        ) as runner:
            checks.append(
                Check("load", True, None, None, "", detail=f"{runtime['runtime']} loaded {runtime['model']}")
            )
            prompt = runtime.get("smoke_prompt") or SMOKE_PROMPT
            image = _smoke_image(folder, runtime.get("smoke_image"))
            content = f"{IMAGE_MARKER}\n{prompt}" if image is not None else prompt
            result = runner.generate(
                [{"role": "user", "content": content}], max_new_tokens=SMOKE_TOKENS, image=image
            )
            text = result.text.strip().replace("\n", " ")
            checks.append(
                Check(
                    "smoke prompt",
                    len(result.token_ids) >= 1,
                    float(len(result.token_ids)),
                    1.0,
                    ">=",
                    "tokens",
                    detail=(f"about {runtime.get('smoke_image')}, " if image is not None else "") + f"answer: {text[:80]!r}",
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
                context=context,
                decode_tokens=min(MEASURE_DECODE_TOKENS, context - 1),
                n_threads=threads,
                runner_options=options,
            ),
        )
    except RuntimeLoadError as error:
        checks.append(Check("peak memory", False, None, float(budget), "<=", "bytes", detail=str(error)))
        return checks
    peak = measured_memory_bytes(
        {"peak_rss_bytes": measured.peak_rss_bytes, "peak_vram_bytes": measured.peak_vram_bytes},
        device_profile,
    )
    # A profile that budgets GPU memory is not verified by a CPU run's RSS (toolkit.validate.checks).
    vram_missing = device_profile.model_memory_tier.kind == "device" and not measured.peak_vram_bytes
    checks.append(
        Check(
            "peak memory",
            peak <= budget and not vram_missing,
            float(peak),
            float(budget),
            "<=",
            "bytes",
            detail=(
                f"RSS measured where VRAM was budgeted (ran on {measured.device}); " if vram_missing else ""
            )
            + f"KV cache ({runtime.get('kv_cache_dtype') or 'f16'}) filled to {context} tokens on "
            f"{measured.device}; "
            f"decode {measured.decode_tokens_per_s:.1f} tok/s on this host",
        )
    )
    return checks


def verify_bundle(
    bundle: Path, profile: str | None = None, n_threads: int | None = None, trusted_key: Path | None = None
) -> VerifyResult:
    """Run every check on `bundle` (folder or .tar.gz); BedsideError for bad input.

    With `trusted_key` (a PEM public key) the first check is `signature`, and nothing is loaded unless it passes.
    """
    bundle = Path(bundle)
    trusted = load_public_key(trusted_key) if trusted_key is not None else None
    with opened_bundle(bundle) as folder:
        manifest_bytes = _manifest_bytes(folder)
        manifest = parse_manifest(manifest_bytes, folder)
        device_profile = _profile(manifest, profile)
        if RUNTIME_CONFIG not in manifest["files"]:
            raise BedsideError(f"'{bundle}' {MANIFEST} does not list {RUNTIME_CONFIG}: the bundle is damaged")
        checks = [signature_check(folder, manifest_bytes, trusted)] if trusted is not None else []
        checks.extend(hash_checks(folder, manifest))
        runtime, why_not = _why_not_load(folder, manifest, checks)
        if runtime is None:
            checks.append(Check("load", False, None, None, "", detail=f"not run: {why_not}"))
        else:
            checks.extend(runtime_checks(folder, runtime, device_profile, n_threads))
    return VerifyResult(bundle, checks)
