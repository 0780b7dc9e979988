"""Build the demo vision-language model (`--model demo-vlm`): a small medical LLaVA trained here.

No CLIP weights can be fetched, so the model is assembled from what the machine has and trained on
the shared SLAKE and VQA-RAD train splits (../shared/data), deterministically, on 2 CPU cores:

- language model: the demo model (SmolLM2-135M-Instruct, `toolkit.model.demo`);
- vision tower: a small CLIP ViT (`Recipe.vision_config`) trained from scratch;
- projector: LLaVA-1.5's 2-layer GELU MLP; the result is a plain `LlavaForConditionalGeneration`
  folder in the llava-hf layout (`toolkit.model.llava.write_llava_checkpoint`).

Three phases, because the language model dominates the cost (a forward+backward of 135M parameters
per token) while the tower and projector are cheap:

1. Tower pre-training without the language model: the tower's mean patch feature feeds one linear
   classifier per label family, trained with augmentation (random crop/scale, brightness/contrast):
   SLAKE's per-image modality, location and body region, VQA-RAD's organ (mapped to the same
   regions), and one classifier per question asked about at least `head_min_questions` training
   images ("Does the picture contain liver?", "Which plane is the image scanned?"), over its
   answers seen at least twice. The tower thus learns what these questions ask about the image.
1b. Projector pre-training without the language model (`pretrain_projector`): the projected image
   tokens are pulled towards the input embeddings of the words that describe the image (its labels,
   its open answers, the objects of its presence questions answered yes), so the frozen language
   model starts from image tokens it can read instead of from noise.
2. LLaVA training (`train_llava`): tower and projector frozen, a LoRA on every linear layer of the
   top `lm_trained_layers` decoder layers, trained on the QA pairs with the loss on the answer tokens
   (and the closing <|im_end|>) only; the frozen layers below run once per image and are cached, so
   each epoch costs only the top layers. The LoRA is merged into the fp32 weights before saving.
   All questions about one image share one sequence: the system prompt and image tokens come once,
   each question/answer segment attends to that prefix and to itself only (a block mask) and keeps
   the position ids it has in a single-turn prompt, so the computation equals single-turn training
   on each question while the prefix is computed once per image instead of once per question.

Training sees SLAKE train and VQA-RAD train minus its held-apart slice (`toolkit.data.vqa`); SLAKE
validate and the held-apart slice are for measuring (bench/demo_vlm.py, docs/DEMO_VLM.md).

The build is cached like the text demo's: a record (bedside-demo-vlm.json) with the recipe version,
seeds and input hashes; a valid record makes a re-run return at once; a file lock keeps two builders
apart; the folder is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from toolkit.core import paths
from toolkit.core.errors import BedsideError
from toolkit.core.hashing import file_sha256
from toolkit.core.vision import IMAGE_MARKER
from toolkit.data.documents import Document
from toolkit.data.vqa import held_apart_vqa_rad, is_closed, normalise_answer

if TYPE_CHECKING:
    import torch

# Bump when the recipe changes what lands in the folder: older builds are then rebuilt.
RECIPE_VERSION = 2
RECORD_NAME = "bedside-demo-vlm.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    RECORD_NAME,
)
SLAKE_TRAIN = "slake/train.jsonl"
VQA_RAD_TRAIN = "vqa_rad/train.jsonl"
# SLAKE locations and VQA-RAD organs mapped to one coarse body region label shared by both sets.
REGIONS = {
    "abdomen": "abdomen",
    "pelvic cavity": "abdomen",
    "abd": "abdomen",
    "lung": "chest",
    "chest lung": "chest",
    "chest heart": "chest",
    "chest mediastinal": "chest",
    "chest": "chest",
    "brain tissue": "head",
    "brain": "head",
    "brain face": "head",
    "neck": "head",
    "head": "head",
}

console = Console(stderr=True, highlight=False, soft_wrap=True)


def _say(message: str) -> None:
    console.print(f"[bold cyan]\\[demo-vlm][/] {message}")


@dataclass(frozen=True)
class Recipe:
    """Every choice that decides the built weights; its fields go into the record."""

    image_size: int = 192
    patch_size: int = 32
    vision_hidden: int = 256
    vision_layers: int = 6
    vision_heads: int = 4  # head dim 64
    vision_intermediate: int = 1024
    vision_feature_layer: int = -1
    # phase 1: tower pre-training
    tower_epochs: int = 10
    tower_batch: int = 32
    tower_lr: float = 1e-3
    tower_weight_decay: float = 0.05
    resize_margin: float = 1.15  # images stored at margin x image_size, cropped back with scale jitter
    min_crop: float = 0.85
    head_min_questions: int = 6
    # phase 1b: projector pre-training towards label words (no language model)
    verbal_epochs: int = 40
    verbal_lr: float = 3e-3
    verbal_temperature: float = 0.1
    verbal_negatives: int = 2048
    # phase 2: LLaVA training
    lm_epochs: int = 5
    lm_batch_images: int = 2
    lm_trained_layers: int = 4  # LoRA on the top layers only; the layers below are frozen and cached
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    length_buckets: int = 64  # sequences sorted by length within groups of this many (less padding)
    bf16_autocast: bool = True  # phase 1 matmuls in bfloat16 (1.6x faster on AMX CPUs); weights fp32
    bf16_language: bool = True  # phase 2 holds the frozen language model in bfloat16; merged back in fp32
    lora_lr: float = 1e-3
    warmup_fraction: float = 0.05
    seed: int = 0
    threads: int = 2

    def vision_config(self) -> dict[str, Any]:
        """The CLIPVisionConfig keyword arguments of the tower."""
        return {
            "hidden_size": self.vision_hidden,
            "intermediate_size": self.vision_intermediate,
            "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "projection_dim": self.vision_hidden,
            "num_channels": 3,
        }

    @property
    def image_tokens(self) -> int:
        """Positions one image takes in the language model ((image_size / patch_size)^2)."""
        return (self.image_size // self.patch_size) ** 2


RECIPE = Recipe()


# --------------------------------------------------------------------------------------------- data


def data_files() -> dict[str, Path]:
    """The training JSONL files (SLAKE train, VQA-RAD train); BedsideError when the shared data is absent."""
    root = paths.shared_data_dir()
    looked = root or Path(os.environ.get("BEDSIDE_SHARED_DATA", paths.REPO_ROOT.parent / "shared" / "data"))
    files = {"slake": looked / SLAKE_TRAIN, "vqa_rad": looked / VQA_RAD_TRAIN}
    if root is None or not all(path.is_file() for path in files.values()):
        raise BedsideError(
            f"the demo VLM needs the SLAKE and VQA-RAD folders (slake/train.jsonl, vqa_rad/train.jsonl) "
            f"of the shared data, looked in {looked} (set BEDSIDE_SHARED_DATA to their parent folder)"
        )
    return files


def _extra_labels(path: Path) -> dict[str, dict[str, str]]:
    """Per-image labels the Document loader does not keep: SLAKE modality/location, VQA-RAD organ."""
    labels: dict[str, dict[str, str]] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            image = str((path.parent / record["image"]).resolve())
            found = labels.setdefault(image, {})
            for key in ("modality", "location", "organ"):
                if record.get(key):
                    found.setdefault(key, normalise_answer(str(record[key])))
    return labels


@dataclass
class TrainingData:
    """The QA documents training sees, the images they ask about, and per-image labels."""

    documents: list[Document]
    images: list[Path]
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # image path -> family -> label


def load_training_data(files: dict[str, Path] | None = None) -> TrainingData:
    """SLAKE train + VQA-RAD train without its held-apart slice, in file order."""
    from toolkit.data.sources import load_image_question_answer_jsonl

    files = files or data_files()
    slake = load_image_question_answer_jsonl(files["slake"])
    rad_kept, _ = held_apart_vqa_rad(load_image_question_answer_jsonl(files["vqa_rad"]))
    documents = slake + rad_kept
    labels = _extra_labels(files["slake"])
    labels.update({k: v for k, v in _extra_labels(files["vqa_rad"]).items()})
    images: list[Path] = []
    seen: set[Path] = set()
    for document in documents:
        assert document.image is not None
        if document.image not in seen:
            seen.add(document.image)
            images.append(document.image)
    return TrainingData(documents=documents, images=images, labels=labels)


# ------------------------------------------------------------------------------------ phase 1 heads


@dataclass
class LabelHeads:
    """Classification targets of phase 1: named families of classes and each image's class per family.

    `targets[i][h]` is the class index of image i in family h, or -100 when unknown.
    """

    names: list[str]
    classes: list[list[str]]
    targets: list[list[int]]


def label_heads(data: TrainingData, min_questions: int) -> LabelHeads:
    """Families: modality, location, region, and one per frequent normalised question (see module doc)."""
    per_image: dict[Path, dict[str, str]] = {image: {} for image in data.images}
    for image in data.images:
        extra = data.labels.get(str(image), {})
        if "modality" in extra:
            per_image[image]["label:modality"] = extra["modality"]
        if "location" in extra:
            per_image[image]["label:location"] = extra["location"]
        region = REGIONS.get(extra.get("location") or extra.get("organ") or "")
        if region:
            per_image[image]["label:region"] = region
    asked: dict[str, Counter[str]] = {}
    for document in data.documents:
        assert document.image is not None and document.question is not None and document.answer is not None
        name = "question:" + normalise_answer(document.question)
        answer = normalise_answer(document.answer)
        asked.setdefault(name, Counter())[answer] += 1
        per_image[document.image].setdefault(name, answer)
    families: dict[str, list[str]] = {}
    for name in ("label:modality", "label:location", "label:region"):
        values = Counter(labels[name] for labels in per_image.values() if name in labels)
        families[name] = sorted(values)
    for name, answers in asked.items():
        kept = sorted(answer for answer, count in answers.items() if count >= 2)
        if sum(answers.values()) >= min_questions and len(kept) >= 2:
            families[name] = kept
    names = list(families)
    index = {name: {label: i for i, label in enumerate(families[name])} for name in names}
    targets = [
        [index[name].get(per_image[image].get(name, ""), -100) for name in names] for image in data.images
    ]
    return LabelHeads(names=names, classes=[families[name] for name in names], targets=targets)


# ------------------------------------------------------------------------------ phase 1b: words

# Questions whose "yes" says an object is in the image; group 1 is the object.
PRESENCE_QUESTIONS = (
    re.compile(r"^does picture contain (.+)$"),
    re.compile(r"^is there (.+) in (?:this )?image$"),
    re.compile(r"^are there (.+) in (?:this )?image$"),
    re.compile(r"^does (.+) appear in (?:this )?image$"),
    re.compile(r"^does (.+) exist in (?:this )?picture$"),
)
NOT_LABEL_WORDS = frozenset(
    {"yes", "no", "and", "or", "of", "in", "on", "with", "to", "is", "are", "none", "both", "this", "image"}
)


def image_label_words(data: TrainingData) -> dict[Path, list[str]]:
    """Words that describe each training image, for phase 1b (sorted, deduplicated, normalised).

    From the image's OPEN answers (their words: "ct", "abdomen", "left", "lung"), the objects of its
    presence questions answered yes ("Does the picture contain liver?" -> "liver"), SLAKE's modality
    and location and VQA-RAD's organ. Digits and function words are left out.
    """
    words: dict[Path, set[str]] = {image: set() for image in data.images}
    for image in data.images:
        for value in data.labels.get(str(image), {}).values():
            words[image].update(value.split())
    for document in data.documents:
        assert document.image is not None and document.question is not None and document.answer is not None
        answer = normalise_answer(document.answer)
        if not is_closed(document):
            words[document.image].update(answer.split())
        elif answer == "yes":
            question = normalise_answer(document.question)
            for pattern in PRESENCE_QUESTIONS:
                match = pattern.match(question)
                if match:
                    words[document.image].update(match.group(1).split())
                    break
    return {
        image: sorted(w for w in found if w not in NOT_LABEL_WORDS and not w.isdigit() and len(w) > 1)
        for image, found in words.items()
    }


def word_surface_counts(data: TrainingData) -> Counter[str]:
    """How often each case-sensitive word occurs in the training questions and answers."""
    counts: Counter[str] = Counter()
    for document in data.documents:
        counts.update(re.findall(r"[A-Za-z0-9]+", f"{document.question} {document.answer}"))
    return counts


def label_token_ids(tokenizer: Any, word: str, surface_counts: Counter[str]) -> list[int]:
    """The token ids of a label word as a question writes it after a space: " liver", " CT", " MRI".

    Of the forms lower / Capitalised / UPPER, the one with the fewest tokens, ties going to the form
    the training text uses most, so the image token matches what the question says.
    """
    forms = sorted({word, word.capitalize(), word.upper()})
    encoded = {form: tokenizer(" " + form, add_special_tokens=False)["input_ids"] for form in forms}
    best = min(forms, key=lambda form: (len(encoded[form]), -surface_counts[form], form))
    return list(encoded[best])


def pretrain_projector(
    recipe: Recipe,
    projector: Any,
    features: torch.Tensor,
    image_words: Sequence[Sequence[str]],
    surface_counts: Counter[str],
    tokenizer: Any,
    embeddings: torch.Tensor,
    show: bool = True,
) -> dict[str, Any]:
    """Phase 1b: make the projected image tokens read like the words that describe the image.

    The language model's embeddings are tied (input = output), so an image token p close in angle to
    the embedding of "liver" is read as "liver". For image i with label tokens W_i:

        z_kv = cos(p_k, e_v) / T   over v in V (all label tokens + `verbal_negatives` random tokens)
        loss = -mean_{w in W_i} max_k log softmax_v(z_k)[w]  +  mean_k (|p_k| / n - 1)^2

    (every label word is read, with confidence, from at least one image token; tokens no label
    claims stay free for what else the image shows)

    with n the median norm of a token embedding (the image tokens keep the scale of words). The
    language model is not run: one epoch costs milliseconds, and phase 2 then starts from image
    tokens the frozen model can already read instead of from noise.
    """
    import torch

    generator = torch.Generator().manual_seed(recipe.seed + 5)
    label_ids = [
        sorted({i for word in words for i in label_token_ids(tokenizer, word, surface_counts)})
        for words in image_words
    ]
    vocabulary = sorted({i for ids in label_ids for i in ids})
    negatives = torch.randperm(embeddings.shape[0], generator=generator)[: recipe.verbal_negatives].tolist()
    candidates = torch.tensor(sorted(set(vocabulary) | set(negatives)))
    position = {int(v): k for k, v in enumerate(candidates.tolist())}
    targets = torch.zeros((len(label_ids), len(candidates)), dtype=torch.bool)
    for i, ids in enumerate(label_ids):
        for token in ids:
            targets[i, position[token]] = True
    bank = torch.nn.functional.normalize(embeddings[candidates].detach().float(), dim=-1)
    norm = embeddings.detach().float().norm(dim=-1).median()
    has_words = targets.any(dim=1)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=recipe.verbal_lr, weight_decay=0.0)
    batch = 64
    total = recipe.verbal_epochs * math.ceil(len(label_ids) / batch)
    losses: list[float] = []
    step = 0
    with _progress() as progress:
        task = progress.add_task("phase 1b: projector -> label words", total=total, status="", visible=show)
        for _epoch in range(recipe.verbal_epochs):
            order = torch.randperm(len(label_ids), generator=generator)
            epoch_loss = 0.0
            for start in range(0, len(order), batch):
                index = order[start : start + batch]
                index = index[has_words[index]]
                tokens = projector(features[index])
                logits = torch.nn.functional.normalize(tokens, dim=-1) @ bank.T / recipe.verbal_temperature
                best = logits.log_softmax(dim=-1).max(dim=1).values  # (B, V): the token that reads most as v
                chosen = targets[index]
                word_loss = -(best * chosen).sum(1).div(chosen.sum(1)).mean()
                norm_loss = ((tokens.norm(dim=-1) / norm - 1) ** 2).mean()
                loss = word_loss + norm_loss
                for group in optimizer.param_groups:
                    group["lr"] = recipe.verbal_lr * _schedule(step, total, max(1, total // 20))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                epoch_loss += word_loss.item() * len(index)
                progress.update(task, advance=1, status=f"loss {word_loss.item():.3f}")
                _log_step("phase 1b", step, total, word_loss.item())
            losses.append(epoch_loss / int(has_words.sum()))
    return {
        "label_tokens": len(vocabulary),
        "candidates": len(candidates),
        "epoch_word_loss": [round(x, 4) for x in losses[:: max(1, len(losses) // 10)]] + [round(losses[-1], 4)],
    }


# ----------------------------------------------------------------------------------------- images


def _load_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def stored_images(images: Sequence[Path], side: int) -> torch.Tensor:
    """uint8 (N, 3, side, side): each image resized (shortest edge = side, bicubic) and center-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    out = torch.empty((len(images), 3, side, side), dtype=torch.uint8)
    for i, path in enumerate(images):
        image = _load_rgb(path)
        width, height = image.size
        scale = side / min(width, height)
        resized = image.resize(
            (max(side, round(width * scale)), max(side, round(height * scale))), Image.Resampling.BICUBIC
        )
        left = (resized.width - side) // 2
        top = (resized.height - side) // 2
        crop = resized.crop((left, top, left + side, top + side))
        out[i] = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
    return out


def augment(
    batch: torch.Tensor,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    min_crop: float,
) -> torch.Tensor:
    """Random square crop (side min_crop..1 of the stored side) resized to `size`, brightness/contrast
    jitter (x0.8-1.2 each), then the processor's normalisation. No flips: left/right is an answer."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    count, _, side, _ = batch.shape
    out = torch.empty((count, 3, size, size))
    for i in range(count):
        crop = int(side * (min_crop + (1 - min_crop) * torch.rand((), generator=generator).item()))
        top = int(torch.randint(0, side - crop + 1, (), generator=generator))
        left = int(torch.randint(0, side - crop + 1, (), generator=generator))
        patch = batch[i : i + 1, :, top : top + crop, left : left + crop].float() / 255
        patch = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        contrast = 0.8 + 0.4 * torch.rand((), generator=generator)
        brightness = 0.8 + 0.4 * torch.rand((), generator=generator)
        centre = patch.mean()
        out[i] = ((patch - centre) * contrast + centre * brightness).clamp(0, 1)[0]
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (out - mean_t) / std_t


def pixel_values(image_processor: Any, images: Sequence[Path]) -> torch.Tensor:
    """The processor's own pixel values (what inference feeds the tower), float32 (N, 3, S, S)."""
    return image_processor(images=[_load_rgb(path) for path in images], return_tensors="pt")["pixel_values"]


def patch_features(tower: Any, pixels: torch.Tensor, feature_layer: int) -> torch.Tensor:
    """Patch features the projector reads: hidden_states[feature_layer] without the class token."""
    out = tower(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[feature_layer][:, 1:]


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold cyan]\\[demo-vlm][/] {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _log_step(phase: str, step: int, total: int, loss: float) -> None:
    """A plain progress line every tenth of a phase when stderr is not a terminal (logs, CI)."""
    if not console.is_terminal and (step % max(1, total // 10) == 0 or step == total):
        _say(f"{phase}: step {step}/{total}, loss {loss:.3f}, load {os.getloadavg()[0]:.1f}")


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_tower(
    recipe: Recipe, data: TrainingData, heads: LabelHeads, image_processor: Any, show: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Phase 1: train a fresh CLIP tower as a multi-family classifier; returns (tower, figures)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(recipe.seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**recipe.vision_config()))
    sizes = [len(classes) for classes in heads.classes]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    width = max(sizes)
    # index of each family's classes in the concatenated logits, padded with a column of -inf
    gather = torch.full((len(sizes), width), offsets[-1], dtype=torch.long)
    for h, size in enumerate(sizes):
        gather[h, :size] = torch.arange(offsets[h], offsets[h] + size)
    norm = torch.nn.LayerNorm(recipe.vision_hidden)
    classifier = torch.nn.Linear(recipe.vision_hidden, offsets[-1])
    stored = stored_images(data.images, round(recipe.image_size * recipe.resize_margin))
    targets = torch.tensor(heads.targets, dtype=torch.long)
    modules = torch.nn.ModuleList([tower, norm, classifier])
    decay = [p for n, p in modules.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in modules.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.tower_weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.tower_lr,
    )
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    steps_per_epoch = math.ceil(len(data.images) / recipe.tower_batch)
    total = steps_per_epoch * recipe.tower_epochs
    warmup = max(1, int(total * recipe.warmup_fraction))
    mean, std = image_processor.image_mean, image_processor.image_std
    losses: list[float] = []
    step = 0
    modules.train()
    with _progress() as progress:
        task = progress.add_task("phase 1: tower pre-training", total=total, status="", visible=show)
        for _epoch in range(recipe.tower_epochs):
            order = torch.randperm(len(data.images), generator=generator)
            epoch_loss = 0.0
            for start in range(0, len(order), recipe.tower_batch):
                index = order[start : start + recipe.tower_batch]
                pixels = augment(stored[index], recipe.image_size, mean, std, generator, recipe.min_crop)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16_autocast):
                    feats = patch_features(tower, pixels, recipe.vision_feature_layer).mean(dim=1)
                    logits = classifier(norm(feats)).float()
                padded = torch.cat([logits, torch.full((len(index), 1), -1e9)], dim=1)
                per_family = padded[:, gather]  # (B, H, width)
                batch_targets = targets[index]
                known = batch_targets >= 0
                loss = torch.nn.functional.cross_entropy(per_family[known], batch_targets[known])
                for group in optimizer.param_groups:
                    group["lr"] = recipe.tower_lr * _schedule(step, total, warmup)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(modules.parameters(), 1.0)
                optimizer.step()
                step += 1
                epoch_loss += loss.item() * len(index)
                progress.update(task, advance=1, status=f"loss {loss.item():.3f}")
                _log_step("phase 1", step, total, loss.item())
            losses.append(epoch_loss / len(data.images))
    tower.eval()
    figures = {"families": len(heads.names), "classes": offsets[-1], "epoch_loss": [round(x, 4) for x in losses]}
    return tower, figures


# ---------------------------------------------------------------------------------- phase 2 data


@dataclass
class PackedSequence:
    """One image's prefix (system prompt, user turn start, image positions) and some of its QA segments."""

    image: int
    input_ids: list[int]
    labels: list[int]
    positions: list[int]
    segments: list[int]  # 0 = shared prefix, k = k-th question/answer segment


@dataclass
class PromptParts:
    """The tokenized pieces every single-turn image prompt is made of."""

    prefix: list[int]  # up to the image, with image_tokens copies of the image token id
    image_token_id: int
    end_id: int

    def segment(self, tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
        """Ids and labels of "\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>"."""
        prompt_ids, answer_ids = _split_turn(tokenizer, question, answer)
        ids = prompt_ids + answer_ids + [self.end_id]
        labels = [-100] * len(prompt_ids) + answer_ids + [self.end_id]
        return ids, labels


def render_prompt(tokenizer: Any, question: str) -> str:
    """The single-turn prompt text of an image question (chat template, generation prompt added)."""
    from toolkit.model.llava import vision_user_content

    return tokenizer.apply_chat_template(
        [{"role": "user", "content": vision_user_content(question)}], tokenize=False, add_generation_prompt=True
    )


def _split_turn(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    text = render_prompt(tokenizer, question)
    after = text.split(IMAGE_MARKER, 1)[1]
    prompt_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(after + answer, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise BedsideError(f"the answer {answer!r} changes the prompt's tokens: cannot train on it")
    return prompt_ids, full_ids[len(prompt_ids) :]


def prompt_parts(tokenizer: Any, image_tokens: int) -> PromptParts:
    """The shared prefix of all image prompts, checked to tokenize the same as a whole prompt."""
    text = render_prompt(tokenizer, "?")
    before = text.split(IMAGE_MARKER, 1)[0]
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"] + [image_token_id] * image_tokens
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    split = tokenizer(text.split(IMAGE_MARKER, 1)[1], add_special_tokens=False)["input_ids"]
    if whole != prefix[: len(prefix) - image_tokens] + [image_token_id] + split:
        raise BedsideError("the chat template's prompt does not split at the image marker: recipe needs a fix")
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return PromptParts(prefix=prefix, image_token_id=image_token_id, end_id=end_id)


def pack_sequences(
    data: TrainingData, tokenizer: Any, parts: PromptParts, per_sequence: int, generator: torch.Generator
) -> list[PackedSequence]:
    """Each image's questions, shuffled, in chunks of at most `per_sequence` behind one prefix."""
    import torch

    index = {image: i for i, image in enumerate(data.images)}
    by_image: dict[int, list[Document]] = {}
    for document in data.documents:
        assert document.image is not None
        by_image.setdefault(index[document.image], []).append(document)
    packed: list[PackedSequence] = []
    prefix_length = len(parts.prefix)
    for image, documents in by_image.items():
        order = torch.randperm(len(documents), generator=generator).tolist()
        for start in range(0, len(order), per_sequence):
            ids = list(parts.prefix)
            labels = [-100] * prefix_length
            positions = list(range(prefix_length))
            segments = [0] * prefix_length
            for k, j in enumerate(order[start : start + per_sequence], start=1):
                document = documents[j]
                assert document.question is not None and document.answer is not None
                seg_ids, seg_labels = parts.segment(tokenizer, document.question, document.answer)
                ids += seg_ids
                labels += seg_labels
                positions += range(prefix_length, prefix_length + len(seg_ids))
                segments += [k] * len(seg_ids)
            packed.append(PackedSequence(image, ids, labels, positions, segments))
    return packed


def collate(batch: Sequence[PackedSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch; the boolean 4D mask lets a token see earlier tokens of its segment and the prefix."""
    import torch

    length = max(len(item.input_ids) for item in batch)
    size = len(batch)
    ids = torch.full((size, length), pad_id, dtype=torch.long)
    labels = torch.full((size, length), -100, dtype=torch.long)
    positions = torch.zeros((size, length), dtype=torch.long)
    segments = torch.full((size, length), -1, dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        positions[row, :n] = torch.tensor(item.positions)
        segments[row, :n] = torch.tensor(item.segments)
    causal = torch.ones((length, length), dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    mask = causal[None] & ((key == 0) | (key == query)) & (key >= 0) & (query >= 0)
    mask |= torch.eye(length, dtype=torch.bool)[None]  # padding rows see themselves (no empty softmax)
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "attention_mask": mask[:, None],
        "images": torch.tensor([item.image for item in batch]),
    }


# ------------------------------------------------------------------------------------ phase 2 train


def init_projector(projector: Any, features: torch.Tensor, embeddings: torch.Tensor, seed: int) -> None:
    """Data-dependent initialisation of the 2-layer projector, so image tokens start at the scale of words.

    The tower's last hidden states are not normalised (their norm was ~200 against ~3 for a token
    embedding): taken raw, the image positions would swamp the language model's residual stream.
    With mu, sigma the per-dimension mean and std of the training images' patch features:

        linear_1: W1 = G1 / sqrt(d_in) * diag(1 / sigma),  b1 = -W1 mu   (pre-activations ~ N(0, 1))
        linear_2: W2 = G2 * s / sqrt(d_hidden),            b2 = mean token embedding

    G1, G2 standard normal (seeded); s = the per-dimension std of the token embeddings divided by
    the std of gelu(N(0, 1)), so projected tokens have the embeddings' mean and spread.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    flat = features.reshape(-1, features.shape[-1]).double()
    mu, sigma = flat.mean(0), flat.std(0).clamp_min(1e-6)
    linear_1, linear_2 = projector.linear_1, projector.linear_2
    d_in, d_hidden = linear_1.in_features, linear_1.out_features
    with torch.no_grad():
        g1 = torch.randn(linear_1.weight.shape, generator=generator, dtype=torch.float64)
        w1 = g1 / math.sqrt(d_in) / sigma[None, :]
        linear_1.weight.copy_(w1)
        linear_1.bias.copy_(-(w1 @ mu))
        gelu_std = torch.nn.functional.gelu(torch.randn(100_000, generator=generator)).std().item()
        scale = embeddings.std().item() / gelu_std
        g2 = torch.randn(linear_2.weight.shape, generator=generator)
        linear_2.weight.copy_(g2 * scale / math.sqrt(d_hidden))
        linear_2.bias.copy_(embeddings.mean(0))


def _length_batches(packed: Sequence[PackedSequence], recipe: Recipe, generator: torch.Generator) -> list[list[int]]:
    """Batches of sequence indices: shuffled, sorted by length within groups of `length_buckets`, cut into
    batches of `lm_batch_images`, the batches shuffled again (similar lengths pad little)."""
    import torch

    order = torch.randperm(len(packed), generator=generator).tolist()
    batches: list[list[int]] = []
    for start in range(0, len(order), recipe.length_buckets):
        group = sorted(order[start : start + recipe.length_buckets], key=lambda i: len(packed[i].input_ids))
        batches += [group[i : i + recipe.lm_batch_images] for i in range(0, len(group), recipe.lm_batch_images)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _merge_lora(peft_language: Any, original: dict[str, torch.Tensor]) -> Any:
    """The language model with fp32 weights = original fp32 weights + LoRA delta (B A * alpha / r).

    Training may hold the frozen weights in bfloat16; the merge starts again from the fp32 originals
    so that only the learned delta differs from the demo model.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for name, module in peft_language.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            adapter = module.active_adapters[0]
            a = module.lora_A[adapter].weight.float()
            b = module.lora_B[adapter].weight.float()
            deltas[f"{name}.weight"] = (b @ a) * module.scaling[adapter]
    base = peft_language.unload().float()
    base.load_state_dict(original)
    with torch.no_grad():
        parameters = dict(base.named_parameters())
        for name, delta in deltas.items():
            parameters[name].add_(delta)
    return base


def _run_layers(language: Any, layers: Sequence[Any], hidden: torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
    """Decoder layers of the language model over hidden states, with the batch's block mask and positions."""
    position_embeddings = language.rotary_emb(hidden, batch["position_ids"])
    for layer in layers:
        hidden = layer(
            hidden,
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            position_embeddings=position_embeddings,
        )
    return hidden


def train_llava(
    recipe: Recipe,
    model: Any,
    tokenizer: Any,
    data: TrainingData,
    features: torch.Tensor,
    show: bool = True,
    step_callback: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Phase 2: a LoRA on the top `lm_trained_layers` layers, trained on every QA pair, merged in fp32.

    Tower and projector are frozen (phases 1 and 1b), and so are the layers below the LoRA: their
    output for each image's sequence (prefix + all its question/answer segments, block mask) is
    computed once, in bfloat16, and each epoch runs only the top layers, forward and backward, on
    it. Loss: cross-entropy on the answer tokens and the closing <|im_end|>.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(recipe.seed + 2)
    language = model.model.language_model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    original = {name: tensor.detach().clone() for name, tensor in language.state_dict().items()}
    compute = torch.bfloat16 if recipe.bf16_language else torch.float32
    language.to(compute)  # embeddings too: lm_head is tied to them
    layers = list(language.layers)
    first_trained = len(layers) - recipe.lm_trained_layers
    parts = prompt_parts(tokenizer, recipe.image_tokens)
    generator = torch.Generator().manual_seed(recipe.seed + 3)
    packed = pack_sequences(data, tokenizer, parts, 1 << 30, generator)  # one sequence per image
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else parts.end_id
    projector = model.model.multi_modal_projector
    embed = language.get_input_embeddings()

    cached: list[torch.Tensor] = [torch.empty(0)] * len(packed)
    lower_batches = _length_batches(packed, replace(recipe, lm_batch_images=4), torch.Generator().manual_seed(0))
    with _progress() as progress, torch.no_grad():
        task = progress.add_task("phase 2: frozen layers (cached)", total=len(lower_batches), status="", visible=show)
        for count, members in enumerate(lower_batches, start=1):
            batch = collate([packed[i] for i in members], pad_id)
            image_embeds = projector(features[batch["images"]]).to(compute)
            embeds = embed(batch["input_ids"])
            is_image = batch["input_ids"] == parts.image_token_id
            embeds = embeds.masked_scatter(is_image[..., None], image_embeds.reshape(-1, embeds.shape[-1]))
            hidden = _run_layers(language, layers[:first_trained], embeds, batch)
            for row, i in enumerate(members):
                cached[i] = hidden[row, : len(packed[i].input_ids)].clone()
            progress.update(task, advance=1)
            _log_step("phase 2 cache", count, len(lower_batches), 0.0)

    lora = LoraConfig(
        r=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(recipe.lora_targets),
        layers_to_transform=list(range(first_trained, len(layers))),
        layers_pattern="layers",
    )
    peft_language = get_peft_model(language, lora, autocast_adapter_dtype=True)  # adapters in fp32
    lora_params = [p for p in peft_language.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_params, lr=recipe.lora_lr, weight_decay=0.0)
    top = list(language.layers)[first_trained:]  # the same modules, now holding the LoRA adapters
    batches_per_epoch = len(_length_batches(packed, recipe, torch.Generator()))
    total = batches_per_epoch * recipe.lm_epochs
    warmup = max(1, int(total * recipe.warmup_fraction))
    losses: list[float] = []
    tokens_seen = 0
    step = 0
    peft_language.train()
    with _progress() as progress:
        task = progress.add_task("phase 2: LoRA on the top layers", total=total, status="", visible=show)
        for epoch in range(recipe.lm_epochs):
            epoch_loss, epoch_tokens = 0.0, 0
            for members in _length_batches(packed, recipe, generator):
                batch = collate([packed[i] for i in members], pad_id)
                hidden = torch.zeros((len(members), batch["input_ids"].shape[1], cached[0].shape[-1]), dtype=compute)
                for row, i in enumerate(members):
                    hidden[row, : cached[i].shape[0]] = cached[i]
                hidden = language.norm(_run_layers(language, top, hidden, batch))
                labels = batch["labels"][:, 1:]
                chosen = labels >= 0
                logits = model.lm_head(hidden[:, :-1][chosen])
                loss = torch.nn.functional.cross_entropy(logits.float(), labels[chosen])
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lora_lr * _schedule(step, total, warmup)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(lora_params, 1.0)
                optimizer.step()
                step += 1
                count = int(chosen.sum())
                epoch_loss += loss.item() * count
                epoch_tokens += count
                tokens_seen += int(batch["input_ids"].numel())
                progress.update(task, advance=1, status=f"epoch {epoch + 1} loss {loss.item():.3f}")
                _log_step("phase 2", step, total, loss.item())
                if step_callback is not None:
                    step_callback(step, loss.item())
            losses.append(epoch_loss / max(1, epoch_tokens))
    model.model.language_model = _merge_lora(peft_language, original)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return {
        "sequences": len(packed),
        "cached_tokens": sum(len(item.input_ids) for item in packed),
        "frozen_layers": first_trained,
        "steps": total,
        "tokens_processed": tokens_seen,
        "answer_token_loss_per_epoch": [round(x, 4) for x in losses],
    }


# -------------------------------------------------------------------------------------------- build


def _versions() -> dict[str, str]:
    found = {}
    for package in ("transformers", "torch", "peft", "tokenizers", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def input_hashes(files: dict[str, Path]) -> dict[str, Any]:
    """sha256 of what the build reads: the demo model's record and weights, the data files and images."""
    import hashlib

    demo = paths.demo_model_dir()
    images = hashlib.sha256()
    for name in ("slake", "vqa_rad"):
        folder = files[name].parent / "images"
        for image in sorted(folder.glob("*.jpg")):
            images.update(image.name.encode() + b"\0" + file_sha256(image).encode())
    return {
        "demo_model_record": file_sha256(demo / "bedside-demo.json"),
        "demo_model_weights": file_sha256(demo / "model.safetensors"),
        "slake_train": file_sha256(files["slake"]),
        "vqa_rad_train": file_sha256(files["vqa_rad"]),
        "images": images.hexdigest(),
    }


def read_record(folder: Path | None = None) -> dict[str, Any] | None:
    """The build record of the demo VLM, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(((folder or paths.demo_vlm_dir()) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_demo_vlm_valid(files: dict[str, Path] | None = None, recipe: Recipe = RECIPE) -> bool:
    """True when the folder is complete and its record matches the recipe and the current inputs."""
    folder = paths.demo_vlm_dir()
    record = read_record(folder)
    recipe_as_stored = json.loads(json.dumps(asdict(recipe)))  # tuples become lists, as in the record
    if record is None or record.get("recipe_version") != RECIPE_VERSION or record.get("recipe") != recipe_as_stored:
        return False
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    if files is None:
        return True
    return record.get("inputs") == input_hashes(files)


def _replace_directory(partial: Path, final: Path) -> None:
    """Move a finished build into place; an older build is moved aside first, then deleted."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_in(recipe: Recipe, out: Path, files: dict[str, Path], show: bool = True) -> dict[str, Any]:
    """Train the demo VLM with `recipe` and write the checkpoint to `out`; returns the training figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.model.llava import new_llava, write_llava_checkpoint

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    demo = paths.demo_model_dir()
    if not (demo / "config.json").is_file():
        raise BedsideError(f"the demo model is not set up at {demo}: run `make setup` first")
    data = load_training_data(files)
    _say(f"training data: {len(data.documents)} QA on {len(data.images)} images (SLAKE train + VQA-RAD train)")
    tokenizer = AutoTokenizer.from_pretrained(demo, trust_remote_code=False)
    language = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32, trust_remote_code=False)
    model, tokenizer, image_processor = new_llava(
        language,
        tokenizer,
        recipe.vision_config(),
        vision_feature_layer=recipe.vision_feature_layer,
        seed=recipe.seed,
    )
    del language
    heads = label_heads(data, recipe.head_min_questions)
    _say(f"phase 1: {len(heads.names)} label families on {len(data.images)} images")
    tower_started = time.perf_counter()
    tower, tower_figures = pretrain_tower(recipe, data, heads, image_processor, show=show)
    tower_figures["seconds"] = round(time.perf_counter() - tower_started, 1)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    with torch.no_grad():
        features = torch.cat(
            [
                patch_features(model.model.vision_tower, pixel_values(image_processor, chunk), recipe.vision_feature_layer)
                for chunk in _batched(data.images, 64)
            ]
        )
    projector = model.model.multi_modal_projector
    embeddings = model.model.language_model.get_input_embeddings().weight
    init_projector(projector, features, embeddings, recipe.seed + 4)
    words_started = time.perf_counter()
    image_words = image_label_words(data)
    words_figures = pretrain_projector(
        recipe,
        projector,
        features,
        [image_words[image] for image in data.images],
        word_surface_counts(data),
        tokenizer,
        embeddings,
        show,
    )
    words_figures["seconds"] = round(time.perf_counter() - words_started, 1)
    lm_started = time.perf_counter()
    lm_figures = train_llava(recipe, model, tokenizer, data, features, show=show)
    lm_figures["seconds"] = round(time.perf_counter() - lm_started, 1)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.config.text_config.eos_token_id = eos
    write_llava_checkpoint(model, tokenizer, image_processor, out)
    return {
        "phase1_tower": tower_figures,
        "phase1b_words": words_figures,
        "phase2_llava": lm_figures,
        "training_qa": len(data.documents),
        "training_images": len(data.images),
        "seconds": round(time.perf_counter() - started, 1),
    }


def build_demo_vlm(force: bool = False, show_progress: bool = True) -> Path:
    """Build the demo VLM once (about 20 min on 2 cores) and return its folder, paths.demo_vlm_dir().

    Returns at once when a complete build matching the recipe and inputs exists, unless `force`.
    Raises BedsideError when the shared SLAKE / VQA-RAD data or the demo model is missing.
    """
    files = data_files()
    final = paths.demo_vlm_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if not force and is_demo_vlm_valid(files):
            _say(f"demo VLM already built: {final}")
            return final
        started = time.perf_counter()
        inputs = input_hashes(files)
        partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            figures = build_in(RECIPE, partial, files, show=show_progress)
            record = {
                "recipe_version": RECIPE_VERSION,
                "recipe": asdict(RECIPE),
                "seeds": {"seed": RECIPE.seed, "threads": RECIPE.threads},
                "model": "LLaVA: SmolLM2-135M-Instruct + CLIP tower trained here + 2-layer GELU projector",
                "license": "Apache-2.0 (language model); trained on SLAKE (CC BY 4.0) and VQA-RAD (CC0)",
                "inputs": inputs,
                "training": figures,
                "versions": _versions(),
                "build_seconds": round(time.perf_counter() - started, 1),
                "load_average": list(os.getloadavg()),
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            (partial / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
            _replace_directory(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _say(f"demo VLM ready in {time.perf_counter() - started:.0f} s: {final}")
        return final


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m toolkit.model.demo_vlm [--force]`: build (or find) the demo VLM, print its folder."""
    import argparse

    parser = argparse.ArgumentParser(description="Build the demo vision-language model (cached).")
    parser.add_argument("--force", action="store_true", help="rebuild even when a valid build exists")
    args = parser.parse_args(argv)
    # Waiting OpenMP threads sleep instead of spinning: on a machine shared with other work, spinning
    # threads made training steps 5-10x slower (measured). Effective only before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        folder = build_demo_vlm(force=args.force)
    except BedsideError as error:
        console.print(f"[bold red]error:[/] {error}")
        return error.exit_code
    print(folder)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
