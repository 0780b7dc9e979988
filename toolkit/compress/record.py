"""The compress stage's config and record: `CompressOptions` (what to do) and `CompressionRecord`
(compression.json: what was done), both pydantic, so the options a run took are stored as they were
given and a record read back is validated before anything trusts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from toolkit.core.errors import BedsideError
from toolkit.core.records import COMPRESSION_RECORD, SCHEMA_VERSION


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CompressOptions:
    """What to do to the model; every field takes part in the stage hashes that concern it.

    A (pydantic) dataclass, so `dataclasses.replace` and `asdict` work and field types are checked.
    """

    prune_layers: int = 0  # number of decoder layers to remove
    layers: tuple[int, ...] | None = None  # explicit original indices (overrides selection)
    method: str = "activation"  # prune selection method (registry name)
    quant: str | None = None  # export scheme (Q4_K_M, Q4_0, int4_b32, ...) or None: no quantize stage
    quant_method: str = "auto"  # auto | awq | awq-gptq | rtn | imatrix (toolkit.compress.quant.methods)
    awq_search_rounding: str = "rerank"  # AWQ candidates: "rerank" | "exact" | "emulated" (quant.awq.AwqSearch)
    replace: str = "linear"  # removed spans: "linear" (fitted map folded in, prune.replace) | "none"
    heal: bool = True
    heal_skip_reason: str | None = None  # why heal is False when a caller decided it (deploy: host too small)
    heal_steps: int = 40
    heal_seconds: float | None = None
    heal_projector: bool = False  # a LLaVA's projector trained fully beside the language model's LoRA
    heal_objective: str = "kd"  # "kd": distil the unpruned model's top-k log-probs | "ce": the LM loss (heal.py)
    heal_sequences: int | None = None  # healing blocks drawn from the calibration data; None: calib_sequences
    heal_lr: float = 2e-4  # LoRA learning rate (heal.DEFAULT_LEARNING_RATE)
    heal_rank: int = 8  # LoRA rank r (alpha = 2 r: heal.DEFAULT_RANK, ALPHA_PER_RANK)
    calib: str | None = None  # data spec for load_dataset_spec; None -> the radiology corpus
    eval_data: str | None = None  # held-apart data for per-stage perplexity; None -> eval split of calib
    calib_sequences: int = 64  # <= 128
    seq_len: int = 256
    eval_sequences: int = 16
    seed: int = 0
    sequential: str = "auto"  # block by block: "auto" (models above the threshold), "on", "off"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceModel(_Record):
    """The checkpoint compress started from."""

    name: str  # as the user gave it ("demo" or a folder)
    source: str  # the resolved folder
    source_sha256: str  # toolkit.core.hashing.weights_sha256 of its safetensors
    num_layers: int


class CheckpointRef(_Record):
    """The compressed checkpoint: its folder and weights_sha256."""

    path: str
    sha256: str


class CompressionRecord(_Record):
    """compression.json. Stage details (scores, AWQ search, healing curve) stay as each stage wrote them."""

    schema_version: Literal[1] = SCHEMA_VERSION
    bedside_version: str
    model: SourceModel
    options: CompressOptions
    plan: dict[str, Any] | None
    layers_removed: list[int]
    num_layers_after: int
    layer_scores: dict[str, Any] | None
    selection: dict[str, Any] | None
    replacement: dict[str, Any] | None = None  # linear replacement of the removed spans (prune.replace)
    quant: dict[str, Any] | None
    awq: dict[str, Any] | None
    heal: dict[str, Any] | None
    calibration: dict[str, Any]
    eval: dict[str, Any]
    data_split: dict[str, Any] | None
    quality: dict[str, Any]
    stages: dict[str, Any]
    checkpoint: CheckpointRef
    imatrix: str | None
    seconds: float
    sequential: bool = False  # the streaming stages ran block by block (toolkit.compress.sequential)


def read_compression_record(folder: Path) -> CompressionRecord:
    """compression.json of a compress output folder, validated; one-line BedsideError when it is not one."""
    path = Path(folder) / COMPRESSION_RECORD
    try:
        return CompressionRecord.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BedsideError(f"{path}: unreadable compression record ({error}); run `bedside compress` again") from None
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "file"
        raise BedsideError(
            f"{path}: not a compression record ({where}: {first.get('msg', 'invalid')}); run `bedside compress` again"
        ) from None
