"""LLaVA on llama.cpp: the GGUF export with its vision projector (mmproj) and image questions through libmtmd.

One export per module (the tiny random LLaVA of tests/llava_fixture.py, language model F16 + f16 mmproj) is shared
by every test; the quantized language model is made from its F16 with llama.cpp's quantizer (no second conversion).

Tolerances, measured on this fixture (3 test images, answer "Yes, in the left femur", CPU):

- GGUF F16 + f16 mmproj against the torch reference: answer log-probabilities within 0.0027, last-position logits
  (all 49,153) within 0.0054 of logits ranging to +-3.3, and the same greedy tokens. What remains is f16 storage of
  the weights and of the KV cache and ggml's tanh-approximated GELU in the projector (transformers uses erf);
  the tolerances (0.02) leave 4x headroom and stay far below the error of llama.cpp's class-token defect this
  runner works around (#25814: 0.30 in log-probability, 0.57 in logits, other greedy tokens).
- Q8_0 language model with the f16 mmproj against the F16 GGUF: log-probabilities within 0.065, logits within 0.135
  (text alone moves by as much on this random model, whose weights are not smooth); tolerance 0.3. A q8_0 mmproj
  moves logits by 0.037 (tolerance 0.1). Greedy tokens are not compared there: the random model's top two
  logits lie as close as 0.02.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from exporters import ExportError, export
from exporters.gguf_exporter import quantize
from exporters.gguf_mmproj import gguf_vision_name, vision_layout, write_mmproj
from runtimes import RuntimeLoadError, artifact_format, load_runner
from tests.llava_fixture import check_scoring_after_one_prefill
from toolkit.core.hashing import file_sha256
from toolkit.core.vision import IMAGE_MARKER, MMPROJ_PREFIX

QUESTION = [{"role": "user", "content": f"{IMAGE_MARKER}\nIs there a fracture?"}]
ANSWER = "Yes, in the left femur"
F16_TOLERANCE = 0.02  # measured 0.0027 (log-probabilities) and 0.0054 (logits)
QUANTIZED_TOLERANCE = 0.3  # Q8_0 language model, measured 0.065 / 0.135
Q8_0_MMPROJ_TOLERANCE = 0.1  # q8_0 tower and projector, measured 0.037

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llava_export(tiny_llava, tmp_path_factory):
    """The tiny LLaVA exported once: model-F16.gguf, mmproj-model-F16-f16.gguf, export.json."""
    return export(tiny_llava, "gguf", "F16", tmp_path_factory.mktemp("llava-gguf"))


@pytest.fixture(scope="module")
def torch_llava(tiny_llava):
    with load_runner(tiny_llava, n_ctx=256, n_threads=1, device="cpu") as runner:
        yield runner


@pytest.fixture(scope="module")
def gguf_llava(llava_export):
    with _gguf(llava_export.model_file.parent) as runner:
        yield runner


def _gguf(path, **options):
    """A llama.cpp runner on one thread (two spin against each other on a shared 2-core machine)."""
    return load_runner(path, n_ctx=256, n_threads=1, device="cpu", options=options)


def _last_logits(runner, parts) -> np.ndarray:
    runner.reset()
    try:
        return runner.forward_parts(parts)[0]
    finally:
        runner.reset()


# ------------------------------------------------------------------------------------------------
# The export


@pytest.mark.heavy
def test_export_writes_the_projector_beside_the_model_and_records_it(llava_export):
    out = llava_export.model_file.parent
    record = json.loads((out / "export.json").read_text())
    assert record["file"] == "model-F16.gguf" == llava_export.model_file.name
    mmproj = record["mmproj"]
    path = out / mmproj["file"]
    assert mmproj["file"] == f"{MMPROJ_PREFIX}model-F16-f16.gguf"
    assert path in llava_export.files and path.stat().st_size == mmproj["bytes"]
    assert mmproj["sha256"] == file_sha256(path)
    assert mmproj["type"] == "f16" and mmproj["tensor_types"] == {"F16": 16, "F32": 25}
    # vision_feature_layer -2 of a 3-layer tower: llama.cpp runs (and the file keeps) 2 layers
    assert (mmproj["block_count"], mmproj["feature_layers"], mmproj["image_tokens"]) == (2, [2], 16)
    assert sorted(p.name for p in out.iterdir()) == sorted([record["file"], mmproj["file"], "export.json"])


@pytest.mark.heavy
def test_projector_keys_match_what_clip_cpp_reads(llava_export):
    import gguf

    reader = gguf.GGUFReader(str(llava_export.files[1]))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "clip" and fields["clip.projector_type"] == "mlp"
    assert fields["clip.vision.block_count"] == 2 and fields["clip.vision.feature_layer"] == [2]
    assert fields["clip.use_gelu"] is False  # the tower's quick_gelu is clip.cpp's default
    assert fields["bedside.model_file"] == "model-F16.gguf"
    names = {tensor.name for tensor in reader.tensors}
    assert "v.blk.1.ffn_down.weight" in names and "v.blk.2.attn_q.weight" not in names
    assert "v.post_ln.weight" not in names and {"mm.0.weight", "mm.2.bias", "v.class_embd"} <= names


# ------------------------------------------------------------------------------------------------
# Parity with the torch reference


@pytest.mark.heavy
def test_f16_gguf_answers_like_the_torch_reference(llava_export, torch_llava, gguf_llava, test_images):
    assert gguf_llava.has_vision and gguf_llava.image_tokens == torch_llava.image_tokens == 16
    answer = torch_llava.tokenize(ANSWER)
    assert gguf_llava.tokenize(ANSWER) == answer
    for image in test_images:
        torch_parts, gguf_parts = (
            torch_llava.prompt_parts(QUESTION, image),
            gguf_llava.prompt_parts(QUESTION, image),
        )
        assert [p for p in torch_parts if isinstance(p, list)] == [
            p for p in gguf_parts if isinstance(p, list)
        ]
        expected = torch_llava.continuation_logprobs(torch_parts, answer)
        ours = gguf_llava.continuation_logprobs(gguf_parts, answer)
        np.testing.assert_allclose(ours, expected, atol=F16_TOLERANCE)
        logits = _last_logits(gguf_llava, gguf_parts)
        np.testing.assert_allclose(logits, _last_logits(torch_llava, torch_parts), atol=F16_TOLERANCE)
        reference = torch_llava.generate(QUESTION, image=image, max_new_tokens=6)
        result = gguf_llava.generate(QUESTION, image=image, max_new_tokens=6)
        assert result.token_ids == reference.token_ids
        assert result.prompt_tokens == reference.prompt_tokens
        assert gguf_llava.n_past == 0
    assert gguf_llava.details["vision_cls_fix"] is True  # this libmtmd has the class-token defect


# ------------------------------------------------------------------------------------------------
# Quantized language model and tower


@pytest.mark.heavy
def test_quantized_language_model_with_the_f16_projector_still_answers(
    llava_export, gguf_llava, test_images, tmp_path
):
    """Q8_0 language model (batched decode of the 16 image embeddings: the AMX crash guard holds) + f16 mmproj."""
    q8 = tmp_path / "model-Q8_0.gguf"
    quantize(llava_export.model_file, q8, "Q8_0")
    answer = gguf_llava.tokenize(ANSWER)
    with _gguf(q8, mmproj=llava_export.files[1]) as quantized:
        assert quantized.has_vision
        for image in test_images:
            reference = gguf_llava.prompt_parts(QUESTION, image)
            parts = quantized.prompt_parts(QUESTION, image)
            np.testing.assert_allclose(
                quantized.continuation_logprobs(parts, answer),
                gguf_llava.continuation_logprobs(reference, answer),
                atol=QUANTIZED_TOLERANCE,
            )
            logits = _last_logits(quantized, parts)
            np.testing.assert_allclose(logits, _last_logits(gguf_llava, reference), atol=QUANTIZED_TOLERANCE)
        assert len(quantized.generate(QUESTION, image=test_images[0], max_new_tokens=4).token_ids) == 4


@pytest.mark.heavy
def test_q8_0_projector_stays_close_to_f16(tiny_llava, llava_export, gguf_llava, test_images, tmp_path):
    folder = tmp_path / "q8-tower"
    folder.mkdir()
    shutil.copy(llava_export.model_file, folder)
    config = json.loads((tiny_llava / "config.json").read_text())
    summary = write_mmproj(tiny_llava, config, folder / f"{MMPROJ_PREFIX}model-F16-q8_0.gguf", "q8_0")
    assert summary["tensor_types"] == {
        "Q8_0": 14,
        "F16": 2,
        "F32": 25,
    }  # patch + position embeddings stay F16
    with _gguf(folder) as runner:
        for image in test_images:
            np.testing.assert_allclose(
                _last_logits(runner, runner.prompt_parts(QUESTION, image)),
                _last_logits(gguf_llava, gguf_llava.prompt_parts(QUESTION, image)),
                atol=Q8_0_MMPROJ_TOLERANCE,
            )


# ------------------------------------------------------------------------------------------------
# Loading and refusals


@pytest.mark.heavy
def test_folder_with_model_and_projector_resolves_to_the_model(llava_export, gguf_llava):
    folder = llava_export.model_file.parent
    assert artifact_format(folder) == "gguf"
    assert gguf_llava.path == llava_export.model_file
    assert gguf_llava.details["mmproj"] == llava_export.files[1].name
    with pytest.raises(RuntimeLoadError, match="vision projector") as error:
        _gguf(llava_export.files[1])
    assert "\n" not in str(error.value)


@pytest.mark.heavy
def test_gguf_without_projector_refuses_an_image_naming_the_fix(llava_export, test_images, tmp_path):
    shutil.copy(llava_export.model_file, tmp_path)
    with _gguf(tmp_path) as text_only:
        assert not text_only.has_vision and text_only.image_tokens == 0
        assert text_only.generate(
            QUESTION[0]["content"].replace(IMAGE_MARKER, ""), max_new_tokens=2
        ).token_ids
        with pytest.raises(ValueError, match="no vision tower") as error:
            text_only.generate(QUESTION, image=test_images[0], max_new_tokens=1)
    message = str(error.value)
    assert "\n" not in message and f"{MMPROJ_PREFIX}*.gguf" in message and "bedside export" in message
    with pytest.raises(RuntimeLoadError, match="no mmproj"):
        _gguf(tmp_path, mmproj=True)
    only_projector = tmp_path / "projector-only"
    only_projector.mkdir()
    shutil.copy(llava_export.files[1], only_projector)
    with pytest.raises(RuntimeLoadError, match="only a vision projector"):
        artifact_format(only_projector)


@pytest.mark.heavy
def test_missing_non_image_and_bad_projector_files_fail_with_one_line(gguf_llava, llava_export, tmp_path):
    not_image = tmp_path / "scan.png"
    not_image.write_text("this is a radiology report, not a picture")
    broken = tmp_path / f"{MMPROJ_PREFIX}broken.gguf"
    broken.write_bytes(llava_export.files[1].read_bytes()[:4096])
    errors = []
    for image, match in ((tmp_path / "absent.png", "not found"), (not_image, "cannot be read")):
        with pytest.raises(RuntimeLoadError, match=match) as error:
            gguf_llava.generate(QUESTION, image=image, max_new_tokens=1)
        errors.append(error)
    with pytest.raises(RuntimeLoadError, match="truncated") as error:
        _gguf(llava_export.model_file, mmproj=broken)
    errors.append(error)
    for error in errors:
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------
# The projector writer's rules (no export)


def test_vision_layout_maps_feature_layers_and_refuses_what_llama_cpp_cannot_run():
    base = {
        "vision_config": {"num_hidden_layers": 24, "image_size": 336, "patch_size": 14},
        "vision_feature_layer": -2,
    }
    layout = vision_layout(base)
    assert (layout.block_count, layout.feature_layers, layout.image_tokens) == (23, (23,), 576)
    assert vision_layout(dict(base, vision_feature_layer=[-5, -2])).feature_layers == (20, 23)
    for change, match in (
        ({"vision_feature_select_strategy": "full"}, "drops the class token"),
        ({"vision_feature_layer": [-2, -5]}, "ascending"),
        ({"vision_feature_layer": -30}, "outside"),
        ({"projector_hidden_act": "relu"}, "projector_hidden_act"),
        ({"vision_config": {"model_type": "siglip_vision_model"}}, "CLIP tower"),
    ):
        with pytest.raises(ExportError, match=match):
            vision_layout({**base, **change})


def test_tensor_names_follow_the_legacy_converter():
    tower = "vision_tower.vision_model."
    assert gguf_vision_name(tower + "encoder.layers.3.mlp.fc1.weight", 23) == "v.blk.3.ffn_down.weight"
    assert gguf_vision_name(tower + "encoder.layers.3.self_attn.out_proj.bias", 23) == "v.blk.3.attn_out.bias"
    assert gguf_vision_name(tower + "embeddings.class_embedding", 23) == "v.class_embd"
    assert gguf_vision_name(tower + "pre_layrnorm.weight", 23) == "v.pre_ln.weight"
    assert gguf_vision_name("model." + tower + "encoder.layers.23.layer_norm1.weight", 23) is None  # not run
    assert gguf_vision_name(tower + "post_layernorm.weight", 23) is None
    assert gguf_vision_name("model.multi_modal_projector.linear_2.weight", 23) == "mm.2.weight"
    assert gguf_vision_name("language_model.model.layers.0.mlp.up_proj.weight", 23) is None


def test_export_refuses_a_llava_without_processor_before_converting(tiny_llava, tmp_path):
    copy = tmp_path / "llava"
    shutil.copytree(tiny_llava, copy)
    (copy / "preprocessor_config.json").unlink()
    with pytest.raises(ExportError, match="preprocessor_config.json"):
        export(copy, "gguf", "F16", tmp_path / "out")
    with pytest.raises(ExportError, match="vision dtype"):
        export(tiny_llava, "gguf", "F16", tmp_path / "out", vision_dtype="q4_0")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.gguf"))


@pytest.mark.heavy
def test_scoring_after_one_prefill_matches_a_prefill_per_continuation(gguf_llava, test_images):
    check_scoring_after_one_prefill(gguf_llava, test_images[0])
