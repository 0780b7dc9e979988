"""`bedside export`, `bedside eval` and `bedside run` as a user runs them: real processes, exit codes, one-line errors.

Error cases need no model (or only the demo GGUF that set-up extracts); the working commands use the demo GGUF
(Q4_1, from set-up) so that no export is needed, except the compress-folder export, which converts the demo once.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from cli_runner import bedside as run_bedside

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
QA = FIXTURES / "pubmedqa_mini.jsonl"
NOTES = FIXTURES / "clinical_notes.txt"



def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------
# Errors: exit 2, one line, no traceback
# ------------------------------------------------------------------------------------------------


def test_export_unknown_format_and_scheme_list_the_allowed_values(tmp_path):
    assert_one_line_error(
        run_bedside(
            "export", "--model", "demo", "--format", "tflite", "--quant", "int8", "--out", str(tmp_path)
        ),
        "unknown format 'tflite'",
        "gguf, onnx",
    )
    assert_one_line_error(
        run_bedside(
            "export", "--model", "demo", "--format", "onnx", "--quant", "int3", "--out", str(tmp_path)
        ),
        "unknown onnx scheme 'int3'",
        "fp32, fp16, int8, int4_b32, int4_b128, int4",
    )
    assert_one_line_error(
        run_bedside(
            "export", "--model", "demo", "--format", "gguf", "--quant", "IQ1_S", "--out", str(tmp_path)
        ),
        "unknown gguf scheme 'IQ1_S'",
        "Q4_K_M",
    )


def test_eval_missing_artifact_and_empty_data(tmp_path, fake_checkpoint):
    assert_one_line_error(
        run_bedside("eval", "--artifact", str(tmp_path / "nothing.gguf"), "--data", str(QA)),
        "nothing.gguf' not found",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    checkpoint = fake_checkpoint(tmp_path / "hf")
    assert_one_line_error(
        run_bedside("eval", "--artifact", str(checkpoint), "--data", str(empty)), "is empty"
    )


def test_missing_tokenizers_are_named(tmp_path):
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"\x08\x07")
    assert_one_line_error(
        run_bedside("eval", "--artifact", str(onnx), "--data", str(QA)), "no tokenizer in this ONNX export"
    )
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"model_type": "llama"}')
    (checkpoint / "model.safetensors").write_bytes(b"\0" * 16)
    assert_one_line_error(
        run_bedside("run", str(checkpoint), "--prompt", "hi"), "no tokenizer in this checkpoint folder"
    )


def _tiny_onnx_bytes() -> bytes:
    """A valid ONNX model (IR 10) with a 64 KiB initializer, so truncation cuts inside the protobuf."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((128, 128), dtype=np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input_ids", "weight"], ["logits"])],
        "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 128])],
        [weight],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupted_onnx_is_one_line(tmp_path, damage, demo_model_dir):
    import numpy as np

    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((demo_model_dir / "tokenizer.json").read_bytes())
    if damage == "random":
        data = np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    else:
        data = _tiny_onnx_bytes()[:30_000]
    (folder / "model.onnx").write_bytes(data)
    result = run_bedside("eval", "--artifact", str(folder), "--data", str(QA), "--context", "64")
    assert_one_line_error(result, "model.onnx", "onnxruntime cannot load it")


def test_truncated_gguf_and_wrong_runtime(tmp_path, demo_gguf_path):
    truncated = tmp_path / "cut.gguf"
    with open(demo_gguf_path, "rb") as source:
        truncated.write_bytes(source.read(demo_gguf_path.stat().st_size // 2))
    assert_one_line_error(
        run_bedside("eval", "--artifact", str(truncated), "--data", str(QA)),
        "truncated GGUF file",
        "export it again",
    )
    assert_one_line_error(run_bedside("run", str(truncated), "--prompt", "hi"), "truncated GGUF file")
    assert_one_line_error(
        run_bedside("eval", "--artifact", str(demo_gguf_path), "--runtime", "onnxruntime", "--data", str(QA)),
        "a GGUF file cannot run on onnxruntime",
        "--runtime llama.cpp",
    )


# ------------------------------------------------------------------------------------------------
# Working commands on the demo GGUF
# ------------------------------------------------------------------------------------------------


@pytest.mark.demo
@pytest.mark.heavy
def test_eval_json_is_one_object_on_stdout(demo_gguf_path):
    result = run_bedside(
        "eval", "--artifact", str(demo_gguf_path), "--data", str(QA), "--json",
        "--context", "256", "--max-tokens", "128", "--seq-len", "128", "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # the whole of stdout is one JSON object
    assert data["runtime"] == "llama.cpp" and data["reference"] is None
    assert data["kl_divergence"] is None and data["top1_agreement"] is None
    assert data["accuracy"]["n"] == 4 and 0.0 <= data["accuracy"]["overall"] <= 1.0
    assert data["tokens"] == 127 and 1.0 < data["perplexity"] < 1000.0
    assert data["data"]["documents"] == 4 and data["context"] == 256
    assert data["artifact_sha256"] == hashlib.sha256(demo_gguf_path.read_bytes()).hexdigest()
    assert 100e6 < data["peak_rss_bytes"] < 1e9


@pytest.mark.demo
@pytest.mark.heavy
def test_run_streams_the_greedy_answer(demo_gguf_path):
    from runtimes import load_runner

    prompt = "Name one symptom of influenza."
    result = run_bedside(
        "run", str(demo_gguf_path), "--prompt", prompt, "--max-tokens", "12", "--threads", "1"
    )
    assert result.returncode == 0, result.stderr
    with load_runner(demo_gguf_path, n_ctx=2048, n_threads=1) as runner:
        expected = runner.generate([{"role": "user", "content": prompt}], max_new_tokens=12).text
    assert expected.strip() and result.stdout.strip() == expected.strip()
    as_json = run_bedside(
        "run", str(demo_gguf_path), "--prompt", prompt, "--max-tokens", "12", "--threads", "1", "--json"
    )
    assert as_json.returncode == 0, as_json.stderr
    answer = json.loads(as_json.stdout)  # one object, nothing else on stdout
    assert answer["answer"].strip() == expected.strip() and answer["runtime"] == "llama.cpp"
    assert 1 <= answer["tokens"] <= 12 and answer["seconds"] > 0 and answer["prompt_tokens"] > 5


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_export_of_a_compress_folder_uses_its_imatrix_and_records_it(
    demo_model_dir, demo_gguf_path, tmp_path, minimal_compression_record
):
    import gguf

    from exporters.gguf_exporter import _gguf_tensor_widths
    from exporters.gguf_imatrix import constant_imatrix, write_imatrix

    folder = tmp_path / "compressed"
    checkpoint = folder / "checkpoint"
    checkpoint.mkdir(parents=True)
    for file in demo_model_dir.iterdir():
        if file.is_file():
            (checkpoint / file.name).symlink_to(file)
    record = minimal_compression_record(layers_removed=[28, 29], num_layers_after=28)
    (folder / "compression.json").write_text(json.dumps(record))
    _, _, widths = _gguf_tensor_widths(demo_gguf_path)
    sums, counts = constant_imatrix(
        {name: width for name, width in widths.items() if name.startswith("blk.")}
    )
    write_imatrix(folder / "imatrix.gguf", sums, counts, datasets=["ones"], chunk_count=1, chunk_size=1)

    out = tmp_path / "out"
    result = run_bedside(
        "export", "--model", str(folder), "--format", "gguf", "--quant", "Q4_0", "--out", str(out), "--json"
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["imatrix"]["path"] == str((folder / "imatrix.gguf").resolve())
    assert record["layers_removed"] == [28, 29]
    compression_sha = hashlib.sha256((folder / "compression.json").read_bytes()).hexdigest()
    assert record["metadata"]["compression_sha256"] == compression_sha
    fields = gguf.GGUFReader(str(out / "model-Q4_0.gguf")).fields
    assert fields["bedside.compression_sha256"].contents() == compression_sha
    assert fields["bedside.layers_removed"].contents() == "[28, 29]"
    assert fields["quantize.imatrix.dataset"].contents() == "ones"
