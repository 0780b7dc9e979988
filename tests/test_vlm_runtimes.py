"""Image questions on the runtimes: pixel preprocessing, the torch reference against transformers, bad images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtimes import RuntimeLoadError, load_runner
from runtimes.image import load_pixels, read_processor_config
from tests.llava_fixture import check_scoring_after_one_prefill
from toolkit.core.vision import IMAGE_MARKER

QUESTION = [{"role": "user", "content": f"{IMAGE_MARKER}\nIs there a fracture?"}]


@pytest.fixture(scope="module")
def torch_llava(tiny_llava):
    with load_runner(tiny_llava, n_ctx=256) as runner:
        yield runner


def test_numpy_preprocessing_matches_clip_image_processor(tiny_llava, test_images):
    from PIL import Image
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor.from_pretrained(tiny_llava)
    config = read_processor_config(tiny_llava)
    for path in test_images:
        ours = load_pixels(path, config)
        theirs = reference(images=Image.open(path), return_tensors="np")["pixel_values"]
        assert ours.shape == theirs.shape == (1, 3, 64, 64)
        np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_torch_runner_matches_transformers_on_image_and_answer(torch_llava, tiny_llava, test_images):
    """Image features at the marker, then the answer: same log-probs as LlavaForConditionalGeneration on the whole prompt."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava).eval()
    text = processor.tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    answer = torch_llava.tokenize("Yes, in the left femur")
    inputs = processor(images=Image.open(test_images[1]), text=text, return_tensors="pt")
    full = torch.cat([inputs["input_ids"], torch.tensor([answer])], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, pixel_values=inputs["pixel_values"]).logits[0]
    start = inputs["input_ids"].shape[1] - 1
    expected = torch.log_softmax(logits[start : start + len(answer)], -1)[torch.arange(len(answer)), answer]

    parts = torch_llava.prompt_parts(QUESTION, test_images[1])
    assert torch_llava.parts_length(parts) == inputs["input_ids"].shape[1]
    assert sum(isinstance(part, Path) for part in parts) == 1
    ours = torch_llava.continuation_logprobs(parts, answer)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-4)
    assert torch_llava.n_past == 0  # scoring leaves the cache empty


def test_the_image_changes_the_answer_distribution(torch_llava, test_images):
    answer = torch_llava.tokenize("No")
    scores = [
        float(torch_llava.continuation_logprobs(torch_llava.prompt_parts(QUESTION, image), answer)[0])
        for image in test_images
    ]
    assert max(scores) - min(scores) > 1e-3


def test_generation_with_an_image_counts_image_positions(torch_llava, test_images):
    result = torch_llava.generate(QUESTION, image=test_images[0], max_new_tokens=4)
    text_only = torch_llava.prompt_ids(QUESTION)
    assert result.prompt_tokens == len(text_only) - 1 + torch_llava.image_tokens  # the marker token became 16 positions
    assert len(result.token_ids) == 4


def test_prompt_without_marker_and_text_only_artifact_are_refused(torch_llava, test_images, demo_model_dir):
    with pytest.raises(ValueError, match="exactly once"):
        torch_llava.prompt_parts([{"role": "user", "content": "no marker"}], test_images[0])
    with (
        load_runner(demo_model_dir, n_ctx=64) as text_only,
        pytest.raises(ValueError, match="no vision tower"),
    ):
        text_only.generate(QUESTION, image=test_images[0], max_new_tokens=1)


def test_missing_and_non_image_files_fail_with_one_line(torch_llava, tmp_path):
    with pytest.raises(RuntimeLoadError, match="not found") as missing:
        torch_llava.generate(QUESTION, image=tmp_path / "absent.png", max_new_tokens=1)
    not_image = tmp_path / "scan.png"
    not_image.write_text("this is a radiology report, not a picture")
    with pytest.raises(RuntimeLoadError, match="cannot be read") as broken:
        torch_llava.generate(QUESTION, image=not_image, max_new_tokens=1)
    for error in (missing, broken):
        assert "\n" not in str(error.value)


def test_llava_folder_without_processor_config_is_refused(tiny_llava, tmp_path):
    import shutil

    copy = tmp_path / "llava"
    shutil.copytree(tiny_llava, copy)
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(RuntimeLoadError, match="preprocessor_config.json"):
        load_runner(copy, n_ctx=64)


def test_scoring_after_one_prefill_matches_a_prefill_per_continuation(torch_llava, test_images):
    check_scoring_after_one_prefill(torch_llava, test_images[0])
