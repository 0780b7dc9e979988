"""Compressing a LLaVA: image positions in the calibration blocks, the pipeline end to end on the tiny LLaVA."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from toolkit.compress.pipeline import compress
from toolkit.compress.record import CompressOptions
from toolkit.compress.stages import load_causal_lm, load_tokenizer
from toolkit.compress.vision import VisionCalibration, slots_for
from toolkit.core.errors import BedsideError
from toolkit.data.sources import load_image_question_answer_jsonl


def test_virtual_image_ids_give_the_llava_forward(tiny_llava, image_qa_file):
    """Hooked embedding + virtual ids = LlavaForConditionalGeneration with pixel_values, logit for logit."""
    from PIL import Image
    from transformers import AutoProcessor

    document = load_image_question_answer_jsonl(image_qa_file)[1]
    tokenizer = load_tokenizer(tiny_llava)
    vision = VisionCalibration(slots_for(tiny_llava), tiny_llava)
    ids = tokenizer(document.render(tokenizer), add_special_tokens=False)["input_ids"]
    expanded = vision.slots.expand(document, ids)
    assert len(expanded) == len(ids) - 1 + 16
    assert sum(i >= vision.slots.base for i in expanded) == 16

    model = load_causal_lm(tiny_llava)
    processor = AutoProcessor.from_pretrained(tiny_llava)
    with torch.no_grad():
        inputs = processor(images=Image.open(document.image), text=document.render(tokenizer), return_tensors="pt")
        reference = model(**inputs).logits[0]
        vision.attach(model)
        vision.attach(model)  # idempotent: one set of hooks
        ours = model(input_ids=torch.tensor([expanded])).logits[0]
        plain = model(input_ids=torch.tensor([ids[:5]])).logits[0]  # text-only ids still embed as before
    assert inputs["input_ids"][0].tolist() == [vision.slots.image_token_id if i >= vision.slots.base else i for i in expanded]
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert plain.shape[0] == 5
    labels = vision.slots.text_targets(torch.tensor([expanded]))
    assert int((labels == -100).sum()) == 16


@pytest.fixture(scope="module")
def compressed_llava(tiny_llava, image_qa_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava-compress") / "out"
    options = CompressOptions(
        prune_layers=1, quant="Q4_0", calib=str(image_qa_file), calib_sequences=6, seq_len=96,
        eval_sequences=2, heal_steps=2,
    )
    return compress(tiny_llava, out, options, progress=False)


@pytest.mark.heavy
def test_compress_acts_on_the_language_model_only(compressed_llava, tiny_llava):
    record = compressed_llava.record
    assert record["calibration"]["vision"]["positions_per_image"] == 16
    assert record["calibration"]["vision"]["images_encoded"] == 3
    assert len(record["layers_removed"]) == 1 and record["num_layers_after"] == 3
    assert record["heal"] is not None and record["awq"] is not None
    before = load_file(tiny_llava / "model.safetensors")
    after = load_file(compressed_llava.checkpoint / "model.safetensors")
    vision_keys = [key for key in before if "vision_tower" in key or "multi_modal_projector" in key]
    assert vision_keys
    for key in vision_keys:  # the tower and projector are kept exactly
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0)
    changed = [
        key for key in after if "language_model" in key and ".layers.0." in key and not torch.equal(after[key], before[key])
    ]
    assert changed  # healing and AWQ changed the language model
    assert (compressed_llava.checkpoint / "preprocessor_config.json").is_file()
    config = json.loads((compressed_llava.checkpoint / "config.json").read_text())
    assert config["text_config"]["num_hidden_layers"] == 3
    assert all(value is not None for value in record["quality"].values())


@pytest.mark.heavy
def test_compressed_llava_answers_image_questions(compressed_llava, test_images):
    from runtimes import load_runner

    with load_runner(compressed_llava.checkpoint, n_ctx=256) as runner:
        assert runner.has_vision
        result = runner.generate([{"role": "user", "content": "<image>\nIs this a CT?"}], image=test_images[0], max_new_tokens=3)
    assert result.prompt_tokens > 16


def test_image_calibration_data_needs_a_llava(demo_model_dir, image_qa_file, tmp_path):
    options = CompressOptions(prune_layers=0, calib=str(image_qa_file), calib_sequences=2, seq_len=64)
    with pytest.raises(BedsideError, match="holds images but the model is text-only"):
        compress(demo_model_dir, tmp_path / "out", options, progress=False)
    assert not (tmp_path / "out").exists()


def test_llava_without_processor_config_is_refused_before_work(tiny_llava, image_qa_file, tmp_path):
    copy = tmp_path / "llava"
    shutil.copytree(tiny_llava, copy)
    (copy / "preprocessor_config.json").unlink()
    options = CompressOptions(prune_layers=1, calib=str(image_qa_file), calib_sequences=2, seq_len=64)
    with pytest.raises(BedsideError, match="no preprocessor_config.json"):
        compress(copy, tmp_path / "out", options, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.heavy
def test_healing_can_train_the_projector(tiny_llava, image_qa_file, tmp_path):
    """--heal-projector: the projector changes (trained in full), the vision tower does not."""
    options = CompressOptions(
        prune_layers=1, calib=str(image_qa_file), calib_sequences=4, seq_len=96, eval_sequences=1,
        heal_steps=2, heal_projector=True, replace="none",
    )
    result = compress(tiny_llava, tmp_path / "out", options, progress=False)
    assert result.record["heal"]["modules_to_save"] == ["multi_modal_projector"]
    assert result.record["heal"]["full_parameters"] > 0
    before = load_file(tiny_llava / "model.safetensors")
    after = load_file(result.checkpoint / "model.safetensors")
    projector = [key for key in before if "multi_modal_projector" in key]
    tower = [key for key in before if "vision_tower" in key]
    assert any(not torch.equal(after[key], before[key]) for key in projector)
    assert all(torch.equal(after[key], before[key]) for key in tower)
    assert set(after) <= set(before)  # merged back: no peft copies (modules_to_save, original_module) saved


def test_heal_projector_on_a_text_model_is_refused(demo_model_dir, tmp_path):
    options = CompressOptions(prune_layers=1, heal_projector=True, calib_sequences=2, seq_len=64)
    with pytest.raises(BedsideError, match="--heal-projector applies to a LLaVA"):
        compress(demo_model_dir, tmp_path / "out", options, progress=False)
