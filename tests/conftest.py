"""Shared pytest fixtures. Keep this file small and generic: only what several test modules need."""

import os
from pathlib import Path

import pytest

# Tests run offline, like the product: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo checkpoint folder (`--model demo`); skips the test when set-up has not built it."""
    from toolkit import paths
    from toolkit.demo_model import REQUIRED_FILES

    folder = paths.demo_model_dir()
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"demo model not built at {folder} (missing {', '.join(missing)}): run `make setup`")
    return folder


@pytest.fixture(scope="session")
def demo_gguf_path() -> Path:
    """The original Q4_1 GGUF of the demo model; skips the test when set-up has not extracted it."""
    from toolkit import paths

    path = paths.demo_gguf_path()
    if not path.is_file():
        pytest.skip(f"demo GGUF not found at {path}: run `make setup`")
    return path
