"""LLaVA checkpoints in the llava-hf layout: what makes a folder one, and how Bedside writes one.

A vision-language checkpoint Bedside accepts is a `LlavaForConditionalGeneration` folder as
llava-hf publishes them: config.json (LlavaConfig: a CLIP vision tower, an MLP projector and a
Llama-family language model), safetensors, the tokenizer with the image placeholder token, and the
processor files (preprocessor_config.json: resize, crop and normalisation of the image).

The prompt convention every runtime shares: the user turn holds the literal `IMAGE_MARKER` where
the image goes; a runner renders the chat template, splits the text at the marker and puts the
image's projected features there (image_seq_length positions), as LlavaProcessor does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.core.errors import BedsideError
from toolkit.core.vision import IMAGE_MARKER, PROCESSOR_FILE

LLAVA_ARCHITECTURE = "LlavaForConditionalGeneration"


def is_vision_language(folder: str | Path) -> bool:
    """True when the folder's config.json declares a LLaVA (vision tower + projector + language model)."""
    config_path = Path(folder) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    return LLAVA_ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == "llava"


def require_processor(folder: str | Path) -> Path:
    """The processor config of a LLaVA folder; BedsideError naming the fix when it is missing or unreadable."""
    path = Path(folder) / PROCESSOR_FILE
    if not path.is_file():
        raise BedsideError(
            f"LLaVA folder '{folder}' has no {PROCESSOR_FILE} (the image processor: size, crop, mean, std): "
            "copy it from the checkpoint's original folder (save it with processor.save_pretrained)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise BedsideError(f"{path} is not valid JSON ({error}): copy the original {PROCESSOR_FILE}") from None
    if not isinstance(config, dict) or not ("image_mean" in config and "image_std" in config):
        raise BedsideError(f"{path} lacks image_mean / image_std: copy the original {PROCESSOR_FILE}")
    return path


def image_seq_length(config: dict[str, Any]) -> int:
    """Positions one image takes in the language model: (image_size / patch_size)^2, +1 with strategy "full"."""
    vision = config.get("vision_config") or {}
    side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
    full = config.get("vision_feature_select_strategy", "default") == "full"
    return side * side + (1 if full else 0)


def vision_user_content(question: str) -> str:
    """The user turn of an image question: the image marker first, then the question (LLaVA-1.5's order)."""
    return f"{IMAGE_MARKER}\n{question}"


def write_llava_checkpoint(model: Any, tokenizer: Any, image_processor: Any, out: str | Path) -> Path:
    """Save a LlavaForConditionalGeneration with its tokenizer and processor in the llava-hf layout.

    The processor (LlavaProcessor) writes preprocessor_config.json and processor_config.json; the
    tokenizer keeps its chat template, so runtimes without transformers render the same prompt.
    """
    from transformers import LlavaProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,  # CLIP's class token; "default" strategy drops it again
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_MARKER,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return out


def new_llava(
    language_model: Any,
    tokenizer: Any,
    vision_config: dict[str, Any],
    *,
    projector_hidden_act: str = "gelu",
    vision_feature_layer: int = -2,
    seed: int = 0,
) -> tuple[Any, Any, Any]:
    """A LLaVA around an existing causal LM: a fresh CLIP tower and projector, the image token added.

    Returns (model, tokenizer, image_processor). The tokenizer gains IMAGE_MARKER as a special token
    and the language model's embeddings grow by one row for it (the image token's embedding is never
    read: its positions are overwritten by the projected image features).
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    if IMAGE_MARKER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_MARKER)
    if language_model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    vision = CLIPVisionConfig(**vision_config)
    side = vision.image_size // vision.patch_size
    config = LlavaConfig(
        vision_config=vision,
        text_config=language_model.config,
        image_token_index=image_token_id,
        projector_hidden_act=projector_hidden_act,
        vision_feature_select_strategy="default",
        vision_feature_layer=vision_feature_layer,
        image_seq_length=side * side,
        tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)),
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    return model.eval(), tokenizer, image_processor
