"""Input handling (issue 16, section 2, and its remote-code bullet): every bad input is one line on stderr,
exit code 2, no traceback, refused before any work or any output file, and no checkpoint's own Python runs.
"""

import ast
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cli_runner import bedside as run_bedside

from toolkit.core.errors import BedsideError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
NOTES = FIXTURES / "data" / "notes.txt"
JETSON = REPO / "device_profiles" / "jetson4gb.yaml"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)



def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def checkpoint_from_demo(demo_model_dir: Path, folder: Path, config: dict | None = None) -> Path:
    """A checkpoint folder with the demo's weights and tokenizer and `config` (default: the demo's)."""
    folder.mkdir(parents=True)
    for name in (*TOKENIZER_FILES, "generation_config.json", "model.safetensors"):
        if (demo_model_dir / name).is_file():
            link_or_copy(demo_model_dir / name, folder / name)
    if config is None:
        config = json.loads((demo_model_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config))
    return folder


# ------------------------------------------------------------------------------------------------
# Usage errors: one line, exit 2


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("plan",), ("Missing option", "--model")),
        (("plan", "--model", "demo"), ("Missing option", "--profile")),
        (("no-such-command",), ("No such command", "no-such-command")),
        (("plan", "--bogus"), ("No such option", "--bogus")),
        ((), ("missing command", "bedside --help")),
    ],
    ids=["missing-option", "missing-second-option", "unknown-command", "unknown-option", "no-arguments"],
)
def test_usage_errors_are_one_line_exit_2(args, needles):
    result = run_bedside(*args)
    line = assert_one_line_error(result, *needles)
    assert line.strip() != "error:"


# ------------------------------------------------------------------------------------------------
# Remote code: refused in one place, whatever the user would answer to transformers' prompt

EVIL_MODULE = """\
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's own code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil_llama"


class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


def evil_checkpoint(demo_model_dir: Path, folder: Path, marker: Path, where: str = "config.json") -> Path:
    config = json.loads((demo_model_dir / "config.json").read_text())
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    if where == "config.json":  # a model_type transformers does not know: it asks to run the folder's code
        config.update(auto_map=auto_map, model_type="evil_llama")
    checkpoint = checkpoint_from_demo(demo_model_dir, folder, config)
    if where == "tokenizer_config.json":
        path = checkpoint / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text())
        tokenizer_config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
        path.unlink()
        path.write_text(json.dumps(tokenizer_config))
    (checkpoint / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    return checkpoint


@pytest.mark.demo
@pytest.mark.parametrize("command", ["run", "eval", "compress", "export"])
def test_checkpoint_with_auto_map_is_refused_before_its_code_runs(tmp_path, demo_model_dir, command):
    marker = tmp_path / "marker"
    model = str(evil_checkpoint(demo_model_dir, tmp_path / "evil", marker))
    out = tmp_path / "out"
    args = {
        "run": ("run", model, "--prompt", "hi", "--max-tokens", "2"),
        "eval": ("eval", "--artifact", model, "--data", str(NOTES), "--max-tokens", "64"),
        "compress": (
            "compress", "--model", model, "--quant", "Q8_0", "--quant-method", "rtn", "--no-heal",
            "--calib", str(NOTES), "--seq-len", "8", "--calib-sequences", "2", "--out", str(out),
        ),
        "export": ("export", "--model", model, "--format", "gguf", "--quant", "Q8_0", "--out", str(out)),
    }[command]  # fmt: skip
    # "y": what a user answers to transformers' "Do you wish to run the custom code?" prompt
    result = run_bedside(*args, stdin="y\n" * 4, env={"HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, "custom code", "auto_map")
    assert not marker.exists()
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert not out.exists()


@pytest.mark.demo
def test_custom_code_in_tokenizer_config_is_refused_too(tmp_path, demo_model_dir):
    from toolkit.core.checkpoint_policy import refuse_custom_code
    from toolkit.validate.evaluate import resolve_artifact

    marker = tmp_path / "marker"
    checkpoint = evil_checkpoint(demo_model_dir, tmp_path / "evil", marker, where="tokenizer_config.json")
    with pytest.raises(BedsideError, match=r"tokenizer_config\.json.*auto_map"):
        refuse_custom_code(checkpoint)
    with pytest.raises(BedsideError, match="custom code"):
        resolve_artifact(checkpoint)
    refuse_custom_code(demo_model_dir)  # an ordinary checkpoint passes


@pytest.mark.demo
def test_runtimes_refuse_custom_code_when_called_directly(tmp_path, demo_model_dir):
    """runtimes/ is used without the CLI (verify, the measurement child): it applies the same policy."""
    from runtimes import TorchRunner
    from runtimes.results import RuntimeLoadError

    marker = tmp_path / "marker"
    checkpoint = evil_checkpoint(demo_model_dir, tmp_path / "evil", marker)
    with pytest.raises(RuntimeLoadError, match="custom code"):
        TorchRunner().load(checkpoint, n_ctx=64, n_threads=1, device="cpu")
    assert not marker.exists()


def _from_pretrained_calls(path: Path) -> list[tuple[int, bool]]:
    """(line, passes trust_remote_code=False) for each `X.from_pretrained(...)` call in `path`."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        if call and node.func.attr == "from_pretrained":
            explicit = any(
                keyword.arg == "trust_remote_code"
                and isinstance(keyword.value, ast.Constant)
                and keyword.value.value is False
                for keyword in node.keywords
            )
            calls.append((node.lineno, explicit))
    return calls


def test_every_from_pretrained_passes_trust_remote_code_false():
    found = {}
    for package in ("toolkit", "runtimes", "exporters", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            for line, explicit in _from_pretrained_calls(path):
                found[f"{path.relative_to(REPO)}:{line}"] = explicit
    assert len(found) >= 8, found  # the reader finds the calls (torch runner, compress, demo, deploy, bench)
    assert [where for where, explicit in found.items() if not explicit] == []
    driver = (REPO / "exporters" / "onnx_exporter.py").read_text()
    assert "trust_remote_code=False" in driver  # optimum's main_export in the export child


# ------------------------------------------------------------------------------------------------
# Tracebacks that must be one line, exit 2


@pytest.mark.demo
def test_export_out_that_is_a_file_or_under_a_file_is_one_line(tmp_path, demo_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        result = run_bedside(
            "export", "--model", "demo", "--format", "gguf", "--quant", "Q8_0", "--out", str(out)
        )
        assert_one_line_error(result, str(out))
    assert blocker.read_text() == "x"


@pytest.mark.demo
def test_compress_out_under_a_file_is_one_line(tmp_path, demo_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        result = run_bedside(
            "compress", "--model", "demo", "--quant", "Q8_0", "--quant-method", "rtn", "--no-heal",
            "--calib", str(NOTES), "--out", str(out),
        )  # fmt: skip
        assert_one_line_error(result, str(out))


@pytest.mark.demo
@pytest.mark.parametrize("context", ["0", "-5"])
def test_run_context_must_be_positive(demo_model_dir, context):
    result = run_bedside("run", "demo", "--prompt", "hi", "--context", context)
    assert_one_line_error(result, "--context", context)


def _deploy(tmp_path: Path, *extra: str, model: str = "demo") -> subprocess.CompletedProcess[str]:
    return run_bedside(
        "deploy", "--profile", "jetson4gb", "--model", model, "--calib", str(NOTES),
        "--out", str(tmp_path / "out"), "--no-progress", *extra,
    )  # fmt: skip


@pytest.mark.demo
def test_deploy_seq_len_0_is_one_line_and_writes_nothing(tmp_path, demo_model_dir):
    assert_one_line_error(_deploy(tmp_path, "--seq-len", "0"), "--seq-len")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("seq_len", 0, "--seq-len"),
        ("seq_len", 1, "--seq-len"),
        ("prune_method", "bogus", "--prune-method"),
        ("quant_method", "bogus", "--quant-method"),
        ("eval_tokens", 0, "--eval-tokens"),
        ("heal_steps", 0, "--heal-steps"),
        ("calib_sequences", 0, "--calib-sequences"),
        ("calib_sequences", 129, "--calib-sequences"),
        ("max_attempts", 0, "--max-attempts"),
        ("threads", 0, "--threads"),
        ("seed", -1, "--seed"),
    ],
)
def test_deploy_options_are_checked_before_anything_is_written(tmp_path, field, value, needle):
    from toolkit.deploy.pipeline import DeployOptions, run_deploy

    options = DeployOptions(profile=str(JETSON), calib=str(NOTES), out=tmp_path / "out", progress=False)
    with pytest.raises(BedsideError, match=needle):
        run_deploy(DeployOptions(**{**options.__dict__, field: value}))
    assert not (tmp_path / "out").exists()


@pytest.mark.demo
def test_deploy_prune_method_is_one_line_and_writes_nothing(tmp_path, demo_model_dir):
    line = assert_one_line_error(_deploy(tmp_path, "--prune-method", "bogus"), "--prune-method", "bogus")
    assert "block-influence" in line
    assert not (tmp_path / "out").exists()


def test_deploy_allow_pickle_that_cannot_load_is_one_line_and_writes_nothing(tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text((FIXTURES / "smollm2-135m" / "config.json").read_text())
    (model / "pytorch_model.bin").write_bytes(b"this is not a pickle" * 10)
    result = _deploy(tmp_path, "--allow-pickle", model=str(model))
    assert_one_line_error(result, "pytorch_model.bin")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# Data


def test_one_huge_line_is_refused_naming_file_and_line(tmp_path):
    from toolkit.data import load_dataset_spec, sources

    path = tmp_path / "huge.jsonl"
    path.write_text(
        '{"text": "a short report"}\n' + json.dumps({"text": "x" * (sources.MAX_RECORD_BYTES + 1)}) + "\n"
    )
    with pytest.raises(BedsideError, match=r"huge\.jsonl.*line 2"):
        load_dataset_spec(str(path))
    text = tmp_path / "huge.txt"
    text.write_text("a short note\n\n" + "word " * (sources.MAX_RECORD_BYTES // 5 + 10) + "\n")
    with pytest.raises(BedsideError, match=r"huge\.txt.*line 3"):
        load_dataset_spec(str(text))
    array = tmp_path / "huge.json"
    array.write_text(json.dumps([{"text": "ok"}, {"text": "y" * (sources.MAX_RECORD_BYTES + 1)}]))
    with pytest.raises(BedsideError, match=r"huge\.json.*item 2"):
        load_dataset_spec(str(array))


def test_data_file_over_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    from toolkit.data import load_dataset_spec, sources

    path = tmp_path / "big.txt"
    path.write_text("a line of text\n" * 100)
    monkeypatch.setattr(sources, "MAX_DATA_FILE_BYTES", 1000)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read a file over the cap"))
    with pytest.raises(BedsideError, match=r"big\.txt.*1,500 bytes"):
        load_dataset_spec(str(path))


@pytest.mark.demo
def test_compress_with_a_huge_line_is_one_line_naming_the_file(tmp_path, demo_model_dir):
    from toolkit.data import sources

    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "x " * (sources.MAX_RECORD_BYTES // 2 + 1)}) + "\n")
    result = run_bedside(
        "compress", "--model", "demo", "--quant", "Q8_0", "--quant-method", "rtn", "--no-heal",
        "--calib", str(path), "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(result, "huge.jsonl", "line 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"text": 42}, "text"),
        ({"text": ["a", "b"]}, "text"),
        ({"question": 42, "answer": "yes"}, "question"),
        ({"question": "Which side?", "answer": "left", "context": {"a": 1}}, "context"),
    ],
)
def test_text_fields_must_be_strings(tmp_path, record, field):
    from toolkit.data import load_dataset_spec

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(BedsideError, match=rf"data\.jsonl.*line 1.*'{field}'.*text"):
        load_dataset_spec(str(path))


def test_answers_may_stay_numbers(tmp_path):
    from toolkit.data import load_dataset_spec

    path = tmp_path / "counts.jsonl"
    path.write_text(json.dumps({"question": "How many nodules?", "answer": 2}) + "\n")
    (document,) = load_dataset_spec(str(path))
    assert document.answer == "2"


@pytest.mark.demo
def test_too_little_data_names_the_file(tmp_path, demo_model_dir):
    path = tmp_path / "tiny-notes.txt"
    path.write_text("Chest clear.\n\nNo effusion.\n\nHeart normal.\n")
    result = run_bedside(
        "compress", "--model", "demo", "--quant", "Q8_0", "--quant-method", "rtn", "--no-heal",
        "--calib", str(path), "--seq-len", "512", "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert_one_line_error(result, "tiny-notes.txt")


def test_boolean_context_length_in_a_profile_is_refused(tmp_path):
    profile = tmp_path / "bool.yaml"
    text = JETSON.read_text()
    assert "context_length: 2048" in text
    profile.write_text(text.replace("context_length: 2048", "context_length: true"))
    assert_one_line_error(run_bedside("profiles", "show", str(profile)), "context_length", "bool.yaml")
    assert_one_line_error(
        run_bedside("plan", "--model", str(FIXTURES / "llama-2-7b"), "--profile", str(profile)),
        "context_length",
    )


def test_boolean_figure_in_a_profile_is_refused(tmp_path):
    from toolkit.target.profiles import load_profile

    profile = tmp_path / "bool-figure.yaml"
    text = JETSON.read_text()
    profile.write_text(text.replace("batch_size: 1", "batch_size: true"))
    with pytest.raises(BedsideError, match="batch_size"):
        load_profile(str(profile))


@pytest.mark.demo
def test_config_that_does_not_match_the_weights_is_refused(tmp_path, demo_model_dir):
    """A Qwen2 config (it needs q/k/v biases) over Llama weights would run with random biases."""
    config = json.loads((demo_model_dir / "config.json").read_text())
    qwen = {**config, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    checkpoint = checkpoint_from_demo(demo_model_dir, tmp_path / "qwen-over-llama", qwen)
    line = assert_one_line_error(run_bedside("run", str(checkpoint), "--prompt", "hi", "--max-tokens", "2"),
                                 "does not match", "q_proj.bias")  # fmt: skip
    assert "config.json" in line

    from toolkit.compress.pipeline import compress
    from toolkit.compress.record import CompressOptions
    from toolkit.model.checkpoint import check_weights_match_config

    with pytest.raises(BedsideError, match="does not match"):
        check_weights_match_config(checkpoint)
    with pytest.raises(BedsideError, match="does not match"):
        compress(
            str(checkpoint),
            tmp_path / "out",
            CompressOptions(quant="Q8_0", quant_method="rtn"),
            progress=False,
        )
    assert not (tmp_path / "out").exists()
    check_weights_match_config(demo_model_dir)  # the real checkpoint matches its own config


@pytest.mark.demo
def test_bert_config_over_llama_weights_is_refused(tmp_path, demo_model_dir):
    bert = {
        "architectures": ["BertForMaskedLM"],
        "model_type": "bert",
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "vocab_size": 49152,
    }
    checkpoint = checkpoint_from_demo(demo_model_dir, tmp_path / "bert-over-llama", bert)
    result = run_bedside("run", str(checkpoint), "--prompt", "hi", "--max-tokens", "2")
    assert_one_line_error(result, "BertForMaskedLM")
    assert not result.stdout.strip()


@pytest.mark.demo
def test_shape_mismatch_is_refused(tmp_path, demo_model_dir):
    from toolkit.model.checkpoint import check_weights_match_config

    config = json.loads((demo_model_dir / "config.json").read_text())
    checkpoint = checkpoint_from_demo(
        demo_model_dir, tmp_path / "wide", {**config, "intermediate_size": 2048}
    )
    with pytest.raises(BedsideError, match=r"does not match.*mlp\.(gate|up|down)_proj\.weight.*1536"):
        check_weights_match_config(checkpoint)


# ------------------------------------------------------------------------------------------------
# GGUF headers


def _gguf(*parts: bytes) -> bytes:
    return b"GGUF" + b"".join(parts) + b"\0" * 64


def _string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


GGUF_CASES = {
    "key-length": (
        _gguf(struct.pack("<IQQ", 3, 0, 1), struct.pack("<Q", 2**62)),
        r"metadata key 1 of 1: string length 4,611,686,018,427,387,904 runs past the end of the file",
    ),
    "array-length": (
        _gguf(
            struct.pack("<IQQ", 3, 0, 1), _string(b"tokenizer.ggml.scores"), struct.pack("<IIQ", 9, 6, 2**60)
        ),
        r"'tokenizer.ggml.scores': array of 1,152,921,504,606,846,976 float32 values runs past the end",
    ),
    "value-type": (
        _gguf(struct.pack("<IQQ", 3, 0, 1), _string(b"general.name"), struct.pack("<I", 99)),
        r"'general.name': unknown value type 99",
    ),
    "alignment-zero": (
        _gguf(struct.pack("<IQQ", 3, 0, 1), _string(b"general.alignment"), struct.pack("<II", 4, 0)),
        r"general.alignment 0 is not a power of two",
    ),
    "key-count": (
        _gguf(struct.pack("<IQQ", 3, 0, 2**62)),
        r"4,611,686,018,427,387,904 metadata keys",
    ),
    "dimensions": (
        _gguf(struct.pack("<IQQ", 3, 1, 0), _string(b"blk.0.attn_q.weight"), struct.pack("<I", 2**31)),
        r"tensor 1 of 1 'blk.0.attn_q.weight': 2,147,483,648 dimensions",
    ),
    "version": (_gguf(struct.pack("<IQQ", 99, 0, 0)), r"version 99"),
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_corrupted_gguf_header_names_what_is_wrong(tmp_path, case):
    from runtimes.gguf_header import read_gguf_header
    from runtimes.results import RuntimeLoadError

    data, pattern = GGUF_CASES[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    with pytest.raises(RuntimeLoadError, match=pattern) as raised:
        read_gguf_header(path)
    assert "()" not in str(raised.value)


def test_corrupted_gguf_is_one_line_on_the_cli(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(GGUF_CASES["key-length"][0])
    assert_one_line_error(run_bedside("run", str(path), "--prompt", "hi"), "model.gguf", "string length")
