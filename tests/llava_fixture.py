"""A tiny random LLaVA checkpoint folder (llava-hf layout, demo tokenizer) and test images, for the VLM tests.

Weights are random but deterministic (seeded); the language model's initializer range is wide enough
(0.1) that next-token logits are not near-ties, so runtimes can be compared token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "image_size": 64,
    "patch_size": 16,
    "projection_dim": 64,
}


def build_tiny_llava(out: Path, seed: int = 0) -> Path:
    """Write the tiny random LLaVA to `out` (2 Llama layers of width 64, CLIP tower of 3 layers, 16 image tokens)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from toolkit.core.paths import demo_model_dir
    from toolkit.model.llava import new_llava, write_llava_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    torch.manual_seed(seed)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    language_model = LlamaForCausalLM(text)
    model, tokenizer, processor = new_llava(
        language_model, tokenizer, dict(TINY_VISION, initializer_range=0.1), seed=seed
    )
    return write_llava_checkpoint(model, tokenizer, processor, out)


def write_test_image(path: Path, seed: int = 0, size: tuple[int, int] = (80, 72)) -> Path:
    """A deterministic RGB PNG (smooth gradient plus noise) of `size` pixels, not square, to exercise resize and crop."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def check_scoring_after_one_prefill(runner: object, image: Path, tolerance: float = 1e-4) -> None:
    """The measure's image scoring (prompt and image prefilled once, the cache rewound after each continuation)
    gives the rows, option totals and greedy reply of a fresh prefill per continuation, and leaves the cache empty."""
    from runtimes.measure import _image_results
    from toolkit.core.vision import IMAGE_MARKER

    messages = [{"role": "user", "content": f"{IMAGE_MARKER}\nIs there a fracture?"}]
    answer, other = "Yes, in the left femur", "No"
    parts = runner.prompt_parts(messages, image)
    fresh_answer = runner.continuation_logprobs(parts, runner.tokenize(answer))
    fresh_other = runner.continuation_logprobs(parts, runner.tokenize(other))
    fresh_reply = runner.generate(messages, image=image, max_new_tokens=6).text
    closed, open_ = _image_results(
        runner,
        [
            {"messages": messages, "image": str(image), "answer": answer, "options": [answer, other]},
            {"messages": messages, "image": str(image), "answer": answer, "max_new_tokens": 6},
        ],
    )
    np.testing.assert_allclose(closed["answer_logprobs"], fresh_answer, atol=tolerance)
    np.testing.assert_allclose(closed["options"], [fresh_answer.sum(), fresh_other.sum()], atol=tolerance)
    np.testing.assert_allclose(open_["answer_logprobs"], fresh_answer, atol=tolerance)
    assert open_["generated"] == fresh_reply and closed["generated"] is None
    assert runner.n_past == 0
    runner.forward(runner.tokenize("Is"))  # a rewind below the cache's start or past its end is refused
    for bad in (-1, runner.n_past + 1):
        try:
            runner.rewind(bad)
        except ValueError as error:
            assert "cannot rewind" in str(error)
        else:
            raise AssertionError(f"rewind({bad}) was accepted")
    runner.reset()
