"""A causal LM whose weights stay on disk: a meta-device skeleton, one module loaded at a time.

Why: compressing block by block (llm-compressor's sequential pipeline, AutoAWQ) needs the model's
code (its layer classes, rotary tables, attention masks) but only one decoder block's weights at a
time. `LazyModel` builds the whole model on PyTorch's meta device (shapes, no storage), rebuilds the
small parameter-free modules the forward needs before layer 0 (rotary embeddings) on the CPU, and
loads a module's tensors from the safetensors shards when asked (`load`), widened to float32 as the
in-memory path loads them, then frees them (`release`: back to the meta device).

`capture` runs the model up to layer 0 on each batch and keeps what enters it: the hidden states and
the keyword arguments the model hands every layer (position embeddings, mask, cache positions), the
same thing AWQ's in-memory search captures. Running `layer(hidden, **kwargs)` block after block on
these gives the in-memory forward's numbers exactly, because it is the same code on the same values.

Not every family streams: a module outside the layers that holds non-persistent buffers other than
the rotary tables (Gemma 3's embedding scale) would come back from the meta device uninitialised,
so `LazyModel` refuses such a model (`SequentialUnsupported`) and the pipeline keeps it in memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.compress.quant.rtn import decoder_layers, resolve_text_family
from toolkit.compress.sequential.checkpoint import ShardedCheckpoint
from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.errors import BedsideError


class SequentialUnsupported(BedsideError):
    """The checkpoint cannot be compressed block by block (the message says why); it is compressed in memory."""


LayerInput = tuple[torch.Tensor, dict[str, Any]]


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def return_freed_memory() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned on free.

    Why: glibc raises its mmap threshold after each large free (up to 32 MiB), so a released block's
    16-46 MB tensors come back from the heap the next time and their pages stay resident after
    release, counted in the RSS though free; loading block after block, that retention grows the peak
    by several blocks. A fixed threshold (mallopt, which also stops the adjustment) keeps the resident
    set to what is alive. No effect off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        return


def first_output(output: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's output (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple | list) else output


class LazyModel:
    """The model of a checkpoint folder with no weights resident until `load` (module docstring)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        from toolkit.model.llava import is_vision_language

        self.folder = Path(folder)
        return_freed_memory()
        refuse_custom_code(self.folder)
        if is_vision_language(self.folder):
            raise SequentialUnsupported("a vision-language model is compressed in memory (image calibration)")
        self.checkpoint = ShardedCheckpoint(self.folder)
        config = AutoConfig.from_pretrained(self.folder, local_files_only=True, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
        self.model: nn.Module = model.eval()
        self.config = model.config
        self.family = resolve_text_family(model)
        self.layers = decoder_layers(model, self.family)
        self.base = model.get_submodule(self.family.base_model_path)
        self._rebuild_parameter_free()
        self._check_buffers()

    # -- structure ------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_path(self, index: int) -> str:
        """Module path (and tensor-name prefix) of decoder layer `index`: `model.layers.7`."""
        return f"{self.family.layers_path}.{index}"

    def module_path(self, module: nn.Module) -> str:
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise AssertionError(f"{type(module).__name__} is not part of the model")

    def _rebuild_parameter_free(self) -> None:
        """Rotary embeddings (buffers computed in __init__ from the config) rebuilt on the CPU."""
        layer_prefix = self.family.layers_path + "."
        for name, module in list(self.model.named_modules()):
            if not name or name.startswith(layer_prefix) or any(True for _ in module.parameters(recurse=False)):
                continue
            own = list(module.buffers(recurse=False))
            if not own or not any(buffer.is_meta for buffer in own):
                continue
            if "Rotary" not in type(module).__name__ or not hasattr(module, "config"):
                raise SequentialUnsupported(
                    f"{name} ({type(module).__name__}) holds computed buffers Bedside cannot rebuild"
                )
            rebuilt = type(module)(config=module.config)
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, rebuilt)

    def _check_buffers(self) -> None:
        """Refuse buffers that are neither stored in the checkpoint nor rebuilt (they would be garbage)."""
        for name, buffer in self.model.named_buffers():
            if buffer.is_meta and name not in self.checkpoint and not name.endswith("inv_freq"):
                raise SequentialUnsupported(
                    f"buffer {name} is computed at construction, not stored: compressed in memory"
                )

    # -- weights --------------------------------------------------------------------------------

    def _stored_name(self, name: str) -> str:
        if name in self.checkpoint:
            return name
        if name.endswith(self.family.lm_head_name) and self._tied():
            return f"{self.family.base_model_path}.{self.family.embedding_name}"
        raise BedsideError(f"the checkpoint in '{self.folder}' has no tensor {name!r}")

    def _tied(self) -> bool:
        text = self.config.get_text_config(decoder=True)
        return bool(getattr(self.config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))

    def load(self, path: str) -> nn.Module:
        """Materialise module `path` on the CPU in float32 from the shards and return it."""
        module = self.model.get_submodule(path)
        module.to_empty(device="cpu")
        persistent = module.state_dict(keep_vars=True)
        for name, tensor in persistent.items():
            self.checkpoint.read_into(self._stored_name(f"{path}.{name}" if path else name), tensor.data)
        return module

    def release(self, path: str) -> None:
        """Free module `path`'s tensors (back to the meta device)."""
        self.model.get_submodule(path).to_empty(device="meta")

    def load_layer(self, index: int) -> nn.Module:
        return self.load(self.layer_path(index))

    def release_layer(self, index: int) -> None:
        self.release(self.layer_path(index))

    @contextlib.contextmanager
    def loaded(self, path: str) -> Iterator[nn.Module]:
        """The module `path` loaded for the duration of the block, released after."""
        module = self.load(path)
        try:
            yield module
        finally:
            self.release(path)

    # -- the ends of the forward ----------------------------------------------------------------

    @torch.no_grad()
    def capture(self, batches: Sequence[torch.Tensor]) -> list[LayerInput]:
        """(hidden states, keyword arguments) entering decoder layer 0 for each batch of token ids."""
        from toolkit.compress.quant.awq import _capture_layer0_inputs

        with self.loaded(self.module_path(self.model.get_input_embeddings())):
            return _capture_layer0_inputs(self.model, self.layers, batches)

    @contextlib.contextmanager
    def head(self) -> Iterator[Any]:
        """A function hidden (after the last layer) -> logits: final norm, output head (float32), softcap."""
        norm_path = f"{self.family.base_model_path}.{self.family.final_norm_name.removesuffix('.weight')}"
        head_path = self.family.lm_head_name.removesuffix(".weight")
        norm = self.load(norm_path)
        head = self.model.get_submodule(head_path)
        tied = head.weight is self.model.get_input_embeddings().weight
        stored = self._stored_name(self.family.lm_head_name)  # a tied head reads the embedding
        weight = torch.empty(self.checkpoint.tensors[self.checkpoint.resolve(stored) or stored].shape, dtype=torch.float32)
        head.weight = nn.Parameter(self.checkpoint.read_into(stored, weight), requires_grad=False)
        cap = getattr(self.config.get_text_config(decoder=True), "final_logit_softcapping", None)

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            out = head(norm(hidden))
            if cap is not None:
                out = torch.tanh(out / cap) * cap
            return out

        try:
            yield logits
        finally:
            self.release(norm_path)
            if tied:
                head.weight = self.model.get_input_embeddings().weight
            else:
                self.release(head_path)


def run_layer(layer: nn.Module, inputs: Sequence[LayerInput]) -> list[torch.Tensor]:
    """The layer's output hidden states for each captured batch."""
    with torch.no_grad():
        return [first_output(layer(hidden, **kwargs)).detach() for hidden, kwargs in inputs]
