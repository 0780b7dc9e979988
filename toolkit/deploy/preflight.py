"""Checks before a deploy spends minutes: model, data, output folder, free disk. Each failure is one BedsideError line.

Why: a deploy that fails after an hour of compression because the output disk is full, or that
runs a model's custom code, is worse than one that refuses at once.

Disk estimate (bytes the work folder may need at its peak):

    need = params * (STAGE_COPIES * 4   # float32 checkpoints: prune, heal, quantize stages + the published one
                     + 2 + 2            # F16 GGUF intermediate + the exported model (upper bound: 16-bit)
                     + 2 * 2)           # the bundle folder and its .tar.gz (each at most the 16-bit size)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from toolkit.core.atomic import building_folder
from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.errors import BedsideError
from toolkit.core.output_dir import check_out_dir
from toolkit.core.units import GIB
from toolkit.data import load_dataset_spec
from toolkit.model.checkpoint import check_weights_match_config
from toolkit.model.facts import read_facts
from toolkit.model.source import resolve_model_dir

STAGE_COPIES = 4
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_weights(model_dir: Path) -> list[Path]:
    """Pickle weight files (*.bin, *.pt, ...) in a folder without safetensors; empty when safetensors exist."""
    if any(model_dir.glob("*.safetensors")):
        return []
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def convert_pickle_checkpoint(model_dir: Path, work: Path) -> Path:
    """Load a pickle checkpoint (only with --allow-pickle) and save it as safetensors under `work`.

    The pickle is loaded before anything is written: one that cannot be loaded is a one-line
    BedsideError and leaves no folder behind.
    """

    target = work / "source-safetensors"
    if any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM

    from toolkit.core.tokenizer_loading import load_auto_tokenizer

    refuse_custom_code(model_dir)
    names = ", ".join(path.name for path in pickle_weights(model_dir)) or "pickle weights"
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, use_safetensors=False, trust_remote_code=False
        )
        tokenizer = load_auto_tokenizer(model_dir)
    except Exception as error:  # unpickling, torch.load and transformers raise many types: all are bad input
        text = str(error).strip()
        first = text.splitlines()[0] if text else type(error).__name__
        raise BedsideError(
            f"--allow-pickle: cannot load the checkpoint in '{model_dir}' ({names}): {first}; "
            "convert it to safetensors with the tools that made it"
        ) from None
    with building_folder(target) as building:
        model.save_pretrained(building, safe_serialization=True)
        tokenizer.save_pretrained(building)
    return target


def check_model_config(model: str) -> tuple[Path, Any]:
    """Resolve `model` and read its facts from config.json; refuse remote code and unsupported architectures."""

    folder = resolve_model_dir(model)  # refuses custom code (auto_map): toolkit.core.checkpoint_policy
    facts = read_facts(str(folder) if model != "demo" else model)  # unsupported architectures raise here
    return folder, facts


def check_model_weights(model: str, folder: Path, work: Path, allow_pickle: bool) -> Path:
    """The folder with safetensors weights: refuse pickle weights unless `allow_pickle` (then convert them),
    and weights that config.json does not describe (toolkit.model.checkpoint)."""
    pickles = pickle_weights(folder)
    if pickles and not allow_pickle:
        raise BedsideError(
            f"model '{model}' has only pickle weights ({pickles[0].name}); pickle files can run code when loaded: "
            "convert them to safetensors, or pass --allow-pickle if you trust the file"
        )
    if pickles:
        return convert_pickle_checkpoint(folder, work)
    if not any(folder.glob("*.safetensors")):
        raise BedsideError(
            f"model folder '{folder}' has no *.safetensors weights: pass a checkpoint with weights"
        )
    check_weights_match_config(folder)
    return folder


def check_data(spec: str, option: str) -> list[Any]:
    """Load a data spec (fails with one line for missing/empty/malformed data); refuse an empty result."""

    documents = load_dataset_spec(spec)
    if not documents:
        raise BedsideError(f"{option} data '{spec}' holds no documents: pass a file or source with text")
    return documents


def check_writable(out: Path) -> Path:
    """Refuse an `out` that cannot become a writable folder, creating nothing; returns its nearest existing
    folder (where free disk is measured). The pipeline creates `out` once every input passed."""
    return check_out_dir(out)


def disk_needed_bytes(total_params: int) -> int:
    """Upper estimate of the bytes a deploy writes (formula in the module docstring)."""
    return int(total_params * (STAGE_COPIES * 4 + 2 + 2 + 2 * 2))


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system holding `folder`."""
    return int(shutil.disk_usage(folder).free)


def check_disk(out: Path, total_params: int) -> int:
    """Refuse to start when the free space under `out` is below the estimate; returns the estimate."""
    need = disk_needed_bytes(total_params)
    free = free_bytes(out)
    if free < need:
        raise BedsideError(
            f"not enough disk under '{out}': {free / GIB:.2f} GiB free, a deploy of this model needs about "
            f"{need / GIB:.2f} GiB; free space or pass another --out"
        )
    return need


def check_threads(value: int | None) -> None:
    """Refuse a non-positive thread count."""
    if value is not None and value < 1:
        raise BedsideError(f"--threads must be 1 or more, got {value}")
    if value is not None and value > (os.cpu_count() or value):
        raise BedsideError(f"--threads {value} is more than this host's {os.cpu_count()} CPUs")
