"""Exporters: GGUF (llama.cpp's converter + quantizer) and ONNX (optimum-onnx + MatMulNBits).

Three tiers: input checks, registry and the imatrix format (no model, fast); a tiny random Llama with
a layer removed through ONNX (ORT logits against torch); the real demo model (skipped when set-up has
not built it) through GGUF F16 / Q8_0 / Q4_K_M (+ imatrix, + layers removed) and ONNX int4.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from exporters import EXPORTERS, SCHEMES, ExportError, export
from exporters.base import check_checkpoint
from exporters.gguf_imatrix import read_imatrix, to_gguf_names, write_imatrix
from toolkit.core.gguf_header import read_gguf_header
from toolkit.core.hashing import checkpoint_sha256

# ------------------------------------------------------------------------------------------------
# Shared helpers
# ------------------------------------------------------------------------------------------------

# Written for these tests: ~490 tokens of plain English clinical prose (demo-model perplexity).
PARAGRAPH = textwrap.dedent(
    """\
    Heart failure is a clinical syndrome in which the heart cannot pump enough blood to meet the needs
    of the body, or can do so only at the cost of raised filling pressures. Patients typically
    describe breathlessness on exertion, tiredness and swelling of the ankles, and many wake at night
    short of breath. The examination may reveal a raised jugular venous pressure, a third heart sound,
    crackles at both lung bases and pitting oedema of the legs. An electrocardiogram is rarely normal,
    and a blood test for natriuretic peptide helps to decide who needs an echocardiogram, which
    measures the ejection fraction and shows the structure of the valves and chambers.

    Treatment aims to relieve symptoms, prevent admission to hospital and prolong life. Loop diuretics
    such as furosemide remove excess fluid, and the dose is adjusted to the patient's weight and
    symptoms. When the ejection fraction is reduced, four groups of medicines have each been shown to
    lower mortality: an inhibitor of the renin-angiotensin system, a beta-blocker, a mineralocorticoid
    receptor antagonist and an inhibitor of the sodium-glucose co-transporter 2. They are started at
    low doses and increased every two weeks while the blood pressure, heart rate, potassium and kidney
    function are checked. Patients should weigh themselves each morning and seek advice if their weight
    rises by more than two kilograms in three days.

    Some patients benefit from devices. An implantable cardioverter-defibrillator protects against
    sudden death from ventricular arrhythmias, and cardiac resynchronisation therapy improves symptoms
    when the electrical activation of the ventricles is delayed. Atrial fibrillation is common and
    worsens symptoms; it calls for anticoagulation to prevent stroke and for control of the heart rate.
    Anaemia and iron deficiency should be looked for and corrected, because intravenous iron improves
    exercise capacity and quality of life.

    Good care extends beyond prescriptions. Cardiac rehabilitation, vaccination against influenza and
    pneumococcus, a moderate intake of salt and alcohol, and regular review by a specialist nurse all
    reduce readmissions. When the disease advances despite treatment, honest conversations about the
    goals of care, and early involvement of palliative care, help patients and their families plan for
    the future and keep symptoms under control at home.
    """
)

# Measured on this paragraph (487 tokens), see docs/RUNTIMES.md "Exporters on the demo model": torch fp32 21.322, GGUF F16
# 21.326, Q8_0 21.547, Q4_K_M 23.087, IQ4_XS (all-ones importance matrix) 26.574, ONNX fp32 21.322, ONNX
# int4_b32 (defaults: asymmetric, int8 lm_head and embedding, accuracy_level 4) 29.837. Tolerances leave room for another x86 CPU's kernels.
DEMO_PERPLEXITY = {
    "torch": 21.322,
    "Q4_K_M": 23.087,
    "IQ4_XS": 26.574,  # all-ones importance matrix; the demo's weights sit on an asymmetric Q4_1 grid
    "onnx_int4_b32": 29.84,
}

TOKENIZER_TEXTS = [
    "Hello world",
    "The dose is 12345 mg, π ≈ 3.14 and 0.5 mL every 8 h (t½ = 6.5 h).",
    "Leading  and   multiple    spaces\tand\ttabs\n\n\nnewlines end ",
    "Fièvre à 39,5 °C; Überweisung zum Kardiologen; 中文医学文本; emoji 🩺💊",
    "SpO₂ 94 %, HbA1c 7.2 %, eGFR < 60 mL/min/1.73 m²; don't won't it's O'Neil's",
    "CamelCase snake_case kebab-case https://example.org/a?b=1&c=2 x²+y³ ①②③",
    "",
]

TINY_REMOVED_LAYER = 1


def make_tiny_llama(folder: Path, *, layers: int = 3, remove: list[int] | None = None) -> Path:
    """A random tied-embedding Llama (hidden 64, vocab 128) with a word-level tokenizer, saved to `folder`.

    `remove` drops decoder layers through toolkit's depth-pruning surgery before saving.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(125)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    if remove:
        from toolkit.compress.prune.surgery import remove_layers

        remove_layers(model, remove)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def ort_session(model_dir: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])


def ort_forward(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None, start: int = 0):
    """Logits [batch, seq, vocab] and present.* of one ORT call (empty cache when `past` is None)."""
    batch, length = ids.shape
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, start + length), dtype=np.int64),
        "position_ids": np.tile(np.arange(start, start + length, dtype=np.int64), (batch, 1)),
    }
    names = [o.name for o in session.get_outputs()]
    for entry in session.get_inputs():
        if entry.name.startswith("past_key_values"):
            if past is not None:
                feeds[entry.name] = past[entry.name.replace("past_key_values", "present")]
            else:
                dtype = np.float16 if "float16" in entry.type else np.float32
                feeds[entry.name] = np.zeros((batch, entry.shape[1], 0, entry.shape[3]), dtype=dtype)
    outputs = dict(zip(names, session.run(names, feeds), strict=True))
    return outputs["logits"], outputs


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean negative log-likelihood of ids[1:]) from logits [len(ids), vocab]."""
    logits = logits.astype(np.float64)
    peak = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(-1)) + peak[:, 0]
    picked = logits[np.arange(len(ids) - 1), ids[1:]] - log_norm[:-1]
    return float(np.exp(-picked.mean()))


def gguf_perplexity(path: Path, ids: list[int]) -> float:
    import llama_cpp

    model = llama_cpp.Llama(str(path), n_ctx=1024, n_batch=512, n_threads=1, logits_all=True, verbose=False)
    model.eval(ids)
    return perplexity(np.array(model.scores[: len(ids)]), ids)


def gguf_tensor_bytes(path: Path) -> dict[str, bytes]:
    """Each tensor's stored bytes, located by the file's header (toolkit.core.gguf_header, held equal to gguf-py's
    reader on the demo export by test_the_header_reads_the_demo_export_as_gguf_py_does)."""
    from toolkit.core.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    start = header.data_offset
    return {t.name: data[start + t.offset : start + t.offset + t.n_bytes].tobytes() for t in header.tensors}


# ------------------------------------------------------------------------------------------------
# No model: registry, input checks, imatrix format
# ------------------------------------------------------------------------------------------------


def test_registry_matches_the_scheme_names_the_toolkit_uses():
    from toolkit.core.formats import FORMATS

    assert set(EXPORTERS) == {"gguf", "onnx"}
    assert dict(SCHEMES) == {name: FORMATS[name] for name in ("gguf", "onnx")}


def test_unknown_format_and_scheme_are_export_errors(tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export(tmp_path, "tflite", "int8", tmp_path / "out")
    with pytest.raises(ExportError, match="unknown GGUF scheme 'IQ1_S'"):
        export(tmp_path, "gguf", "IQ1_S", tmp_path / "out")
    with pytest.raises(ExportError, match="unknown ONNX scheme 'int3'"):
        export(tmp_path, "onnx", "int3", tmp_path / "out")
    with pytest.raises(ExportError, match="GGUF exports only"):
        export(tmp_path, "onnx", "int4_b32", tmp_path / "out", imatrix=tmp_path / "x.gguf")


# What llama-quant.cpp logs before refusing (llama-cpp-python 0.3.36, IQ2_M on the demo model without a matrix).
LLAMA_CPP_NO_IMATRIX_LOG = """
============================================================================
 ERROR: this quantization requires an importance matrix!
        - offending tensor: blk.3.ffn_down.weight
        - target type: iq2_s
============================================================================

llama_model_quantize: failed to quantize: this quantization requires an imatrix!
"""


def test_imatrix_refusal_is_one_line_naming_the_fix():
    from exporters.gguf_exporter import imatrix_refusal

    message = imatrix_refusal(LLAMA_CPP_NO_IMATRIX_LOG, "IQ2_M", imatrix_given=False)
    assert message is not None and "\n" not in message
    assert "IQ2_M needs an importance matrix" in message and "blk.3.ffn_down.weight as IQ2_S" in message
    assert "--imatrix" in message
    missing = "Missing importance matrix for tensor blk.0.ffn_down.weight in a very low-bit quantization"
    assert "no entry for blk.0.ffn_down.weight" in imatrix_refusal(missing, "IQ3_XXS", imatrix_given=True)
    assert imatrix_refusal("llama_model_quantize: failed to quantize: other", "Q4_0", False) is None


@pytest.mark.demo
def test_gguf_iq_scheme_without_importance_matrix_is_refused_before_writing(demo_gguf_path, tmp_path):
    """llama.cpp checks every tensor's type before writing anything (fast: metadata only)."""
    from exporters.gguf_exporter import quantize

    target = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match="IQ2_M needs an importance matrix here") as caught:
        quantize(demo_gguf_path, target, "IQ2_M", threads=1)
    assert "\n" not in str(caught.value) and not target.exists()


def _fake_checkpoint(folder: Path) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_check_checkpoint_names_each_problem(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        check_checkpoint(tmp_path / "missing")
    folder = _fake_checkpoint(tmp_path / "ckpt")
    assert check_checkpoint(folder)["model_type"] == "llama"

    (folder / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="no tokenizer"):
        check_checkpoint(folder)
    (folder / "tokenizer.json").write_text("{}")

    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ExportError, match="truncated or corrupted"):
        check_checkpoint(folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ExportError, match="not a valid safetensors file"):
        check_checkpoint(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no weights"):
        check_checkpoint(folder)

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="config.json is not valid JSON"):
        check_checkpoint(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ExportError, match="no config.json"):
        check_checkpoint(folder)


def test_invalid_folder_is_an_export_error_for_both_formats(tmp_path):
    (tmp_path / "empty").mkdir()
    for format_name, quant in (("gguf", "Q4_K_M"), ("onnx", "int4_b32")):
        with pytest.raises(ExportError, match="no config.json"):
            export(tmp_path / "empty", format_name, quant, tmp_path / "out")
    assert not (tmp_path / "out" / "export.json").exists()


def test_missing_converter_says_what_setup_must_extract(tmp_path):
    folder = _fake_checkpoint(tmp_path / "ckpt")
    with pytest.raises(ExportError, match=r"converter incomplete .*conversion/__init__.py"):
        export(folder, "gguf", "Q8_0", tmp_path / "out", llama_cpp_dir=tmp_path)


def test_checkpoint_hash_follows_content_not_location(tmp_path):
    first = _fake_checkpoint(tmp_path / "a")
    second = tmp_path / "b"
    shutil.copytree(first, second)
    assert checkpoint_sha256(first) == checkpoint_sha256(second)
    (second / "config.json").write_text(json.dumps({"model_type": "llama", "x": 1}))
    assert checkpoint_sha256(first) != checkpoint_sha256(second)


def test_imatrix_round_trip_means_and_zero_counts(tmp_path):
    sums = {
        "blk.0.attn_q.weight": np.array([2.0, 4.0, 6.0], dtype=np.float32),
        "blk.0.ffn_down.weight": np.arange(6, dtype=np.float32).reshape(2, 3),  # two matrices (experts)
    }
    counts = {"blk.0.attn_q.weight": 2, "blk.0.ffn_down.weight": np.array([3.0, 0.0])}
    path = write_imatrix(tmp_path / "m.gguf", sums, counts, datasets=["notes"], chunk_count=4, chunk_size=512)
    matrix = read_imatrix(path)
    assert (matrix.datasets, matrix.chunk_count, matrix.chunk_size) == (["notes"], 4, 512)
    np.testing.assert_allclose(matrix.values["blk.0.attn_q.weight"], [1.0, 2.0, 3.0])
    # a matrix with count 0 gets importance 1, as tools/quantize does
    np.testing.assert_allclose(matrix.values["blk.0.ffn_down.weight"], [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0])


def test_imatrix_hf_names_map_to_gguf_names_and_are_checked(tmp_path):
    widths = {"blk.0.attn_q.weight": 3, "blk.1.ffn_down.weight": 5, "token_embd.weight": 3}
    sums = {
        "model.layers.0.self_attn.q_proj.weight": np.ones(3, np.float32),
        "model.layers.1.mlp.down_proj.weight": np.ones(5, np.float32),
        "lm_head.weight": np.ones(3, np.float32),  # tied: llama.cpp multiplies by token_embd
    }
    path = write_imatrix(
        tmp_path / "hf.gguf", sums, dict.fromkeys(sums, 1), datasets=["d"], chunk_count=1, chunk_size=1
    )
    mapped = to_gguf_names(read_imatrix(path), "llama", 2, widths)
    assert sorted(mapped.values) == sorted(widths)

    with pytest.raises(ExportError, match="has 3 values, tensor blk.0.attn_q.weight has 4 inputs"):
        to_gguf_names(read_imatrix(path), "llama", 2, {**widths, "blk.0.attn_q.weight": 4})
    pruned = {k: v for k, v in widths.items() if not k.startswith("blk.1.")}
    with pytest.raises(ExportError, match="before layers were removed"):
        to_gguf_names(read_imatrix(path), "llama", 1, pruned)


def test_imatrix_without_metadata_or_not_gguf_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), arch="imatrix")
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 3), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.ones((1, 1), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ExportError, match="lacks imatrix metadata"):
        read_imatrix(tmp_path / "bare.gguf")
    (tmp_path / "legacy.dat").write_bytes(b"\x01\x00\x00\x00garbage")
    with pytest.raises(ExportError, match="not a GGUF importance matrix"):
        read_imatrix(tmp_path / "legacy.dat")


# ------------------------------------------------------------------------------------------------
# Tiny random Llama (a layer removed) through ONNX
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", layers=3, remove=[TINY_REMOVED_LAYER])


@pytest.fixture(scope="module")
def tiny_onnx_fp32(tiny_llama, tmp_path_factory):
    return export(
        tiny_llama,
        "onnx",
        "fp32",
        tmp_path_factory.mktemp("onnx32"),
        metadata={"layers_removed": [TINY_REMOVED_LAYER], "plan": {"scheme": "fp32"}},
    )


@pytest.fixture(scope="module")
def tiny_onnx_int4(tiny_llama, tmp_path_factory):
    return export(tiny_llama, "onnx", "int4_b32", tmp_path_factory.mktemp("onnx4"))


@pytest.mark.slow
def test_tiny_onnx_fp32_matches_torch_with_and_without_cache(tiny_llama, tiny_onnx_fp32):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert model.config.num_hidden_layers == 2
    ids = np.random.default_rng(0).integers(3, 128, size=(2, 12))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()

    session = ort_session(tiny_onnx_fp32.model_file.parent)
    full, _ = ort_forward(session, ids)
    np.testing.assert_allclose(full, expected, atol=1e-4, rtol=0)
    # prefill 9 tokens, then 3 more through the KV cache
    _, outputs = ort_forward(session, ids[:, :9])
    cached, _ = ort_forward(session, ids[:, 9:], past=outputs, start=9)
    np.testing.assert_allclose(cached, expected[:, 9:], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_tiny_onnx_export_writes_tokenizer_record_and_metadata(tiny_llama, tiny_onnx_fp32):
    import onnx

    folder = tiny_onnx_fp32.model_file.parent
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "export.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "export.json").read_text())
    assert record == tiny_onnx_fp32.record
    assert record["format"] == "onnx" and record["quant"] == "fp32"
    assert record["source"]["sha256"] == checkpoint_sha256(tiny_llama)
    assert record["layers_removed"] == [TINY_REMOVED_LAYER]
    assert record["bytes"] == tiny_onnx_fp32.sizes["model.onnx"]
    props = {
        p.key: p.value for p in onnx.load(str(folder / "model.onnx"), load_external_data=False).metadata_props
    }
    assert props["bedside.layers_removed"] == "[1]"
    assert json.loads(props["bedside.plan"]) == {"scheme": "fp32"}
    assert not list(folder.glob(".bedside-export-*")), "scratch folder left behind"


@pytest.mark.slow
def test_tiny_onnx_int4_is_smaller_runs_and_quantizes_head_and_embedding(tiny_onnx_fp32, tiny_onnx_int4):
    import onnx

    folder = tiny_onnx_int4.model_file.parent
    assert tiny_onnx_int4.sizes["model.onnx"] < 0.6 * tiny_onnx_fp32.sizes["model.onnx"]
    graph = onnx.load(str(folder / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # 2 layers x 7 linears + the untied lm_head
    assert "GatherBlockQuantized" in ops
    assert not any(node.op_type == "MatMul" and "lm_head" in node.name for node in graph.node)
    scheme = tiny_onnx_int4.record["scheme"]
    assert scheme["bits"] == 4 and scheme["block_size"] == 32 and scheme["symmetric"] is False
    assert scheme["lm_head"].startswith("int8_b32") and scheme["embedding"] == "int8_b32"
    levels = {
        a.i
        for n in graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "accuracy_level"
    }
    assert levels == {4}

    ids = np.random.default_rng(1).integers(3, 128, size=(1, 10))
    quantized, _ = ort_forward(ort_session(folder), ids)
    reference, _ = ort_forward(ort_session(tiny_onnx_fp32.model_file.parent), ids)
    assert np.all(np.isfinite(quantized))
    # random weights: int4 noise moves logits, but they must stay strongly correlated with fp32
    assert np.corrcoef(quantized.ravel(), reference.ravel())[0, 1] > 0.9


@pytest.mark.slow
def test_large_models_use_external_data(tiny_llama, tiny_onnx_int4, tmp_path, monkeypatch):
    from exporters import onnx_exporter

    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_THRESHOLD", 10_000)  # pretend the tiny model is 7B
    result = export(tiny_llama, "onnx", "int4_b32", tmp_path / "external")
    folder = result.model_file.parent
    assert result.record["external_data"] == "model.onnx_data"
    assert result.sizes["model.onnx"] + 40_000 < tiny_onnx_int4.sizes["model.onnx"]  # weights moved out
    assert result.record["bytes"] == result.sizes["model.onnx"] + result.sizes["model.onnx_data"]
    ids = np.random.default_rng(2).integers(3, 128, size=(1, 7))
    external, _ = ort_forward(ort_session(folder), ids)
    inline, _ = ort_forward(ort_session(tiny_onnx_int4.model_file.parent), ids)
    np.testing.assert_array_equal(external, inline)


@pytest.mark.slow
def test_onnx_export_failure_in_optimum_is_an_export_error(tiny_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no_such_model"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match="optimum-onnx export of .* failed"):
        export(broken, "onnx", "fp32", tmp_path / "out")
    assert not (tmp_path / "out" / "model.onnx").exists()


# ------------------------------------------------------------------------------------------------
# Demo model (SmolLM2-135M-Instruct)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_ids(demo_model_dir) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)(PARAGRAPH)["input_ids"]


@pytest.fixture(scope="module")
def demo_gguf(demo_gguf_export):
    """Q4_K_M with the F16 kept and plan metadata (conftest: one conversion per session serves F16, Q8_0, the
    imatrix tests here and test_evaluate's GGUF schemes). Read-only."""
    return demo_gguf_export


@pytest.fixture(scope="module")
def demo_q8(demo_gguf_file):
    """model-Q8_0.gguf, quantized from the shared F16 (conftest)."""
    return demo_gguf_file("Q8_0")


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_demo_gguf_files_load_and_carry_bedside_metadata(demo_model_dir, demo_gguf, demo_q8):
    import llama_cpp

    folder = demo_gguf.model_file.parent
    record = json.loads((folder / "export.json").read_text())
    assert record["quant"] == "Q4_K_M" and record["f16_file"] == "model-F16.gguf"
    assert record["source"]["sha256"] == checkpoint_sha256(demo_model_dir)
    assert record["tensor_types"]["Q4_K"] > 0  # the K-quant mix, with its fallbacks (Q5_0, Q8_0)
    assert not list(folder.glob(".bedside-export-*"))
    for path in (folder / "model-F16.gguf", demo_q8, demo_gguf.model_file):
        model = llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, verbose=False)
        meta = model.metadata
        assert json.loads(meta["bedside.plan"]) == {"profile": "test", "scheme": "Q4_K_M"}
        assert meta["bedside.layers_removed"] == "[]"
        assert meta["bedside.source_sha256"] == record["source"]["sha256"]
        # batch of several tokens through a quantized matmul (the AMX crash path), then greedy decode
        text = model(
            "<|im_start|>user\nWhat is a fever?<|im_end|>\n<|im_start|>assistant\n",
            max_tokens=12,
            temperature=0,
        )
        assert len(text["choices"][0]["text"].split()) >= 3
        del model
    # Their perplexity against torch (F16 within 0.5 %, Q8_0 within 1.5 %, Q4_K_M in its measured range) is
    # measured once, on the same files, by tests/test_evaluate.py.


@pytest.mark.demo
@pytest.mark.heavy
def test_the_header_reads_the_demo_export_as_gguf_py_does(demo_gguf):
    """The reader the exporter and planner use (toolkit.core.gguf_header) on a real export: gguf-py's metadata
    values (all but the vocabulary's long arrays) and tensor table, and the same tensor bytes."""
    import gguf

    from tests.test_gguf_header import header_view, reader_view

    path = demo_gguf.model_file
    reader = gguf.GGUFReader(str(path))
    values, tensors = header_view(path)
    assert (values, tensors) == reader_view(reader)
    assert len(tensors) == 272 and values["general.architecture"] == "llama"
    stored = gguf_tensor_bytes(path)
    for tensor in reader.tensors[::30]:
        assert stored[tensor.name] == np.asarray(tensor.data).tobytes()


@pytest.mark.demo
@pytest.mark.heavy
def test_demo_iq_export_writes_the_predicted_types_and_runs(demo_gguf_iq, demo_ids):
    """The type table (toolkit.model.storage_types) against the IQ4_XS file llama.cpp really wrote: every tensor's
    type and bytes, and the counts export.json records (read_gguf_summary), fallbacks to IQ4_NL included."""
    from collections import Counter

    from exporters.gguf_exporter import read_gguf_summary
    from toolkit.model.facts import read_facts
    from toolkit.model.storage_types import gguf_tensor_types

    path, _matrix = demo_gguf_iq
    facts = read_facts(Path(__file__).parent / "fixtures" / "smollm2-135m")
    predicted = {t.name: t for t in gguf_tensor_types(facts, "IQ4_XS", imatrix=True)}
    written = {t.name: t for t in read_gguf_header(path).tensors}
    assert {name: t.dtype for name, t in predicted.items()} == {name: t.type_name for name, t in written.items()}
    assert {name: t.nbytes for name, t in predicted.items()} == {name: t.n_bytes for name, t in written.items()}
    summary = read_gguf_summary(path)
    assert summary["tensor_types"] == dict(Counter(t.dtype for t in predicted.values()))
    assert summary["tensor_types"]["IQ4_NL"] == 180 and summary["tensor_types"]["IQ4_XS"] == 30
    assert summary["imatrix_entries"] == 30 * 7
    ppl = gguf_perplexity(path, demo_ids)
    assert ppl == pytest.approx(DEMO_PERPLEXITY["IQ4_XS"], rel=0.03)


@pytest.mark.demo
@pytest.mark.heavy
def test_demo_gguf_tokenizer_gives_the_hf_ids(demo_model_dir, demo_gguf):
    import llama_cpp
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(demo_model_dir)
    vocab = llama_cpp.Llama(str(demo_gguf.model_file), vocab_only=True, verbose=False)
    for text in [*TOKENIZER_TEXTS, PARAGRAPH]:
        expected = hf(text, add_special_tokens=False)["input_ids"]
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == expected, text
    chat = hf.apply_chat_template([{"role": "user", "content": "Dose of amoxicillin?"}], tokenize=False)
    assert (
        vocab.tokenize(chat.encode(), add_bos=False, special=True)
        == hf(chat, add_special_tokens=False)["input_ids"]
    )


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_demo_gguf_imatrix_changes_the_rounding(demo_gguf, demo_gguf_file, tmp_path):
    from exporters.gguf_exporter import _gguf_tensor_widths, quantize

    f16 = demo_gguf.model_file.parent / "model-F16.gguf"
    _, _, widths = _gguf_tensor_widths(f16)
    layer_widths = {name: width for name, width in widths.items() if name.startswith("blk.")}
    rng = np.random.default_rng(0)
    varied_sums = {
        name: rng.gamma(0.5, 2.0, size=width).astype(np.float32) * 64 for name, width in layer_widths.items()
    }
    varied = write_imatrix(
        tmp_path / "varied.gguf",
        varied_sums,
        dict.fromkeys(varied_sums, 64),
        datasets=["gamma"],
        chunk_count=2,
        chunk_size=32,
    )

    plain = demo_gguf_file("Q4_0")  # the session's Q4_0 without a matrix (test_evaluate scores it)
    report = quantize(f16, tmp_path / "varied.q4.gguf", "Q4_0", imatrix=varied)
    assert report["imatrix_entries"] == len(layer_widths)
    baseline = gguf_tensor_bytes(plain)
    with_varied = gguf_tensor_bytes(tmp_path / "varied.q4.gguf")
    changed = [name for name in layer_widths if baseline[name] != with_varied[name]]
    assert len(changed) > 0.9 * len(layer_widths)

    fields = read_gguf_header(tmp_path / "varied.q4.gguf").values
    assert fields["quantize.imatrix.entries_count"] == len(layer_widths)
    assert fields["quantize.imatrix.dataset"] == "gamma"
    assert "bedside.plan" in fields  # metadata survives quantization with an imatrix too


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_demo_with_layers_removed_converts_and_runs(demo_model_dir, tmp_path):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.compress.prune.surgery import remove_layers

    pruned_dir = tmp_path / "pruned"
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    remove_layers(model, [20, 21])
    model.save_pretrained(pruned_dir)
    AutoTokenizer.from_pretrained(demo_model_dir).save_pretrained(pruned_dir)
    del model

    result = export(pruned_dir, "gguf", "Q8_0", tmp_path / "out", metadata={"layers_removed": [21, 20]})
    assert result.record["layers_removed"] == [20, 21]
    gguf_model = llama_cpp.Llama(str(result.model_file), n_ctx=128, n_threads=1, verbose=False)
    assert int(gguf_model.metadata["llama.block_count"]) == 28
    assert gguf_model.metadata["bedside.layers_removed"] == "[20, 21]"
    text = gguf_model(
        "<|im_start|>user\nName one symptom of flu.<|im_end|>\n<|im_start|>assistant\n",
        max_tokens=8,
        temperature=0,
    )
    assert text["choices"][0]["text"].strip()


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_demo_onnx_int4_perplexity_in_measured_range(demo_onnx_export, demo_ids):
    result = demo_onnx_export("int4_b32")  # conftest: the export test_evaluate scores too
    folder = result.model_file.parent
    assert (folder / "chat_template.jinja").is_file() or "chat_template" in json.loads(
        (folder / "tokenizer_config.json").read_text()
    )
    assert 120e6 < result.record["bytes"] < 150e6  # measured 134.9 MB (fp32 export: 539 MB)
    logits, _ = ort_forward(ort_session(folder), np.array([demo_ids]))
    assert perplexity(logits[0], demo_ids) == pytest.approx(DEMO_PERPLEXITY["onnx_int4_b32"], rel=0.03)
