"""LLaVA on ONNX Runtime: the three-graph export (vision, embedding, decoder with KV cache) and image questions.

The float graphs of the tiny random LLaVA are exported once per module (torch.onnx.export in a child
process, the slow part); every scheme's export post-processes a copy of them, as the real export would.

Tolerances, measured on the tiny random LLaVA (4 Llama layers, CLIP tower of 3 layers, 16 image tokens;
logits have a standard deviation of about 0.8 over the 49,153-token vocabulary):
- fp32 against the torch reference: answer log-probabilities within 2e-6 and last-position logits within
  4e-6 (three images); greedy tokens identical. Asserted: 1e-4.
- fp16: answer log-probabilities within 4e-3 (asserted 2e-2).
- int4_b32 decoder (lm_head int8, embedding int8, MatMulNBits accuracy level 4) against fp32: logits max
  difference 1.5, relative RMS 0.34-0.37, correlation 0.93-0.94, KL(fp32 || int4) 0.035-0.043 nats mean and
  0.059 max per position. Random weights give near-flat distributions, so greedy tokens diverge after a few
  steps; asserted: KL mean < 0.1, correlation > 0.85, and that it answers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from exporters import ExportError, export, onnx_exporter, onnx_llava
from runtimes import RuntimeLoadError, load_runner, onnx_runner
from runtimes.runner import log_softmax
from tests.llava_fixture import check_scoring_after_one_prefill
from toolkit.core.formats import ONNX_SCHEMES
from toolkit.core.vision import IMAGE_MARKER, PROCESSOR_FILE

QUESTION = [{"role": "user", "content": f"{IMAGE_MARKER}\nIs there a fracture?"}]
ANSWER = "Yes, in the left femur"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llava_onnx(tiny_llava, tmp_path_factory):
    """Factory: scheme -> ExportResult of the tiny LLaVA; the torch export of the float graphs runs once."""
    results = {}
    float_graphs = tmp_path_factory.mktemp("llava-float-graphs") / "graphs"
    run_llava_export = onnx_exporter.run_llava_export

    def export_once(model_dir: Path, output: Path) -> None:
        if not float_graphs.is_dir():
            run_llava_export(model_dir, output)
            shutil.copytree(output, float_graphs)
        else:
            shutil.copytree(float_graphs, output)

    def get(scheme: str):
        if scheme not in results:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(onnx_exporter, "run_llava_export", export_once)
                results[scheme] = export(
                    tiny_llava, "onnx", scheme, tmp_path_factory.mktemp(f"llava-{scheme}")
                )
        return results[scheme]

    return get


@pytest.fixture(scope="module")
def torch_llava(tiny_llava):
    with load_runner(tiny_llava, n_ctx=256) as runner:
        yield runner


@pytest.fixture(scope="module")
def onnx_fp32(llava_onnx):
    with load_runner(llava_onnx("fp32").files[0].parent, n_ctx=256) as runner:
        yield runner


@pytest.fixture(scope="module")
def onnx_int4(llava_onnx):
    with load_runner(llava_onnx("int4_b32").files[0].parent, n_ctx=256) as runner:
        yield runner


def answer_rows(runner, image: Path, answer: list[int]) -> np.ndarray:
    """Logits of the last prompt position and of each answer token but the last: [len(answer), vocab]."""
    runner.reset()
    try:
        first = runner.forward_parts(runner.prompt_parts(QUESTION, image))
        rest = runner.forward(answer[:-1], all_logits=True)
    finally:
        runner.reset()
    return np.concatenate([first, rest])


def test_graph_file_names_agree_between_exporter_and_runner():
    """runtimes may not import exporters: the file names are written twice and must stay equal."""
    assert onnx_runner.VISION_FILE == onnx_llava.VISION_FILE  # one name, in toolkit.core.vision
    assert onnx_runner.EMBEDDING_FILE == onnx_llava.EMBEDDING_FILE
    assert onnx_llava.DECODER_FILE == onnx_exporter.MODEL_FILE


@pytest.mark.heavy
def test_export_record_lists_the_three_graphs(llava_onnx, tiny_llava):
    from toolkit.core.hashing import file_sha256

    result = llava_onnx("fp32")
    folder = result.files[0].parent
    record = result.record
    assert result.model_file == folder / "model.onnx"
    assert record["file"] == "model.onnx" and record["task"] == onnx_exporter.LLAVA_TASK
    assert set(record["graphs"]) == {"vision", "embedding", "decoder"}
    for graph in record["graphs"].values():
        path = folder / graph["file"]
        assert graph["bytes"] == path.stat().st_size > 0
        assert graph["sha256"] == file_sha256(path)
        assert graph["file"] in record["files"]
    assert record["bytes"] == sum(graph["bytes"] for graph in record["graphs"].values())
    assert record["sha256"] == record["graphs"]["decoder"]["sha256"]
    assert record["vision"]["image_tokens"] == 16
    for name in (
        PROCESSOR_FILE,
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "config.json",
    ):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".bedside-export-*"))  # the scratch folder is gone


@pytest.mark.heavy
def test_decoder_graph_takes_embeddings_and_the_text_kv_convention(llava_onnx):
    import onnx

    folder = llava_onnx("fp32").files[0].parent
    decoder = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inputs = [item.name for item in decoder.graph.input]
    outputs = [item.name for item in decoder.graph.output]
    assert inputs[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    assert len(inputs) == 3 + 2 * 4 and len(outputs) == 1 + 2 * 4
    vision = onnx.load(str(folder / onnx_llava.VISION_FILE))
    assert [item.name for item in vision.graph.input] == ["pixel_values"]
    shape = [d.dim_value for d in vision.graph.output[0].type.tensor_type.shape.dim]
    assert shape == [1, 16, 64]  # 16 image tokens of the language model's width


@pytest.mark.heavy
def test_fp32_matches_the_torch_reference_on_image_questions(torch_llava, onnx_fp32, test_images):
    assert onnx_fp32.has_vision and onnx_fp32.image_tokens == torch_llava.image_tokens == 16
    answer = torch_llava.tokenize(ANSWER)
    assert onnx_fp32.tokenize(ANSWER) == answer
    for image in test_images[:2]:
        expected = torch_llava.continuation_logprobs(torch_llava.prompt_parts(QUESTION, image), answer)
        ours = onnx_fp32.continuation_logprobs(onnx_fp32.prompt_parts(QUESTION, image), answer)
        np.testing.assert_allclose(ours, expected, atol=1e-4)
        np.testing.assert_allclose(
            answer_rows(onnx_fp32, image, answer), answer_rows(torch_llava, image, answer), atol=1e-4
        )
        reference = torch_llava.generate(QUESTION, image=image, max_new_tokens=8)
        result = onnx_fp32.generate(QUESTION, image=image, max_new_tokens=8)
        assert result.token_ids == reference.token_ids
        assert result.prompt_tokens == reference.prompt_tokens
    assert onnx_fp32.n_past == 0


@pytest.mark.heavy
def test_fp32_text_only_scoring_goes_through_the_embedding_graph(torch_llava, onnx_fp32):
    ids = torch_llava.tokenize("The chest radiograph shows no acute findings.", add_special=True)
    np.testing.assert_allclose(onnx_fp32.logprobs_full(ids), torch_llava.logprobs_full(ids), atol=1e-4)


@pytest.mark.heavy
def test_int4_decoder_still_answers_close_to_fp32(onnx_fp32, onnx_int4, llava_onnx, test_images):
    graphs = llava_onnx("int4_b32").record["graphs"]
    assert graphs["decoder"]["weights"].startswith("int4_b32")
    assert graphs["decoder"]["bytes"] < llava_onnx("fp32").record["graphs"]["decoder"]["bytes"] / 2
    answer = onnx_fp32.tokenize(ANSWER)
    for image in test_images[:2]:
        full, quantized = answer_rows(onnx_fp32, image, answer), answer_rows(onnx_int4, image, answer)
        p, q = log_softmax(full), log_softmax(quantized)
        kl = (np.exp(p) * (p - q)).sum(axis=-1)
        assert kl.mean() < 0.1
        assert np.corrcoef(full.ravel(), quantized.ravel())[0, 1] > 0.85
        result = onnx_int4.generate(QUESTION, image=image, max_new_tokens=4)
        assert len(result.token_ids) == 4 and result.prompt_tokens == onnx_fp32.parts_length(
            onnx_fp32.prompt_parts(QUESTION, image)
        )


@pytest.mark.heavy
@pytest.mark.parametrize("scheme", list(ONNX_SCHEMES))
def test_vision_graph_stays_float_in_every_scheme(llava_onnx, scheme):
    import onnx

    result = llava_onnx(scheme)
    folder = result.files[0].parent
    graphs = result.record["graphs"]
    assert graphs["vision"]["weights"] == "float"
    float_type = onnx.TensorProto.FLOAT16 if scheme == "fp16" else onnx.TensorProto.FLOAT
    vision = onnx.load(str(folder / onnx_llava.VISION_FILE))
    assert not any(node.domain == "com.microsoft" for node in vision.graph.node)
    weights = [t for t in vision.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == float_type for t in weights)
    decoder_ops = {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}
    assert ("MatMulNBits" in decoder_ops) == (ONNX_SCHEMES[scheme].bits is not None)


@pytest.mark.heavy
def test_fp16_export_answers_close_to_the_reference(torch_llava, llava_onnx, test_images):
    with load_runner(llava_onnx("fp16").files[0].parent, n_ctx=128) as runner:
        answer = torch_llava.tokenize(ANSWER)
        expected = torch_llava.continuation_logprobs(
            torch_llava.prompt_parts(QUESTION, test_images[0]), answer
        )
        ours = runner.continuation_logprobs(runner.prompt_parts(QUESTION, test_images[0]), answer)
        np.testing.assert_allclose(ours, expected, atol=2e-2)


@pytest.mark.heavy
def test_missing_and_non_image_files_fail_with_one_line(onnx_fp32, tmp_path):
    with pytest.raises(RuntimeLoadError, match="not found") as missing:
        onnx_fp32.generate(QUESTION, image=tmp_path / "absent.png", max_new_tokens=1)
    not_image = tmp_path / "scan.png"
    not_image.write_text("this is a radiology report, not a picture")
    with pytest.raises(RuntimeLoadError, match="cannot be read") as broken:
        onnx_fp32.generate(QUESTION, image=not_image, max_new_tokens=1)
    for error in (missing, broken):
        assert "\n" not in str(error.value)


@pytest.mark.heavy
def test_incomplete_export_and_missing_processor_are_refused(llava_onnx, tmp_path):
    source = llava_onnx("fp32").files[0].parent
    half = tmp_path / "half"
    shutil.copytree(source, half)
    (half / onnx_llava.EMBEDDING_FILE).unlink()
    with pytest.raises(RuntimeLoadError, match="incomplete LLaVA export") as error:
        load_runner(half, n_ctx=64)
    assert "\n" not in str(error.value)
    no_processor = tmp_path / "no-processor"
    shutil.copytree(source, no_processor)
    (no_processor / PROCESSOR_FILE).unlink()
    with pytest.raises(RuntimeLoadError, match=PROCESSOR_FILE):
        load_runner(no_processor, n_ctx=64)


def test_failed_export_leaves_nothing_half_written(tiny_llava, tmp_path, monkeypatch):
    def broken(model_dir: Path, output: Path) -> None:
        output.mkdir(parents=True)
        (output / onnx_llava.VISION_FILE).write_bytes(b"half a graph")
        raise ExportError("ONNX export of the LLaVA failed: simulated")

    monkeypatch.setattr(onnx_exporter, "run_llava_export", broken)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="simulated"):
        export(tiny_llava, "onnx", "fp32", out)
    assert list(out.iterdir()) == []


def test_llava_without_processor_config_is_refused_before_exporting(tiny_llava, tmp_path, monkeypatch):
    copy = tmp_path / "llava"
    shutil.copytree(tiny_llava, copy)
    (copy / PROCESSOR_FILE).unlink()
    monkeypatch.setattr(onnx_exporter, "run_llava_export", lambda *_: pytest.fail("exported anyway"))
    with pytest.raises(ExportError, match=PROCESSOR_FILE):
        export(copy, "onnx", "int4_b32", tmp_path / "out")


@pytest.mark.heavy
def test_scoring_after_one_prefill_matches_a_prefill_per_continuation(onnx_fp32, test_images):
    check_scoring_after_one_prefill(onnx_fp32, test_images[0])
