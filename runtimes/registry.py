"""Which runtime runs an artifact, and the registry of Runner classes by runtime name.

`artifact_format(path)` tells GGUF, ONNX and Hugging Face folders apart; `RUNNERS` maps a runtime
name (toolkit/core/formats.py RUNTIMES) to its Runner class; adding a runtime is one decorated class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtimes.results import RuntimeLoadError
from toolkit.core.formats import FORMAT_RUNTIME
from toolkit.core.vision import MMPROJ_PREFIX

if TYPE_CHECKING:
    from runtimes.runner import Runner

# ----------------------------------------------------------------------------------------------
# Artifact formats and the registry


def model_ggufs(folder: Path) -> list[Path]:
    """The model GGUF files of a folder: every *.gguf except vision projectors (`mmproj-*.gguf`), which are loaded
    beside a model, never as one."""
    return sorted(path for path in folder.glob("*.gguf") if not path.name.startswith(MMPROJ_PREFIX))


def _single_gguf_in(folder: Path) -> Path | None:
    files = model_ggufs(folder)
    if len(files) > 1:
        names = ", ".join(f.name for f in files)
        raise RuntimeLoadError(f"{folder}: several GGUF files ({names}); name the one to load")
    return files[0] if files else None


def artifact_format(path: str | Path) -> str:
    """Format of an artifact: "gguf", "onnx" or "hf"; RuntimeLoadError when it is none of them.

    A .gguf file (or a folder holding exactly one, not counting an `mmproj-*.gguf` beside it) is GGUF; a .onnx
    file or a folder with model.onnx is ONNX; a folder with config.json and *.safetensors is a Hugging Face checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise RuntimeLoadError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix == ".onnx":
            return "onnx"
        raise RuntimeLoadError(f"{path}: unknown artifact type (expected a .gguf or .onnx file, or a folder)")
    if (path / "model.onnx").is_file():
        return "onnx"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf"
    if _single_gguf_in(path) is not None:
        return "gguf"
    projectors = sorted(path.glob(f"{MMPROJ_PREFIX}*.gguf"))
    if projectors:
        raise RuntimeLoadError(
            f"{path}: holds only a vision projector ({projectors[0].name}), not the model GGUF it belongs beside"
        )
    raise RuntimeLoadError(
        f"{path}: no model found (expected a .gguf file, model.onnx, or config.json with *.safetensors)"
    )


FORMAT_LABELS = {"gguf": "a GGUF file", "onnx": "an ONNX export", "hf": "a Hugging Face checkpoint"}

RUNNERS: dict[str, type[Runner]] = {}


def register_runner(cls: type[Runner]) -> type[Runner]:
    """Class decorator: add a Runner to `RUNNERS` under its `name` (one line per new runtime)."""
    RUNNERS[cls.name] = cls
    return cls


def runtime_for_path(path: str | Path) -> str:
    """Registry name of the runtime that runs `path`: .gguf -> llama.cpp, ONNX -> onnxruntime, HF -> torch."""
    return FORMAT_RUNTIME[artifact_format(path)]


def runner_for_path(path: str | Path) -> type[Runner]:
    """The Runner class for `path`, chosen from its format (see `runtime_for_path`)."""
    return RUNNERS[runtime_for_path(path)]


def load_runner(
    path: str | Path,
    runtime: str | None = None,
    *,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    device: str = "auto",
    options: dict[str, Any] | None = None,
) -> Runner:
    """Create and load the runner for `path` (or the named `runtime`), ready to score and generate.

    `options`: keyword arguments of the Runner class (e.g. LlamaCppRunner's kv_cache_dtype, gpu_layers).
    """
    name = runtime or runtime_for_path(path)
    if name not in RUNNERS:
        raise RuntimeLoadError(f"unknown runtime {name!r} (known: {', '.join(sorted(RUNNERS))})")
    return RUNNERS[name](**(options or {})).load(path, n_ctx=n_ctx, n_threads=n_threads, device=device)


def require_format(path: str | Path, expected: str, runtime: str) -> Path:
    """Check that `path` has the format `runtime` reads; a clear error names the right runtime if not."""
    path = Path(path)
    found = artifact_format(path)
    if found != expected:
        raise RuntimeLoadError(
            f"{path}: {FORMAT_LABELS[found]} cannot run on {runtime}; use runtime {FORMAT_RUNTIME[found]}"
        )
    return path
