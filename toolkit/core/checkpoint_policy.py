"""What a checkpoint folder may ask of the code that loads it: never to run its own Python.

A Hugging Face folder asks for custom code through `auto_map` (or `custom_pipelines`) in one of its
config files: transformers then imports the folder's `*.py`, after an interactive prompt, or at once
when its caller passes `trust_remote_code=True`. Bedside refuses such folders before anything loads
them, here, in one place: `toolkit.model.source.resolve_model_dir` (every `--model`), the artifact
resolver of eval/run, the runtimes and the exporters all call `refuse_custom_code`, and every
`from_pretrained` passes `trust_remote_code=False` as well (tests/test_input_handling.py checks both).
"""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.core.errors import BedsideError

# Keys through which a config file asks transformers to import the folder's own code.
CUSTOM_CODE_KEYS = ("auto_map", "custom_pipelines")
# The config files transformers reads with that meaning (`*config.json` also covers processors and
# feature extractors); tokenizer.json and the weights are never scanned.
CONFIG_GLOB = "*config.json"
MAX_CONFIG_BYTES = 16 << 20  # a config file is a few KiB; anything larger is not one


def custom_code_requests(folder: Path) -> list[str]:
    """Each config file of `folder` that asks for custom code, as "file: key" (empty when none does)."""
    found: list[str] = []
    for path in sorted(Path(folder).glob(CONFIG_GLOB)):
        if not path.is_file():
            continue
        config = _read_config(path)
        found.extend(f"{path.name}: {key}" for key in CUSTOM_CODE_KEYS if config.get(key))
    return found


def refuse_custom_code(folder: Path) -> None:
    """Raise BedsideError when `folder` asks for custom code (`auto_map`): Bedside never runs a model's own code."""
    requests = custom_code_requests(folder)
    if requests:
        raise BedsideError(
            f"model '{folder}' needs custom code ({'; '.join(requests)}): Bedside never runs a checkpoint's "
            "own Python (remote code); use a checkpoint of a supported architecture without auto_map"
        )


def _read_config(path: Path) -> dict[str, object]:
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise BedsideError(f"{path} is {path.stat().st_size:,} bytes: too large for a config file")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise BedsideError(f"{path} is not valid JSON ({error}): pass a Hugging Face checkpoint") from None
    if not isinstance(config, dict):
        raise BedsideError(f"{path} is not a JSON object: pass a Hugging Face checkpoint")
    return config
