"""The machinery under `toolkit.compress.pipeline`: stage folders, input hashes, checkpoints, perplexity, peak RSS.

Why a separate module: `compress.py` reads as the pipeline (prune -> heal -> quantize); this file
holds what every stage needs and none of them is about.

- **Stage folders.** A stage's result lives in `out/stages/<stage>-<hash12>/` (an HF checkpoint plus
  `stage.json`). It is built under a temporary name (`.tmp-<stage>-<hash12>-<pid>`) and renamed
  when complete (`rename` is atomic on one file system), so a folder with the final name is always
  a finished stage; a killed run leaves only a temporary folder, removed by the next run once its
  process is gone.
- **Input hashes.** `hash = sha256(canonical JSON of {stage, previous hash, options, data hashes,
  STAGE_FORMAT})`: the previous stage's hash chains back to the source checkpoint's sha256, so a
  stage is reused only when everything that produced it is unchanged.
- **Perplexity** on held-apart blocks: `ppl = exp( sum_b sum_t -log p(x_{b,t+1} | x_{b,<=t}) / N )`
  over every predicted text position of every block (N = blocks x (seq_len - 1) less the image
  positions of a LLaVA's blocks), the usual token-level perplexity of a causal LM (the formula is `toolkit.core.metrics.perplexity`; this module sums the NLL).
- **Peak RSS per stage.** The kernel's high-water mark (VmHWM) cannot be reset inside a process, so
  `RssSampler` (`toolkit.core.memory_sampling`) polls the resident set size (psutil) every 50 ms on a
  background thread and keeps the maximum; a spike shorter than the period can be missed, so it is a
  lower bound.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from toolkit.core.atomic import building_folder, write_json_atomic
from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.errors import BedsideError
from toolkit.core.hashing import sha256_json, token_ids_sha256, weights_sha256
from toolkit.core.heap import release_free_heap
from toolkit.core.memory_sampling import RssSampler
from toolkit.core.metrics import perplexity as perplexity_from_nll
from toolkit.core.records import STAGE_RECORD
from toolkit.model.llava import is_vision_language

# Files of a checkpoint transformers' save does not rewrite, carried from the source into every stage.
CARRIED_FILES = (
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
)

STAGE_FORMAT = 1  # bump when a stage's algorithm or folder layout changes: old folders stop matching


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------


def stage_hash(stage: str, previous: str, inputs: dict[str, Any]) -> str:
    """The input hash of a stage: previous stage's hash + this stage's options and data hashes."""
    return sha256_json({"stage": stage, "previous": previous, "inputs": inputs, "format": STAGE_FORMAT})


# ---------------------------------------------------------------------------------------------
# Atomic files and folders
# ---------------------------------------------------------------------------------------------


def link_or_copy(source: Path, destination: Path) -> None:
    """Hard-link a file (stage files are never rewritten in place), or copy where linking fails."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def link_checkpoint(source: Path, destination: Path, skip: Sequence[str] = (STAGE_RECORD,)) -> None:
    """Put a checkpoint folder's files (not subfolders, not those named in `skip`) into `destination`."""
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name not in skip and not path.name.startswith("."):
            link_or_copy(path, destination / path.name)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """Load an HF causal LM (or a LLaVA, whole) from a local folder, offline, no remote code, in `dtype`, eval mode."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    refuse_custom_code(folder)
    model_class = LlavaForConditionalGeneration if is_vision_language(folder) else AutoModelForCausalLM
    try:
        model = model_class.from_pretrained(
            folder, dtype=dtype, low_cpu_mem_usage=True, local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BedsideError(f"cannot load the checkpoint in '{folder}' as a causal LM: {first}") from None
    return model.eval()


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer (local files only)."""
    from toolkit.core.tokenizer_loading import load_auto_tokenizer

    refuse_custom_code(folder)
    try:
        return load_auto_tokenizer(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise BedsideError(f"cannot load the tokenizer in '{folder}': {first}") from None


def save_checkpoint(model: Any, tokenizer: Any, source: Path, folder: Path, dtype: torch.dtype) -> None:
    """Save weights (safetensors, in `dtype`), config, tokenizer and chat template into `folder`.

    The model is cast to `dtype` in place (the caller evaluates what was saved). Files of the
    source checkpoint that transformers does not rewrite (CARRIED_FILES: chat template, generation
    config, a LLaVA's processor files) are copied when the save did not produce them.
    """
    model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer_and_carried_files(tokenizer, source, folder)


def _save_tokenizer_and_carried_files(tokenizer: Any, source: Path, folder: Path) -> None:
    """The tokenizer, and the source's CARRIED_FILES the weights' save did not produce."""
    tokenizer.save_pretrained(folder)
    for name in CARRIED_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)


def save_checkpoint_streamed(model: Any, tokenizer: Any, source: Path, current: Path, folder: Path) -> None:
    """`save_checkpoint` for a model held in its storage dtype (the 16-bit heal of a streamed model): the tensors
    of `current`'s shards (the stage's input checkpoint) rewritten from the model one at a time, same shard
    layout and dtype, so saving needs no second copy of the weights (transformers' safetensors save
    serializes a whole file in memory first: +2 GB on a 1.1B model in bf16, +12 GB on a 7B)."""
    from toolkit.compress.sequential.checkpoint import ShardedCheckpoint, ShardWriter

    stored = ShardedCheckpoint(current)
    state = model.state_dict()
    names = {stored.resolve(name): name for name in state if stored.resolve(name) is not None}
    writer = ShardWriter(stored, folder, rename=lambda name: name, changed=set(names))
    try:
        for stored_name, name in sorted(names.items()):
            writer.put(stored_name, state[name])
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    _save_tokenizer_and_carried_files(tokenizer, source, folder)


def read_stage_record(folder: Path) -> dict[str, Any] | None:
    """The `stage.json` of a finished stage folder, or None when absent or unreadable."""
    path = folder / STAGE_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# Perplexity
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model: Any, blocks: torch.Tensor, batch_size: int = 4, progress: Any = None) -> float:
    """Token-level perplexity of `model` on `blocks` [n, seq_len] (formula in the module docstring)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    count = 0
    try:
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].to(torch.float32)
            targets = ids[:, 1:]
            scored = targets < logits.shape[-1]  # image positions (toolkit.compress.vision) are not text
            nll = torch.nn.functional.cross_entropy(
                logits[scored], targets[scored], reduction="sum"
            )
            total += float(nll)
            count += int(scored.sum())
            if progress is not None:
                progress(int(ids.shape[0]))
    finally:
        model.train(was_training)
    return perplexity_from_nll(total, max(count, 1))


def eval_overlap(calibration_keys: set[str], eval_keys: Sequence[str]) -> int:
    """How many evaluation documents also occur in the calibration documents (by content key)."""
    return sum(1 for key in eval_keys if key in calibration_keys)


# ---------------------------------------------------------------------------------------------
# Running stages
# ---------------------------------------------------------------------------------------------

# compute(model, folder) -> (model or None when the weights are unchanged, details)
StageCompute = Callable[[Any, Path], tuple[Any | None, dict[str, Any]]]
# compute(lazy model, folder, on_layer(index, seconds)) -> (weights written into folder, details)
SequentialCompute = Callable[[Any, Path, Callable[[int, float], None]], tuple[bool, dict[str, Any]]]


class StageRunner:
    """Where the current weights are, the live model (loaded lazily), and the perplexity cache.

    `run` resumes a stage from its folder or computes and saves it; `quality` measures (or reads
    back) the perplexity of the current weights on the evaluation blocks.
    """

    def __init__(
        self,
        source: Path,
        out: Path,
        tokenizer: Any,
        eval_ids: torch.Tensor,
        progress: bool,
        storage_dtype: torch.dtype = torch.float32,
        attach: Callable[[Any], None] | None = None,
        sequential: bool = False,
    ) -> None:
        self.source = source
        self.attach = attach  # called on every model the runner makes live (a LLaVA's image positions)
        self.stages_dir = out / "stages"
        self.tokenizer = tokenizer
        self.eval_ids = eval_ids
        self.eval_key = token_ids_sha256(eval_ids)
        self.progress = progress
        self.storage_dtype = storage_dtype
        self.current_dir = source
        self.model: Any = None
        self.quality_path = self.stages_dir / "quality.json"
        self.quality_cache: dict[str, float] = _read_json_object(self.quality_path)
        self.sequential = sequential  # stages that can stream run block by block (toolkit.compress.sequential)
        self.measurements: dict[str, dict[str, Any]] = {}  # perplexity runs by label: seconds, peak RSS
        self.measured_path = self.stages_dir / "quality-measurements.json"  # the same by cache key, for resumes
        self.measured: dict[str, Any] = _read_json_object(self.measured_path)

    def live_model(self, dtype: torch.dtype = torch.float32) -> Any:
        """The current weights as a `dtype` model (loaded from `current_dir` when not live in that dtype)."""
        if self.model is not None and next(self.model.parameters()).dtype != dtype:
            self.model = None
        if self.model is None:
            self.model = load_causal_lm(self.current_dir, dtype)
            if self.attach is not None:
                self.attach(self.model)
        return self.model

    def run(
        self,
        name: str,
        input_hash: str,
        inputs: dict[str, Any],
        compute: StageCompute,
        dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """Resume stage `name` from its folder, or compute it (timed, peak RSS sampled) and save it.

        `compute(model, folder)` returns the stage's model and details; it may write extra files
        into `folder` (the stage's folder under construction). A returned model of None means
        "weights unchanged": the previous weights are hard-linked instead of saved again. The time
        and the peak RSS cover the stage's load of the model (when it is not live already), the
        compute and the save. `dtype` is the precision the model is loaded in (the 16-bit heal of a
        streamed model); a model that is not float32 is not kept live (the next stage reloads).
        """
        folder = self.stages_dir / f"{name}-{input_hash[:12]}"
        resumed = self._resume(folder, input_hash)
        if resumed is not None:
            return resumed
        with building_folder(folder) as building:
            start = time.perf_counter()
            with RssSampler() as rss:
                model = self.live_model(dtype)
                changed, details = compute(model, building)
                if changed is None:
                    output_sha = self._link_unchanged(building)
                else:
                    if changed is not model and self.attach is not None:
                        self.attach(changed)
                    model = changed
                    if dtype == torch.float32:
                        save_checkpoint(model, self.tokenizer, self.source, building, self.storage_dtype)
                        model.to(torch.float32)  # exact: the saved values, widened
                    else:  # held in its storage dtype: rewrite the input's shards, one tensor at a time
                        save_checkpoint_streamed(model, self.tokenizer, self.source, self.current_dir, building)
                    output_sha = weights_sha256(building)
            stored = self._store(name, input_hash, inputs, details, start, rss, output_sha, folder, building)
        self.current_dir = folder
        self.model = model if dtype == torch.float32 else None
        return {**stored, "resumed": False}

    def run_sequential(
        self, name: str, input_hash: str, inputs: dict[str, Any], compute: SequentialCompute
    ) -> dict[str, Any]:
        """`run` block by block: `compute(lazy, folder, on_layer)` reads the current weights through a
        `LazyModel` and writes the stage's checkpoint into `folder` itself (returns True), or leaves
        the weights unchanged (False: linked). Nothing stays live afterwards. The record adds
        `sequential: true` and `block_seconds` (seconds per decoder block, every pass summed).
        """
        from toolkit.compress.sequential.model import LazyModel

        folder = self.stages_dir / f"{name}-{input_hash[:12]}"
        resumed = self._resume(folder, input_hash)
        if resumed is not None:
            return resumed
        self.model = None  # the in-memory model of an earlier stage is not needed: free it first
        block_seconds: dict[int, float] = {}

        def on_layer(index: int, seconds: float) -> None:
            block_seconds[index] = block_seconds.get(index, 0.0) + seconds

        with building_folder(folder) as building:
            start = time.perf_counter()
            with RssSampler() as rss:
                lazy = LazyModel(self.current_dir)
                wrote, details = compute(lazy, building, on_layer)
                if wrote:
                    self.tokenizer.save_pretrained(building)
                    output_sha = weights_sha256(building)
                else:
                    output_sha = self._link_unchanged(building)
            stored = self._store(name, input_hash, inputs, details, start, rss, output_sha, folder, building)
            stored["sequential"] = True
            stored["block_seconds"] = [round(block_seconds[index], 3) for index in sorted(block_seconds)]
            write_json_atomic(building / STAGE_RECORD, stored)
        self.current_dir = folder
        return {**stored, "resumed": False}

    def _resume(self, folder: Path, input_hash: str) -> dict[str, Any] | None:
        stored = read_stage_record(folder) if folder.is_dir() else None
        if stored is not None and stored.get("hash") == input_hash:
            self.current_dir = folder
            self.model = None  # the next stage loads the resumed weights only if it needs them
            return {**stored, "resumed": True}
        return None

    def _link_unchanged(self, building: Path) -> str:
        link_checkpoint(self.current_dir, building)
        previous = read_stage_record(self.current_dir) or {}
        return str(previous.get("output_sha256") or weights_sha256(building))

    def _store(
        self,
        name: str,
        input_hash: str,
        inputs: dict[str, Any],
        details: dict[str, Any],
        start: float,
        rss: RssSampler,
        output_sha: str,
        folder: Path,
        building: Path,
    ) -> dict[str, Any]:
        stored = {
            "stage": name,
            "hash": input_hash,
            "inputs": inputs,
            "details": details,
            "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_bytes": rss.peak_bytes,
            "output_sha256": output_sha,
            "folder": f"stages/{folder.name}",
        }
        write_json_atomic(building / STAGE_RECORD, stored)
        return stored

    def quality(
        self,
        key: str,
        label: str,
        transform: Callable[[Any], Any] | None = None,
        layer_transform: Callable[[Any], Callable[[int, Any], None]] | None = None,
    ) -> float:
        """Perplexity of the current weights on the evaluation blocks, cached under `key`.

        In memory, `transform` (e.g. fake quantization) is applied to the live model in place first;
        the model is then dropped, since it no longer holds the stage's weights. Block by block
        (`self.sequential`), `layer_transform(lazy)` gives the same change per loaded block. The
        time and peak RSS of a measurement (load included) go to `self.measurements[label]`.
        """
        cache_key = f"{key}|{self.eval_key}"
        if cache_key in self.quality_cache:
            if cache_key in self.measured:
                self.measurements[label] = self.measured[cache_key]
            return float(self.quality_cache[cache_key])
        start = time.perf_counter()
        with RssSampler() as rss:
            if self.sequential:
                from toolkit.compress.sequential.model import LazyModel
                from toolkit.compress.sequential.scoring import sequential_perplexity

                self.model = None
                lazy = LazyModel(self.current_dir)
                per_layer = layer_transform(lazy) if layer_transform is not None else None
                value = sequential_perplexity(lazy, self.eval_ids, transform=per_layer)
            else:
                model = self.live_model()
                if transform is not None:
                    transform(model)
                value = _perplexity_with_bar(model, self.eval_ids, self.progress, label)
                if transform is not None:
                    self.model = None
            release_free_heap()  # the logits' pages back to the OS before the next stage allocates its own
        self.measurements[label] = self.measured[cache_key] = {
            "seconds": round(time.perf_counter() - start, 3),
            "peak_rss_bytes": rss.peak_bytes,
            "sequential": self.sequential,
        }
        self.quality_cache[cache_key] = value
        write_json_atomic(self.quality_path, self.quality_cache)
        write_json_atomic(self.measured_path, self.measured)
        return value


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _perplexity_with_bar(model: Any, blocks: torch.Tensor, enabled: bool, label: str) -> float:
    with Progress(
        TextColumn(f"perplexity ({label})"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    ) as bar:
        task = bar.add_task("perplexity", total=int(blocks.shape[0]))
        return perplexity(model, blocks, progress=lambda n: bar.update(task, advance=n))
