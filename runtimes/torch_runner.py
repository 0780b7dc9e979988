"""The reference runtime: a Hugging Face checkpoint in transformers (fp32 on CPU).

Every exported artifact is judged against this runner, so it does the plainest thing:
AutoModelForCausalLM + AutoTokenizer from the folder (LlavaForConditionalGeneration + its image
processor for a LLaVA), no trust_remote_code, a DynamicCache for the KV loop. On CUDA it uses the checkpoint's own dtype (bf16/fp16) so a 7B reference fits one GPU;
pass `dtype="float32"` to `TorchRunner(...)` to force full precision there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.image import open_rgb, read_processor_config
from runtimes.registry import register_runner, require_format
from runtimes.results import RuntimeLoadError
from runtimes.runner import Message, Runner, first_line, render_chat_template
from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.errors import BedsideError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@register_runner
class TorchRunner(Runner):
    """Hugging Face folder (config.json + safetensors + tokenizer) run by transformers."""

    name = "torch"

    def __init__(self, batch_size: int | None = None, dtype: str | None = None) -> None:
        super().__init__(batch_size)
        self.dtype_name = dtype
        self.model: Any = None
        self.tokenizer: Any = None
        self._cache: Any = None
        self._eos_ids: set[int] = set()
        self.image_processor: Any = None
        self._image_tokens = 0

    def _load(self, path: Path, *, n_ctx: int, n_threads: int | None, device: str) -> None:
        require_format(path, "hf", self.name)
        try:
            refuse_custom_code(path)  # before transformers reads the config: it would prompt, then import
        except BedsideError as error:
            raise RuntimeLoadError(str(error)) from None
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise RuntimeLoadError(
                f"{path}: no tokenizer (expected tokenizer.json or tokenizer.model beside config.json)"
            )
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

        from toolkit.core.tokenizer_loading import load_auto_tokenizer

        if n_threads:
            torch.set_num_threads(n_threads)
        if self.dtype_name:
            dtype = getattr(torch, self.dtype_name)
        elif device == "cuda":
            dtype = "auto"
        else:
            dtype = torch.float32
        try:
            self.tokenizer = load_auto_tokenizer(path)
        except Exception as error:
            raise RuntimeLoadError(f"{path}: tokenizer cannot be loaded: {first_line(error)}") from error
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
            model_class = AutoModelForCausalLM
            if config.model_type == "llava":
                model_class = LlavaForConditionalGeneration
                self._load_image_processor(path, config)
            model = model_class.from_pretrained(path, dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=False)
        except RuntimeLoadError:
            raise
        except Exception as error:
            raise RuntimeLoadError(
                f"{path}: transformers cannot load the model: {first_line(error)}"
            ) from error
        self.model = model.to(device).eval()
        self.path = path
        self._eos_ids = _eos_token_ids(self.tokenizer, getattr(model, "generation_config", None))

    def _load_image_processor(self, path: Path, config: Any) -> None:
        """The checkpoint's own image processor (CLIPImageProcessor); the ONNX runner mirrors it in numpy."""
        from transformers import AutoImageProcessor

        read_processor_config(path)  # one-line error when the LLaVA folder lacks it
        self.image_processor = AutoImageProcessor.from_pretrained(path, use_fast=False, trust_remote_code=False)
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self._image_tokens = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)

    @property
    def has_vision(self) -> bool:
        """True for a LLaVA checkpoint."""
        return self.image_processor is not None

    @property
    def image_tokens(self) -> int:
        """Positions per image: (image_size / patch_size)^2 (+1 with the "full" strategy)."""
        return self._image_tokens

    def _forward_image(self, image: Path) -> np.ndarray:
        if not self.has_vision:
            return super()._forward_image(image)
        import torch
        from transformers import DynamicCache

        pixels = self.image_processor(images=open_rgb(image), return_tensors="pt")["pixel_values"]
        if self._cache is None:
            self._cache = DynamicCache()
        config = self.model.config
        with torch.inference_mode():
            features = self.model.model.get_image_features(
                pixel_values=pixels.to(self.model.device, self.model.dtype),
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )[0]
            output = self.model(
                inputs_embeds=features[None], past_key_values=self._cache, use_cache=True, logits_to_keep=1
            )
        self._cache = output.past_key_values
        return output.logits[0].float().cpu().numpy()

    @property
    def vocab_size(self) -> int:
        """Rows of the output embedding (the logit width)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Ids from the checkpoint's tokenizer (special-token text is parsed as special tokens)."""
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The tokenizer's own chat template (the plain transcript when it has none)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return render_chat_template(None, messages, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def is_end_of_generation(self, token: int) -> bool:
        """EOS of the tokenizer or of generation_config.json."""
        return token in self._eos_ids

    def reset(self) -> None:
        """Drop the KV cache."""
        self._cache = None
        self.n_past = 0

    def _rewind(self, n_past: int) -> None:
        """Crop the DynamicCache to its first n_past positions."""
        self._cache.crop(n_past)

    def _forward(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        if self._cache is None:
            self._cache = DynamicCache()
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                past_key_values=self._cache,
                use_cache=True,
                logits_to_keep=0 if all_logits else 1,
            )
        self._cache = output.past_key_values
        return output.logits[0].float().cpu().numpy()

    def close(self) -> None:
        """Release the model."""
        self.model = None
        self._cache = None


def _eos_token_ids(tokenizer: Any, generation_config: Any) -> set[int]:
    ids: set[int] = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list | tuple):
        ids.update(int(i) for i in configured)
    return ids
