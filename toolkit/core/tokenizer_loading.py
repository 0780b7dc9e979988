"""Loading a checkpoint's tokenizer with transformers, offline rules applied, without a false alarm.

transformers 4.57.3-4.57.x checks every local tokenizer of more than 100,000 tokens for Mistral's faulty
pre-tokenizer regex and, when the checkpoint's config.json was saved by one of those versions, warns
"incorrect regex pattern ... This will lead to incorrect tokenization" whatever the model type (its
version test only exempts configs saved by <= 4.57.2 or >= 5.0). Checkpoints Bedside writes carry 4.57.6,
so Gemma 3 (262,144 tokens; token ids checked equal to llama.cpp's, docs/BENCHMARKS.md) drew the warning.
For model types that are not Mistral's the warning is false and `fix_mistral_regex=False` says so; a
Mistral-family checkpoint keeps transformers' own check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MISTRAL_MODEL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def model_types(folder: str | Path) -> set[str]:
    """The model types config.json in `folder` names (its own and its text model's); empty when unreadable."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(config, dict):
        return set()
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return {value for value in (config.get("model_type"), text.get("model_type")) if isinstance(value, str)}


def load_auto_tokenizer(folder: str | Path, **options: Any) -> Any:
    """`AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **options)`, telling transformers that a
    non-Mistral tokenizer has no Mistral regex to fix (module docstring); the flag is not saved with it."""
    from transformers import AutoTokenizer

    types = model_types(folder)
    quiet = {"fix_mistral_regex": False} if types and not types & MISTRAL_MODEL_TYPES else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **quiet, **options)
    getattr(tokenizer, "init_kwargs", {}).pop("fix_mistral_regex", None)  # not written back by save_pretrained
    return tokenizer
