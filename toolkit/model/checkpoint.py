"""The gate before a checkpoint's weights load: the folder resolves, asks for no custom code, and its
config.json describes the weights it sits beside.

Why the last check: transformers builds the model the config describes and fills every tensor the
weights lack with random values (a warning on stderr, nothing more), so a BERT or Qwen2 config over
Llama weights "runs" and answers with noise. Here the tensors the architecture tables
(toolkit/model/architectures.py, through `toolkit.model.facts`) expect are compared with the
safetensors headers, names and shapes, before anything loads: header reads only, no tensor data.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from toolkit.core.errors import BedsideError
from toolkit.model.architectures import MULTIMODAL
from toolkit.model.facts import ModelFacts, read_facts
from toolkit.model.source import resolve_model_dir

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header
SHOWN = 3  # tensor names quoted in an error


def loadable_checkpoint(model: str | Path) -> Path:
    """The folder of `model` ("demo" or a checkpoint folder) once it may be loaded; BedsideError naming why not."""
    folder = resolve_model_dir(model, need_weights=True)  # refuses custom code (auto_map) too
    check_weights_match_config(folder)
    return folder


def expected_tensors(facts: ModelFacts) -> dict[str, tuple[int, ...]]:
    """Full parameter names (as transformers 4.57 names them) and shapes of the model `facts` describes."""
    expected = {t.name: t.shape for t in facts.global_tensors}
    for index in range(facts.num_layers):
        expected |= {f"{facts.layers_path}.{index}.{t.name}": t.shape for t in facts.layer_tensors}
    vision = facts.vision
    if vision is not None:
        ends = vision.embedding_tensors + vision.final_tensors
        expected |= {f"{vision.tower_path}.{t.name}": t.shape for t in ends}
        for index in range(vision.num_layers):
            expected |= {f"{vision.layers_path}.{index}.{t.name}": t.shape for t in vision.layer_tensors}
        expected |= {f"{vision.projector_path}.{t.name}": t.shape for t in vision.projector_tensors}
    return expected


def safetensors_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every `*.safetensors` file of `folder`, from the headers alone."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        shapes.update(_header_shapes(path))
    return shapes


def check_weights_match_config(folder: Path) -> None:
    """Refuse a folder whose config.json describes other tensors than its safetensors hold.

    Missing tensors (the config's architecture needs them, the weights lack them) and tensors whose shape
    differs are refused; extra tensors (buffers such as rotary inv_freq) are not. Pre-quantized
    checkpoints (GPTQ/AWQ `quantization_config`) store other tensor names and are not compared.
    """
    folder = Path(folder)
    facts = read_facts(str(folder))  # BedsideError for an unsupported architecture (e.g. a BERT config)
    if "quantization" in facts.extra:
        return
    found = _renamed(safetensors_shapes(folder), facts)
    config = folder / "config.json"
    described = f"{facts.architecture}, model_type {facts.extra.get('model_type')!r}"
    missing = [name for name in expected_tensors(facts) if _lookup(found, name) is None]
    if missing:
        shown = ", ".join(repr(name) for name in missing[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise BedsideError(
            f"{config} does not match the weights beside it: the config ({described}) needs "
            f"{len(missing)} tensors the *.safetensors lack ({shown}{more}); transformers would fill them "
            "with random values: use the config.json that came with these weights"
        )
    for name, shape in expected_tensors(facts).items():
        stored = _lookup(found, name)
        if stored is not None and tuple(stored) != tuple(shape):
            raise BedsideError(
                f"{config} does not match the weights beside it: tensor '{name}' is "
                f"{_shape(stored)} in the *.safetensors but the config ({described}) makes it {_shape(shape)}: "
                "use the config.json that came with these weights"
            )


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _lookup(found: dict[str, tuple[int, ...]], name: str) -> tuple[int, ...] | None:
    """The stored shape of `name`; transformers also loads a base model saved without its `model.` prefix."""
    if name in found:
        return found[name]
    return found.get(name.removeprefix("model."))


def _renamed(shapes: dict[str, tuple[int, ...]], facts: ModelFacts) -> dict[str, tuple[int, ...]]:
    """Checkpoint keys under transformers 4.57's names (older llava-hf checkpoints use other prefixes)."""
    wrapper = MULTIMODAL.get(facts.architecture)
    if wrapper is None:
        return shapes
    renamed = {}
    for key, shape in shapes.items():
        for pattern, replacement in wrapper.checkpoint_key_renames.items():
            key = re.sub(pattern, replacement, key)
        renamed[key] = shape
    return renamed


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    header, _ = read_safetensors_header(path)
    try:
        return {
            str(name): tuple(int(d) for d in entry["shape"])
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (ValueError, KeyError, TypeError) as error:
        raise BedsideError(
            f"{path} is not a valid safetensors file ({error}): download or save the weights again"
        ) from None


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data starts (8 + header length).

    Checks only the framing (length within the file and the format's limit, a JSON object); one-line
    BedsideError otherwise.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            raw_length = handle.read(8)
            if len(raw_length) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (length,) = struct.unpack("<Q", raw_length)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {length:,} runs past the file's {size:,} bytes")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return header, 8 + length
    except OSError as error:
        raise BedsideError(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise BedsideError(
            f"{path} is not a valid safetensors file ({error}): download or save the weights again"
        ) from None
