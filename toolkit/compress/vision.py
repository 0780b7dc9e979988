"""Image + text calibration for a LLaVA: the language model's statistics include the image tokens.

Every compression method (layer selection, linear replacement, AWQ, the importance matrix, LoRA
healing, stage perplexity) consumes token-id blocks and calls `model(input_ids=...)`. A LLaVA
sequence is not token ids alone: at run time the image's projected features sit where the prompt
had `<image>`. So that those methods see what the deployed model sees without each learning about
images, image positions get *virtual token ids* past the vocabulary:

    id = base + slot * n_image_tokens + k      (base = rows of the input embedding)

where `slot` numbers the distinct calibration images and `k` the image position. Hooks on the
language model's input embedding map a virtual id to `projector(tower_features[slot, k])`: the
tower runs once per image (it is kept, not compressed), the projector runs in the forward, so it
gets gradients when healing trains it. Hooks are not in the state dict: saved checkpoints are the
plain LLaVA. Targets at image positions are never scored (`text_targets`), as at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.core.errors import BedsideError
from toolkit.data.documents import Document

IGNORE_INDEX = -100


@dataclass
class ImageSlots:
    """The distinct images of the calibration data, numbered in first-seen order, and the id layout."""

    base: int  # first virtual id: rows of the language model's input embedding
    image_token_id: int
    n_image_tokens: int
    images: list[Path] = field(default_factory=list)
    _index: dict[Path, int] = field(default_factory=dict)

    def slot(self, image: Path) -> int:
        """The slot of `image`, allocating the next one for an image not seen before."""
        if image not in self._index:
            self._index[image] = len(self.images)
            self.images.append(image)
        return self._index[image]

    def expand(self, document: Document, ids: Sequence[int]) -> list[int]:
        """`ids` of a rendered document with its image token replaced by the image's virtual ids.

        Documents without an image pass through; an image document whose text lost its image token
        (the template dropped it) is refused, since its statistics would then have no image.
        """
        ids = [int(i) for i in ids]
        if document.image is None:
            return ids
        if ids.count(self.image_token_id) != 1:
            raise BedsideError(
                f"calibration item {document.id or '?'}: the rendered prompt holds the image token "
                f"{ids.count(self.image_token_id)} times, expected once"
            )
        at = ids.index(self.image_token_id)
        first = self.base + self.slot(document.image) * self.n_image_tokens
        return ids[:at] + list(range(first, first + self.n_image_tokens)) + ids[at + 1 :]

    def text_targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Labels from ids with every image position (virtual id) set to IGNORE_INDEX."""
        return torch.where(ids >= self.base, torch.full_like(ids, IGNORE_INDEX), ids)


def slots_for(folder: Path) -> ImageSlots:
    """Empty image slots for the LLaVA in `folder`, laid out after its language model's vocabulary rows."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    full = config.vision_feature_select_strategy == "full"
    return ImageSlots(
        base=int(config.text_config.vocab_size),
        image_token_id=int(config.image_token_index),
        n_image_tokens=side * side + (1 if full else 0),
    )


@torch.no_grad()
def tower_features(model: Any, slots: ImageSlots, processor_folder: Path, batch_size: int = 8) -> torch.Tensor:
    """Selected tower hidden states of every slot's image, before the projector: [slots * n_tokens, width]."""
    from PIL import Image
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(
        processor_folder, use_fast=False, local_files_only=True, trust_remote_code=False
    )
    config = model.config
    layers = config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    tower = model.model.vision_tower
    rows = []
    for start in range(0, len(slots.images), batch_size):
        images = []
        for path in slots.images[start : start + batch_size]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(next(tower.parameters()).dtype)
        hidden = tower(pixels, output_hidden_states=True).hidden_states
        selected = torch.cat([hidden[layer] for layer in layers], dim=-1)
        if config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        rows.append(selected.reshape(-1, selected.shape[-1]).float())
    if not rows:
        return torch.zeros(0, 1)
    return torch.cat(rows)


def attach_image_positions(model: Any, slots: ImageSlots, features: torch.Tensor) -> None:
    """From now on, virtual ids embed as projector(features[id - base]); plain ids embed as before.

    Idempotent (a model gets the hooks once); the hooks live as long as the model object.
    """
    if getattr(model, "_bedside_image_hooks", None):
        return
    if slots.base != model.get_input_embeddings().num_embeddings:
        raise BedsideError(
            f"the language model has {model.get_input_embeddings().num_embeddings} embedding rows, "
            f"its config says {slots.base}: use the config.json that came with these weights"
        )
    embedding = model.get_input_embeddings()
    state: dict[str, torch.Tensor] = {}

    def before(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        ids = args[0]
        virtual = ids >= slots.base
        state["virtual"], state["rows"] = virtual, ids[virtual] - slots.base
        return (torch.where(virtual, torch.full_like(ids, slots.image_token_id), ids), *args[1:])

    def after(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        virtual, rows = state.pop("virtual"), state.pop("rows")
        if not bool(virtual.any()):
            return output
        # looked up at each call: healing may wrap the projector (peft modules_to_save) to train a copy of it
        projector = model.model.multi_modal_projector
        dtype = next(projector.parameters()).dtype
        projected = projector(features[rows.cpu()].to(output.device, dtype))
        output = output.clone()
        output[virtual] = projected.to(output.dtype)
        return output

    model._bedside_image_hooks = [embedding.register_forward_pre_hook(before), embedding.register_forward_hook(after)]


@dataclass
class VisionCalibration:
    """A LLaVA compression's image slots and, once the source model is live, its tower features."""

    slots: ImageSlots
    processor_folder: Path
    features: torch.Tensor | None = None

    def attach(self, model: Any) -> None:
        """StageRunner's hook: compute the tower features from the first live model, attach the image positions."""
        if self.features is None:
            self.features = tower_features(model, self.slots, self.processor_folder)
        attach_image_positions(model, self.slots, self.features)

    def to_dict(self) -> dict[str, Any]:
        """What compression.json says about the images: how many were encoded (calibration, healing and
        evaluation blocks together) and the positions each takes."""
        return {"images_encoded": len(self.slots.images), "positions_per_image": self.slots.n_image_tokens}


def image_documents(documents: Sequence[Document]) -> bool:
    """True when any document carries an image."""
    return any(document.image is not None for document in documents)
