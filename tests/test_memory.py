"""Memory estimator: type tables, byte arithmetic checked by hand, and agreement with llama.cpp / onnxruntime."""

import ctypes
import re
from pathlib import Path

import pytest

from toolkit.core.errors import BedsideError
from toolkit.core.formats import FORMATS, KV_CACHE_DTYPES
from toolkit.model.facts import ModelFacts, TensorSpec, read_facts
from toolkit.model.ggml_types import GGML_TYPES, ggml_type
from toolkit.model.storage_types import (
    GGUF_MIXES,
    ONNX_SCHEMES,
    gguf_tensor_types,
    has_type_table,
    matmul_nbits_bytes,
    tensor_types,
    use_more_bits,
    vision_weight_bytes,
)
from toolkit.plan.memory import (
    ORT_ARENA_KV_BASE,
    ORT_ARENA_KV_PER_DOUBLING,
    ORT_PREFILL_CHUNK,
    Deployment,
    RuntimeSettings,
    estimate_memory,
    kv_cache_bytes,
    llama_cpp_compute_regions,
    llama_cpp_repacked,
    memory_budget,
    onnxruntime_arena_kv_factor,
    onnxruntime_compute_regions,
    text_weights,
)
from toolkit.plan.quality_priors import QUANT_PRIOR_PCT
from toolkit.plan.schema import Candidate, Plan
from toolkit.target.profiles import Compute, Figure, load_profile

FIXTURES = Path(__file__).parent / "fixtures"
MIB = 1024**2
GIB = 1024**3


@pytest.fixture(scope="module")
def llama2() -> ModelFacts:
    return read_facts(FIXTURES / "llama-2-7b")


@pytest.fixture(scope="module")
def llava() -> ModelFacts:
    return read_facts(FIXTURES / "llava-1.5-7b")


@pytest.fixture(scope="module")
def smollm() -> ModelFacts:
    return read_facts(FIXTURES / "smollm2-135m")


def one_matrix_model(rows: int, cols: int) -> ModelFacts:
    """A one-layer model whose only weight is a rows x cols attn_q: for hand-checked byte counts."""
    return ModelFacts(
        architecture="LlamaForCausalLM",
        family="llama",
        num_layers=1,
        hidden_size=cols,
        intermediate_size=cols,
        num_heads=32,
        num_kv_heads=32,
        head_dim=cols // 32,
        vocab_size=32,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        layer_tensors=(TensorSpec("attn_q", (rows, cols)), TensorSpec("attn_norm", (cols,))),
        global_tensors=(),
    )


# --- ggml type table --------------------------------------------------------------------------------------


def test_ggml_type_table_covers_every_type_a_scheme_stores():
    """The table is read from gguf-py; every type the GGUF mixes write must be in it."""
    used = {mix.default for mix in GGUF_MIXES.values()} | {"F32", "F16", "Q6_K", "Q8_0"}
    assert used <= set(GGML_TYPES), used - set(GGML_TYPES)


def test_block_sizes_and_bytes_per_block():
    expected = {
        "F32": (1, 4),
        "F16": (1, 2),
        "Q4_0": (32, 18),
        "Q4_1": (32, 20),
        "Q5_0": (32, 22),
        "Q5_1": (32, 24),
        "Q8_0": (32, 34),
        "Q2_K": (256, 84),
        "Q3_K": (256, 110),
        "Q4_K": (256, 144),
        "Q5_K": (256, 176),
        "Q6_K": (256, 210),
    }
    for name, (block, size) in expected.items():
        assert (ggml_type(name).block_size, ggml_type(name).type_size) == (block, size)


def test_q8_0_of_a_4096_square_matrix():
    assert ggml_type("Q8_0").tensor_bytes((4096, 4096)) == 4096 * 4096 // 32 * 34
    model = one_matrix_model(4096, 4096)
    q8 = {t.role: t for t in tensor_types(model, "gguf", "Q8_0")}
    assert q8["attn_q"].dtype == "Q8_0" and q8["attn_q"].nbytes == 4096 * 4096 // 32 * 34
    assert q8["attn_norm"].dtype == "F32" and q8["attn_norm"].nbytes == 4096 * 4
    assert ggml_type("Q4_K").tensor_bytes((11008, 4096)) == 11008 * 4096 // 256 * 144


def test_row_not_divisible_by_block_is_refused():
    with pytest.raises(ValueError):
        ggml_type("Q4_K").row_bytes(576)


# --- GGUF mixes (llama-quant.cpp) -------------------------------------------------------------------------


def test_use_more_bits_layers_of_a_32_layer_model():
    # i < 4 or i >= 28 or (i - 4) % 3 == 2, worked out by hand
    assert [i for i in range(32) if use_more_bits(i, 32)] == [
        0,
        1,
        2,
        3,
        6,
        9,
        12,
        15,
        18,
        21,
        24,
        27,
        28,
        29,
        30,
        31,
    ]


def test_q4_k_m_types_of_llama2(llama2):
    types = {t.name: t.dtype for t in tensor_types(llama2, "gguf", "Q4_K_M")}
    assert types["token_embd.weight"] == "Q4_K"  # untied: the default type
    assert types["output.weight"] == "Q6_K"
    assert types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_v.weight"] == "Q6_K" and types["blk.4.attn_v.weight"] == "Q4_K"
    assert types["blk.6.ffn_down.weight"] == "Q6_K" and types["blk.7.ffn_down.weight"] == "Q4_K"
    assert types["blk.5.attn_q.weight"] == "Q4_K" and types["blk.5.ffn_up.weight"] == "Q4_K"


def test_q3_k_m_types_of_llama2(llama2):
    types = {t.name: t.dtype for t in tensor_types(llama2, "gguf", "Q3_K_M")}
    assert types["blk.0.attn_v.weight"] == "Q5_K" and types["blk.1.attn_v.weight"] == "Q5_K"
    assert types["blk.2.attn_v.weight"] == "Q4_K"
    assert types["blk.1.ffn_down.weight"] == "Q5_K" and types["blk.2.ffn_down.weight"] == "Q4_K"  # n/16 = 2
    assert types["blk.9.attn_output.weight"] == "Q4_K"
    assert types["blk.9.attn_q.weight"] == "Q3_K" and types["output.weight"] == "Q6_K"


# Published file sizes of TheBloke/Llama-2-7B-GGUF (huggingface.co model card, "Provided files", GB = 1e9).
PUBLISHED_LLAMA2_7B_GGUF_GB = {
    "Q3_K_M": 3.30,
    "Q4_0": 3.83,
    "Q4_K_M": 4.08,
    "Q5_K_M": 4.78,
    "Q6_K": 5.53,
    "Q8_0": 7.16,
}


@pytest.mark.parametrize("scheme", sorted(PUBLISHED_LLAMA2_7B_GGUF_GB))
def test_gguf_sizes_match_published_llama2_files(llama2, scheme):
    total = sum(t.nbytes for t in tensor_types(llama2, "gguf", scheme))
    assert total / 1e9 == pytest.approx(PUBLISHED_LLAMA2_7B_GGUF_GB[scheme], rel=0.003)


# Model sizes of llama.cpp's Llama-3-8B scoreboard (tools/perplexity/README.md, "LLaMA 3 8b Scoreboard", GiB); IQ
# rows were quantized with an importance matrix ("WT 10m"), the others without.
LLAMA3_8B_SCOREBOARD_GIB = {
    "F16": 14.97,
    "Q8_0": 7.96,
    "Q6_K": 6.14,
    "Q5_K_M": 5.33,
    "Q4_K_M": 4.58,
    "Q4_0": 4.34,
    "IQ4_XS": 4.14,
    "Q3_K_M": 3.74,
    "IQ3_M": 3.53,
    "IQ3_XXS": 3.05,
    "Q2_K": 2.96,
    "IQ2_M": 2.74,
}


def _llama3_8b() -> ModelFacts:
    """Llama-3-8B's text model: Mistral-7B's layers (4096, 14336, 32 heads, 8 KV heads) with a 128256 vocabulary."""
    import dataclasses

    mistral = read_facts(FIXTURES / "mistral-7b")
    vocab = 128256
    globals_ = tuple(
        TensorSpec(t.role, (vocab, t.shape[1]), t.name) if t.role in ("token_embd", "output") else t
        for t in mistral.global_tensors
    )
    return dataclasses.replace(mistral, vocab_size=vocab, global_tensors=globals_)


@pytest.mark.parametrize("scheme", sorted(LLAMA3_8B_SCOREBOARD_GIB))
def test_gguf_sizes_match_llama3_8b_scoreboard(scheme):
    imatrix = scheme.startswith("IQ")
    total = sum(t.nbytes for t in tensor_types(_llama3_8b(), "gguf", scheme, imatrix=imatrix))
    assert total / GIB == pytest.approx(
        LLAMA3_8B_SCOREBOARD_GIB[scheme], rel=0.005
    )  # files add ~5 MiB of vocab


def test_rows_of_576_fall_back_as_notes_measured(smollm):
    """Q4_K_M on hidden 576: 180 of 272 tensors fall back (q4_K -> q5_0, q6_K -> q8_0); ffn_down keeps K-quants."""
    tensors = tensor_types(smollm, "gguf", "Q4_K_M")
    assert len(tensors) == 272
    fallen = [t for t in tensors if len(t.shape) == 2 and t.role != "token_embd" and t.shape[-1] % 256]
    assert len(fallen) == 180
    assert {t.dtype for t in fallen} == {"Q5_0", "Q8_0"}
    assert {t.dtype for t in tensors if t.role == "ffn_down"} == {"Q4_K", "Q6_K"}
    assert next(t for t in tensors if t.role == "token_embd").dtype == "Q8_0"  # tied, 576 % 256 != 0


def _llama_cpp_dry_run_types(
    source: Path, ftype: int, prune: list[int], imatrix: bool = False
) -> dict[str, str]:
    """Per-tensor target types that llama.cpp's own quantizer chooses (dry run: nothing written).

    `imatrix`: hand over a one-entry importance matrix, which is all llama.cpp's rules look at (has_imatrix).
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):  # noqa: ARG001
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True
        params.dry_run = True
        keep_alive: list[object] = []
        if prune:
            layers = (ctypes.c_int32 * (len(prune) + 1))(*prune, -1)
            params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
            keep_alive.append(layers)
        if imatrix:
            value = (ctypes.c_float * 1)(1.0)
            entries = (llama_cpp.llama_model_imatrix_data * 2)()
            entries[0].name, entries[0].size = b"unused.weight", 1
            entries[0].data = ctypes.cast(value, ctypes.POINTER(ctypes.c_float))
            entries[1].name = None
            params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
            keep_alive += [value, entries]
        assert llama_cpp.llama_model_quantize(str(source).encode(), b"/dev/null", ctypes.byref(params)) == 0
    finally:
        llama_cpp.llama_log_set(ctypes.cast(None, llama_cpp.llama_log_callback), ctypes.c_void_p(0))
    rows = re.findall(
        r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size =[^\n]*?(?:\((\w+)\))?\n", "".join(log)
    )
    return {name: (new or current).upper() for name, current, new in rows}


LLAMA_FTYPES = {
    "F16": 1,
    "Q4_0": 2,
    "Q8_0": 7,
    "Q2_K": 10,
    "Q3_K_M": 12,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
    "Q6_K": 18,
    "IQ3_XXS": 23,
    "IQ3_M": 27,
    "IQ2_M": 29,
    "IQ4_XS": 30,
}
# Schemes whose rules depend on whether an importance matrix is given (llama-quant.cpp: has_imatrix).
IMATRIX_DEPENDENT = ("Q4_0", "IQ4_XS", "IQ3_XXS")


def test_gguf_ftype_numbers_are_llama_cpps():
    llama_cpp = pytest.importorskip("llama_cpp")
    from toolkit.core.formats import GGUF_FTYPES

    assert GGUF_FTYPES == LLAMA_FTYPES
    for scheme, number in GGUF_FTYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{scheme}") == number, scheme


@pytest.mark.demo
@pytest.mark.parametrize(
    ("scheme", "prune", "imatrix"),
    [(s, [], False) for s in FORMATS["gguf"]]
    + [(s, [], True) for s in IMATRIX_DEPENDENT]
    + [("Q4_K_M", [3, 11, 20, 27], False)],
)
def test_gguf_types_equal_llama_cpp_quantizer(demo_gguf_path, smollm, scheme, prune, imatrix):
    """Our type table against llama.cpp's quantizer on the demo GGUF (dry run, ~0.2 s each).

    The demo's 576-wide rows make llama.cpp fall back: IQ types -> IQ4_NL, Q2_K/Q3_K -> Q4_0 (tensor_type_fallback).
    """
    assert set(LLAMA_FTYPES) == set(FORMATS["gguf"])
    real = _llama_cpp_dry_run_types(demo_gguf_path, LLAMA_FTYPES[scheme], prune, imatrix)
    # llama.cpp's own prune_layers keeps the source's block count for the ffn_down rules (n_layer_all)
    kept = smollm.num_layers - len(prune)
    tensors = gguf_tensor_types(
        smollm, scheme, kept, imatrix=imatrix, n_layer_all=smollm.num_layers if prune else None
    )
    ours = {t.name: t.dtype for t in tensors}
    assert len(real) == len(ours)
    assert ours == real


# A small Llama with grouped-query attention (8 heads, 2 KV heads: n_gqa = 4), untied output and rows that hold
# whole 256-blocks: the branches the demo model (n_gqa 3, tied, 576-wide rows) never reaches.
GQA4_SIZES = {"hidden": 256, "ffn": 512, "layers": 16, "vocab": 256, "heads": 8, "kv_heads": 2}


def _gqa4_facts() -> ModelFacts:
    h, f, kv = GQA4_SIZES["hidden"], GQA4_SIZES["ffn"], GQA4_SIZES["hidden"] // 4
    layer = (
        TensorSpec("attn_norm", (h,)),
        TensorSpec("attn_q", (h, h)),
        TensorSpec("attn_k", (kv, h)),
        TensorSpec("attn_v", (kv, h)),
        TensorSpec("attn_output", (h, h)),
        TensorSpec("ffn_norm", (h,)),
        TensorSpec("ffn_gate", (f, h)),
        TensorSpec("ffn_up", (f, h)),
        TensorSpec("ffn_down", (h, f)),
    )
    vocab = GQA4_SIZES["vocab"]
    return ModelFacts(
        architecture="LlamaForCausalLM",
        family="llama",
        num_layers=GQA4_SIZES["layers"],
        hidden_size=h,
        intermediate_size=f,
        num_heads=GQA4_SIZES["heads"],
        num_kv_heads=GQA4_SIZES["kv_heads"],
        head_dim=h // GQA4_SIZES["heads"],
        vocab_size=vocab,
        tie_word_embeddings=False,
        max_position_embeddings=256,
        layer_tensors=layer,
        global_tensors=(
            TensorSpec("token_embd", (vocab, h)),
            TensorSpec("output_norm", (h,)),
            TensorSpec("output", (vocab, h)),
        ),
    )


@pytest.fixture(scope="module")
def gqa4_gguf(tmp_path_factory) -> tuple[ModelFacts, Path]:
    """The model of _gqa4_facts as an F16 GGUF of zeros (9 MB): enough for llama.cpp's dry run."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    facts = _gqa4_facts()
    path = tmp_path_factory.mktemp("gqa4") / "tiny-gqa4.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(facts.hidden_size)
    writer.add_feed_forward_length(facts.intermediate_size)
    writer.add_block_count(facts.num_layers)
    writer.add_head_count(facts.num_heads)
    writer.add_head_count_kv(facts.num_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(facts.head_dim)
    writer.add_file_type(1)
    specs = [("token_embd.weight", facts.global_tensors[0])]
    specs += [(f"blk.{i}.{t.role}.weight", t) for i in range(facts.num_layers) for t in facts.layer_tensors]
    specs += [(f"{t.role}.weight", t) for t in facts.global_tensors[1:]]
    for name, spec in specs:
        dtype = np.float32 if len(spec.shape) == 1 else np.float16
        writer.add_tensor(name, np.zeros(spec.shape, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return facts, path


@pytest.mark.parametrize("scheme", FORMATS["gguf"])
def test_gguf_types_equal_llama_cpp_quantizer_with_gqa_and_untied_output(gqa4_gguf, scheme):
    """The GQA >= 4, untied-output and imatrix rules against llama.cpp's dry run (both with and without one)."""
    facts, path = gqa4_gguf
    for imatrix in (False, True):
        real = _llama_cpp_dry_run_types(path, LLAMA_FTYPES[scheme], [], imatrix)
        ours = {t.name: t.dtype for t in gguf_tensor_types(facts, scheme, imatrix=imatrix)}
        assert ours == real, (scheme, imatrix)


def test_iq_mixes_by_hand(llama2):
    """Llama-2-7B (n_gqa 1, untied, 4096-wide rows): rules read off llama_tensor_get_type_impl."""
    iq2_m = {t.name: t.dtype for t in tensor_types(llama2, "gguf", "IQ2_M", imatrix=True)}
    assert iq2_m["token_embd.weight"] == "IQ3_S" and iq2_m["output.weight"] == "Q5_K"
    assert iq2_m["blk.0.attn_v.weight"] == "IQ3_S" and iq2_m["blk.0.attn_output.weight"] == "IQ3_S"
    assert iq2_m["blk.3.ffn_down.weight"] == "IQ3_S" and iq2_m["blk.4.ffn_down.weight"] == "IQ2_S"
    assert iq2_m["blk.9.attn_q.weight"] == "IQ2_S" and iq2_m["blk.9.ffn_up.weight"] == "IQ2_S"
    iq3_xxs = {t.name: t.dtype for t in tensor_types(llama2, "gguf", "IQ3_XXS", imatrix=False)}
    assert iq3_xxs["blk.0.attn_v.weight"] == "IQ3_S" and iq3_xxs["blk.0.attn_q.weight"] == "IQ2_S"
    assert iq3_xxs["blk.3.ffn_down.weight"] == "Q4_K" and iq3_xxs["blk.4.ffn_down.weight"] == "Q3_K"
    q2_k = {t.name: t.dtype for t in tensor_types(llama2, "gguf", "Q2_K")}
    assert q2_k["blk.0.attn_v.weight"] == "Q3_K" and q2_k["blk.5.ffn_down.weight"] == "Q3_K"
    assert q2_k["blk.5.attn_q.weight"] == "Q2_K" and q2_k["output.weight"] == "Q6_K"
    total = {s: sum(t.nbytes for t in tensor_types(llama2, "gguf", s, imatrix=True)) for s in FORMATS["gguf"]}
    order = ["Q4_0", "IQ4_XS", "Q3_K_M", "IQ3_M", "IQ3_XXS", "Q2_K", "IQ2_M"]
    assert [total[s] for s in order] == sorted((total[s] for s in order), reverse=True)


# --- ONNX MatMulNBits -------------------------------------------------------------------------------------


def test_matmul_nbits_bytes_by_hand():
    # N=192, K=576, 4 bits, block 32, fp32 scales, asymmetric: 18 blocks per row
    size = matmul_nbits_bytes(192, 576, 4, 32, 4, symmetric=False)
    assert (size.packed, size.scales, size.zero_points) == (192 * 18 * 16, 192 * 18 * 4, 192 * 9)
    # K=1000 pads to 8 blocks of 128; 4-bit zero points pack two per byte
    size = matmul_nbits_bytes(64, 1000, 4, 128, 4, symmetric=False)
    assert (size.packed, size.scales, size.zero_points) == (64 * 8 * 64, 64 * 8 * 4, 64 * 4)
    assert matmul_nbits_bytes(64, 1000, 8, 128, 2, symmetric=True).zero_points == 0


@pytest.mark.parametrize(
    ("bits", "block", "symmetric", "k", "n"),
    [(4, 32, False, 576, 192), (4, 128, False, 1000, 64), (4, 32, True, 576, 192), (8, 32, False, 576, 192)],
)
def test_matmul_nbits_layout_equals_onnxruntime(bits, block, symmetric, k, n):
    np = pytest.importorskip("numpy")
    pytest.importorskip("onnx")
    quantizer = pytest.importorskip("onnxruntime.quantization.matmul_nbits_quantizer")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    q = quantizer.MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=symmetric)
    q.process()
    nbytes = {
        i.name: int(np.prod(i.dims)) * helper.tensor_dtype_to_np_dtype(i.data_type).itemsize
        for i in q.model.model.graph.initializer
    }
    ours = matmul_nbits_bytes(n, k, bits, block, 4, symmetric)
    assert sum(nbytes.values()) == ours.total
    assert nbytes["W_scales"] == ours.scales


def test_onnx_int4_keeps_tied_embedding_float(smollm, llama2):
    tensors = {t.name: t for t in tensor_types(smollm, "onnx", "int4_b32")}
    assert tensors["token_embd.weight"].dtype == "fp32" and "output.weight" not in tensors
    assert tensors["blk.0.attn_q.weight"].dtype == "int4_b32"
    assert tensors["blk.0.attn_norm.weight"].dtype == "fp32"
    untied = {t.name: t for t in tensor_types(llama2, "onnx", "int4_b128")}
    assert untied["output.weight"].dtype == "int4_b128"  # an untied lm_head is an ordinary MatMul
    assert untied["output.weight"].nbytes == matmul_nbits_bytes(32000, 4096, 4, 128, 4, False).total


def test_onnx_float_graphs(llama2):
    fp16 = sum(t.nbytes for t in tensor_types(llama2, "onnx", "fp16"))
    fp32 = sum(t.nbytes for t in tensor_types(llama2, "onnx", "fp32"))
    assert fp16 == llama2.text_params * 2 and fp32 == llama2.text_params * 4


def test_every_scheme_has_a_type_table_and_a_prior(llama2):
    for format_name, schemes in FORMATS.items():
        for scheme in schemes:
            assert has_type_table(format_name, scheme), (format_name, scheme)
            assert scheme in QUANT_PRIOR_PCT, scheme
            tensors = tensor_types(llama2, format_name, scheme)
            assert len(tensors) == 32 * 9 + 3 and all(t.nbytes > 0 for t in tensors)
    assert set(GGUF_MIXES) == set(FORMATS["gguf"]) and set(ONNX_SCHEMES) == set(FORMATS["onnx"])


# --- vision -----------------------------------------------------------------------------------------------


def test_llava_vision_bytes_by_hand(llava):
    # 23 of 24 CLIP layers run (feature layer -2); projector mm.0 (4096x1024) and mm.2 (4096x4096)
    linear = 23 * (4 * 1024 * 1024 + 2 * 1024 * 4096) + 4096 * 1024 + 4096 * 4096
    embeddings = 1024 * 3 * 14 * 14 + 577 * 1024  # patch conv and position embedding stay f16
    one_dim = 1024 + 2 * 1024 + 23 * (3 * 1024 + 1024 + 4096 + 1024 + 4 * 1024) + 2 * 4096
    q8 = vision_weight_bytes(llava.vision, "gguf", "q8_0")
    assert q8 == {"Q8_0": linear // 32 * 34, "F16": embeddings * 2, "F32": one_dim * 4}
    f16 = vision_weight_bytes(llava.vision, "gguf", "f16")
    assert f16 == {"F16": (linear + embeddings) * 2, "F32": one_dim * 4}
    assert linear + embeddings + one_dim == llava.vision_params - llava.vision.unused_params


# --- the estimate -----------------------------------------------------------------------------------------


def test_kv_cache_formula(llama2):
    # 2 (K, V) * 32 layers * 32 KV heads * 128 head dim * 4096 tokens * 2 bytes = 2 GiB
    assert kv_cache_bytes(llama2, 32, 4096, 2) == 2 * 32 * 32 * 128 * 4096 * 2 == 2 * GIB
    assert kv_cache_bytes(llama2, 16, 4096, KV_CACHE_DTYPES["q8_0"]) == 2 * 16 * 32 * 128 * 4096 * 34 // 32
    profile = load_profile("workstation-cpu-16gb")
    estimate = estimate_memory(llama2, Deployment("gguf", "Q4_K_M", 8, context=1000), profile)
    assert estimate.detail["param.kv_tokens"] == 1024  # llama.cpp pads n_ctx to a multiple of 256
    assert estimate.kv_cache_bytes == 2 * 24 * 32 * 128 * 1024 * KV_CACHE_DTYPES[profile.kv_cache_dtype]


def test_llama_cpp_compute_buffer_of_7b_at_512():
    """Llama-2-7B, n_ctx 512, n_ubatch 512: logits 32000*512*4 + 512*4096*4 bytes = 70.5 MiB."""
    regions = llama_cpp_compute_regions(read_facts(FIXTURES / "llama-2-7b"), 512, RuntimeSettings(), False)
    assert regions["logits"] == 32000 * 512 * 4 + 512 * 4096 * 4 == int(70.5 * MIB)
    assert max(regions.values()) == regions["logits"]
    assert regions["attention"] == 32 * 512 * 512 * 4 + 512 * 512 * 4 + 3 * 512 * 4096 * 4


def _counted(estimate) -> int:
    skip = ("param.", "compute.region.", "host_only.", "reserved.")
    return sum(v for k, v in estimate.detail.items() if not k.startswith(skip))


@pytest.mark.parametrize("profile_name", ["workstation-cpu-16gb", "rtx3050-4gb", "jetson4gb"])
@pytest.mark.parametrize("format_name,quant", [("gguf", "Q4_K_M"), ("onnx", "int4_b32")])
def test_detail_terms_add_up_to_the_total(llava, profile_name, format_name, quant):
    profile = load_profile(profile_name)
    if format_name not in profile.formats:
        pytest.skip(f"{profile_name} does not run {format_name}")
    estimate = estimate_memory(llava, Deployment(format_name, quant, 4, "q8_0"), profile)
    assert _counted(estimate) == estimate.total_bytes
    groups = (
        estimate.weights_bytes + estimate.kv_cache_bytes + estimate.vision_bytes + estimate.overhead_bytes
    )
    assert groups == estimate.total_bytes


def test_discrete_gpu_keeps_host_terms_out(llava):
    gpu = estimate_memory(llava, Deployment("gguf", "Q4_K_M"), load_profile("rtx3050-4gb"))
    assert "runtime.process" not in gpu.detail and "host_only.runtime.process" in gpu.detail
    assert any(
        k.startswith("host_only.weights.token_embd") for k in gpu.detail
    )  # llama.cpp keeps it on the CPU
    assert "reserved.cuda_context" in gpu.detail  # inside the profile's reserved_gib, not added again
    unified = estimate_memory(llava, Deployment("gguf", "Q4_K_M"), load_profile("jetson4gb"))
    assert unified.detail["runtime.process"] > 0 and unified.weights_bytes > gpu.weights_bytes


def test_onnxruntime_kv_is_past_plus_present(llama2):
    profile = load_profile("workstation-cpu-16gb")
    estimate = estimate_memory(llama2, Deployment("onnx", "int8", context=512), profile)
    one = 2 * 32 * 32 * 128 * 512 * 4  # fp32 graph
    assert estimate.detail["kv_cache.past"] == estimate.detail["kv_cache.present"] == one


def test_estimate_reads_plans_and_candidates(llama2):
    profile = load_profile("workstation-cpu-16gb")
    base = estimate_memory(llama2, Deployment("gguf", "Q4_K_M", 2, context=2048), profile)
    candidate = Candidate(
        format="gguf",
        quant="Q4_K_M",
        runtime="llama.cpp",
        layers_removed=2,
        memory=base,
        fits=True,
        predicted_quality_loss=0.0,
    )
    plan = Plan(
        model="m",
        profile=profile.name,
        context_length=2048,
        budget_bytes=memory_budget(profile),
        fp16_bytes=1,
        fits=True,
        chosen=candidate,
    )
    assert estimate_memory(llama2, plan, profile) == base
    assert estimate_memory(llama2, candidate, profile, context=2048) == base
    longer = estimate_memory(llama2, plan, profile, context=4096)
    assert longer.kv_cache_bytes == 2 * base.kv_cache_bytes


def test_logits_all_adds_the_score_arrays(smollm):
    profile = load_profile("workstation-cpu-16gb")
    plain = estimate_memory(smollm, Deployment("gguf", "Q8_0", context=2048), profile)
    scoring = estimate_memory(
        smollm, Deployment("gguf", "Q8_0", context=2048), profile, RuntimeSettings(logits_all=True)
    )
    # llama.cpp output buffer (n_batch rows) + llama-cpp-python's (n_ctx, vocab) scores array, float32
    assert scoring.detail["runtime.logits_host"] - plain.detail["runtime.logits_host"] == 49152 * 4 * (
        512 + 2048 - 1
    )
    # and every ubatch row is an output, so the logits region (vocab x 512 x 4) becomes the compute peak
    assert scoring.detail["compute.region.logits"] == 49152 * 512 * 4 + 512 * 576 * 4
    assert scoring.detail["compute.buffer"] == int(scoring.detail["compute.region.logits"] * 1.25)


def test_bad_deployments_are_user_errors(llama2):
    profile = load_profile("workstation-cpu-16gb")
    with pytest.raises(BedsideError, match="not a gguf scheme"):
        estimate_memory(llama2, Deployment("gguf", "int4_b32"), profile)
    with pytest.raises(BedsideError, match="layers removed"):
        estimate_memory(llama2, Deployment("gguf", "Q4_K_M", 32), profile)
    with pytest.raises(BedsideError, match="unknown format"):
        estimate_memory(llama2, Deployment("safetensors", "Q4_K_M"), profile)


def test_budget_is_capacity_minus_reserved_minus_headroom():
    profile = load_profile("jetson4gb").model_copy(
        update={
            "reserved_gib": Figure(value=1, source="test"),
            "headroom_pct": Figure(value=10, source="test"),
        }
    )
    assert memory_budget(profile) == int(3 * GIB * 0.9)


def test_ort_chunk_is_the_runners_batch():
    """The estimate's onnxruntime call size is OnnxRunner's (duplicated: runtimes never import toolkit)."""
    from runtimes.onnx_runner import OnnxRunner

    assert OnnxRunner.default_batch_size == ORT_PREFILL_CHUNK


def test_onnx_int4_head_and_embedding_are_8_bit(smollm):
    """exporters/onnx_exporter.py's default: untied int8 lm_head (MatMulNBits) + int8 embedding (Gather), block 32."""
    tensors = {t.role: t for t in text_weights(smollm, Deployment("onnx", "int4_b32")) if t.layer is None}
    # 49152 x 576 codes + 49152 x 18 blocks x (4-byte fp32 scale + 1 uint8 zero point)
    one = 49152 * 576 + 49152 * 18 * (4 + 1)
    assert tensors["token_embd"].nbytes == tensors["output"].nbytes == one
    assert tensors["output"].dtype == "int8_b32"
    # 127.4 MiB in all, the initializers of the real export (27.0 x 2 codes, 3.375 x 2 scales, 0.84 x 2 zero points,
    # 65.0 MiB of int4 layers)
    total = sum(t.nbytes for t in text_weights(smollm, Deployment("onnx", "int4_b32")))
    assert total / MIB == pytest.approx(127.43, abs=0.05)
    estimate = estimate_memory(
        smollm, Deployment("onnx", "int4_b32", context=512), load_profile("workstation-cpu-16gb")
    )
    assert "runtime.tied_lm_head_transposed" not in estimate.detail  # the head is its own weight
    fp32 = estimate_memory(
        smollm, Deployment("onnx", "fp32", context=512), load_profile("workstation-cpu-16gb")
    )
    assert fp32.detail["runtime.tied_lm_head_transposed"] == 49152 * 576 * 4


def test_onnxruntime_regions_of_one_128_token_call(smollm):
    """P = 128 tokens against T = 2048 cached positions, fp32, by hand."""
    regions = onnxruntime_compute_regions(smollm, 128, 1, 4, 2048)
    hidden = 128 * 576 * 4
    assert regions["attention"] == 9 * 128 * 2048 * 4 * 4 + 3 * 9 * 2048 * 64 * 4 + 4 * hidden
    assert regions["logits"] == 2 * 128 * 49152 * 4 + hidden
    assert regions["ffn"] == 3 * 128 * 1536 * 4 + 2 * hidden
    estimate = estimate_memory(
        smollm, Deployment("onnx", "fp32", context=2048), load_profile("workstation-cpu-16gb")
    )
    assert estimate.detail["param.prefill_tokens"] == 128
    assert estimate.detail["compute.buffer"] == sum(regions.values())
    whole = estimate_memory(
        smollm,
        Deployment("onnx", "fp32", context=2048),
        load_profile("workstation-cpu-16gb"),
        RuntimeSettings(prefill_tokens=2048),
    )
    # one 2048-token call: [9, 2048, 2048] scores and [2048, vocab] logits instead
    assert whole.detail["compute.region.attention"] > 10 * regions["attention"]
    assert whole.total_bytes - estimate.total_bytes > 600 * MIB


def test_arena_factor_grows_with_doublings_of_the_context():
    assert onnxruntime_arena_kv_factor(128, 128) == 0.0  # one call: nothing left over
    at_2048 = ORT_ARENA_KV_BASE + 4 * ORT_ARENA_KV_PER_DOUBLING
    assert onnxruntime_arena_kv_factor(2048, 128) == pytest.approx(at_2048)
    step = onnxruntime_arena_kv_factor(4096, 128) - onnxruntime_arena_kv_factor(2048, 128)
    assert step == pytest.approx(ORT_ARENA_KV_PER_DOUBLING)


def _cpu(architecture: str, features: list[str]) -> Compute:
    figure = Figure(value=1, source="test")
    return Compute(
        accelerator="cpu",
        architecture=architecture,
        cores=figure,
        fp16_tflops=figure,
        int8_tops=figure,
        cpu_features=features,
    )


def test_llama_cpp_repacks_q4_0_and_q4_k_on_avx2(smollm):
    """ggml-cpu/repack.cpp: Q4_0/Q4_K matmul weights get an interleaved copy on AVX2; Q8_0 and embeddings do not."""
    avx2 = _cpu("x86_64-avx2", ["avx", "avx2", "fma", "f16c"])
    q4_0 = text_weights(smollm, Deployment("gguf", "Q4_0"))
    repacked = [t for t in q4_0 if llama_cpp_repacked(t, avx2)]
    assert {t.dtype for t in repacked} == {"Q4_0"} and len(repacked) == 7 * 30
    assert not any(llama_cpp_repacked(t, avx2) for t in text_weights(smollm, Deployment("gguf", "Q8_0")))
    q4_k_m = [t for t in text_weights(smollm, Deployment("gguf", "Q4_K_M")) if llama_cpp_repacked(t, avx2)]
    assert {t.dtype for t in q4_k_m} == {"Q4_K"}  # ffn_down (1536 wide); the 576-wide rows fell back to Q5_0
    assert not any(llama_cpp_repacked(t, _cpu("x86_64-amx", ["avx2", "amx_tile"])) for t in repacked)
    arm = _cpu("aarch64-neon", ["neon", "dotprod"])
    assert all(llama_cpp_repacked(t, arm) for t in repacked)
    assert not any(llama_cpp_repacked(t, _cpu("aarch64-neon", ["neon"])) for t in repacked)

    profile = load_profile("workstation-cpu-16gb")
    deployment = Deployment("gguf", "Q4_0", context=512)
    read = estimate_memory(
        smollm, deployment, profile
    )  # the runner's default: repacked files are read, not mapped
    assert "runtime.repacked_weights" not in read.detail and read.detail["param.mmap"] == 0
    mapped = estimate_memory(smollm, deployment, profile, RuntimeSettings(mmap=True))
    assert mapped.detail["runtime.repacked_weights"] == sum(t.nbytes for t in repacked)
    assert mapped.detail["runtime.repacked_weights"] / MIB == pytest.approx(57.0, abs=0.1)
    assert mapped.total_bytes - read.total_bytes == mapped.detail["runtime.repacked_weights"]
    q8 = estimate_memory(smollm, Deployment("gguf", "Q8_0", context=512), profile)
    assert q8.detail["param.mmap"] == 1  # nothing repacked: the file stays mapped
    gpu = estimate_memory(smollm, Deployment("gguf", "Q4_0", context=512), load_profile("rtx3050-4gb"))
    assert "runtime.repacked_weights" not in gpu.detail  # weights offloaded to the GPU are not repacked


# Peak RSS (VmHWM) measured on this machine kind, see the calibration record in toolkit/plan/memory.py (llama.cpp rows
# re-measured after the runner stopped mapping files it repacks):
# measure_in_child(runtime, export, MeasureJob(context=N, decode_tokens=min(32, N // 4), n_threads=1)), what
# `evaluate(artifact, context=N)` reports as peak_rss_bytes. MiB.
MEASURED_PEAK_RSS_MIB = {
    ("gguf", "F16", 512): 354.9,
    ("gguf", "F16", 1024): 380.9,
    ("gguf", "F16", 2048): 430.9,
    ("gguf", "Q4_0", 512): 184.4,
    ("gguf", "Q4_0", 1024): 210.5,
    ("gguf", "Q4_0", 2048): 260.5,
    ("gguf", "Q4_K_M", 512): 197.7,
    ("gguf", "Q4_K_M", 1024): 223.9,
    ("gguf", "Q4_K_M", 2048): 273.8,
    ("gguf", "Q8_0", 512): 234.7,
    ("gguf", "Q8_0", 1024): 260.8,
    ("gguf", "Q8_0", 2048): 310.7,
    ("onnx", "fp32", 512): 841.2,  # 2 runs: 842.9, 839.5
    ("onnx", "fp32", 1024): 896.2,
    ("onnx", "fp32", 2048): 1097.7,  # 2 runs: 1125.1, 1070.3
    ("onnx", "fp32", 4096): 1455.4,
    ("onnx", "int4_b32", 512): 368.4,  # 2 runs: 368.0, 368.7
    ("onnx", "int4_b32", 1024): 440.6,
    ("onnx", "int4_b32", 1536): 535.7,
    ("onnx", "int4_b32", 2048): 615.9,  # 2 runs: 616.6, 615.1
    ("onnx", "int4_b32", 3072): 833.3,
    ("onnx", "int4_b32", 4096): 1001.8,
}


@pytest.mark.parametrize(("format_name", "quant", "context"), sorted(MEASURED_PEAK_RSS_MIB))
def test_calibration_record(smollm, format_name, quant, context):
    """The constants reproduce the measured peaks: llama.cpp within 5 %, onnxruntime within 7 %."""
    profile = load_profile("workstation-cpu-16gb").model_copy(
        update={"kv_cache_dtype": "f16", "batch_size": 1}
    )
    assert profile.compute.accelerator == "cpu" and profile.compute.architecture == "x86_64-avx2"
    estimate = estimate_memory(smollm, Deployment(format_name, quant, context=context), profile)
    measured = MEASURED_PEAK_RSS_MIB[(format_name, quant, context)] * MIB
    assert estimate.total_bytes == pytest.approx(measured, rel=0.05 if format_name == "gguf" else 0.07)


# --- KV-cache precision and placement (issue 18) ---------------------------------------------------------


def test_kv_cache_precisions_are_priced_per_element(llama2):
    """q8_0 stores 34 bytes and q4_0 18 bytes per 32 elements; a quantized cache turns flash attention on."""
    profile = load_profile("workstation-cpu-16gb")
    sizes = {}
    for kv in ("f16", "q8_0", "q4_0"):
        estimate = estimate_memory(
            llama2, Deployment("gguf", "Q4_K_M", context=2048, kv_cache_dtype=kv), profile
        )
        sizes[kv] = estimate.kv_cache_bytes
        assert estimate.detail["kv_cache.k"] == estimate.detail["kv_cache.v"]
        assert estimate.detail["param.flash_attn"] == (kv != "f16")  # CPU: only a quantized cache needs it
    elements = 2 * 32 * 32 * 128 * 2048
    assert sizes == {"f16": elements * 2, "q8_0": elements * 34 // 32, "q4_0": elements * 18 // 32}
    assert KV_CACHE_DTYPES["q4_0"] == 18 / 32
    default = estimate_memory(llama2, Deployment("gguf", "Q4_K_M", context=2048), profile)
    assert default.kv_cache_bytes == sizes[profile.kv_cache_dtype]  # no choice given: the profile's default
    with pytest.raises(BedsideError, match="unknown KV-cache dtype"):
        estimate_memory(llama2, Deployment("gguf", "Q4_K_M", kv_cache_dtype="q2"), profile)


def test_decode_bytes_read_the_cache_at_its_precision(llama2):
    from toolkit.plan.memory import decode_bytes_per_token

    profile = load_profile("jetson4gb")
    f16 = decode_bytes_per_token(
        llama2, Deployment("gguf", "Q4_K_M", context=2048, kv_cache_dtype="f16"), profile
    )
    q4 = decode_bytes_per_token(
        llama2, Deployment("gguf", "Q4_K_M", context=2048, kv_cache_dtype="q4_0"), profile
    )
    assert f16 - q4 == 2 * 32 * 32 * 128 * 2048 * (2 - 18 / 32)


def _layer_bytes(llama2, quant: str) -> dict[int, int]:
    sizes: dict[int, int] = {}
    for tensor in text_weights(llama2, Deployment("gguf", quant)):
        if tensor.layer is not None:
            sizes[tensor.layer] = sizes.get(tensor.layer, 0) + tensor.nbytes
    return sizes


def test_gpu_layers_move_the_first_layers_and_their_cache_to_host(llama2):
    """llama.cpp -ngl N: the head and the last N - 1 of 32 layers on the GPU (llama-model.cpp i_gpu_start =
    n_layer + 1 - N); the first 33 - N layers, their weights and their KV cache, in host memory."""
    from toolkit.plan.memory import host_budget

    profile = load_profile("rtx3050-4gb")
    device = estimate_memory(llama2, Deployment("gguf", "Q4_K_M", context=4096), profile)
    placed = estimate_memory(llama2, Deployment("gguf", "Q4_K_M", context=4096, gpu_layers=21), profile)
    on_host = 32 + 1 - 21  # 12 layers
    layers = _layer_bytes(llama2, "Q4_K_M")
    moved_weights = sum(v for k, v in placed.detail.items() if k.startswith("host_only.weights.layers."))
    assert moved_weights == sum(layers[i] for i in range(on_host))
    assert not any(k.startswith("host_only.weights.output.") for k in placed.detail)  # head on the GPU
    assert placed.detail["host_only.kv_cache.k"] == kv_cache_bytes(llama2, on_host, 4096, 2) // 2
    assert placed.kv_cache_bytes == kv_cache_bytes(llama2, 32 - on_host, 4096, 2)
    assert placed.weights_bytes == device.weights_bytes - moved_weights
    # the GPU copies one host layer in for a prefill batch (op offload); the CPU has its own one-token buffer
    assert placed.detail["compute.offload_copy"] == max(layers[i] for i in range(on_host))
    assert placed.detail["host_only.compute.buffer"] > 0
    assert placed.host_bytes == sum(v for k, v in placed.detail.items() if k.startswith("host_only."))
    assert placed.host_bytes <= host_budget(profile) == int(16 * GIB * 0.9)
    nothing = estimate_memory(llama2, Deployment("gguf", "Q4_K_M", context=4096, gpu_layers=0), profile)
    assert any(k.startswith("host_only.weights.output.") for k in nothing.detail)  # -ngl 0: the head too
    assert nothing.kv_cache_bytes == 0 and nothing.weights_bytes == 0


def test_kv_cache_in_host_memory(llama2):
    """offload_kqv = false: the whole cache in host memory, one layer's K and V copied in for a prefill batch."""
    profile = load_profile("rtx3050-4gb")
    device = estimate_memory(
        llama2, Deployment("gguf", "Q3_K_M", context=4096, kv_cache_dtype="q8_0"), profile
    )
    placed = estimate_memory(
        llama2, Deployment("gguf", "Q3_K_M", context=4096, kv_cache_dtype="q8_0", kv_on_host=True), profile
    )
    assert placed.kv_cache_bytes == 0 and placed.weights_bytes == device.weights_bytes
    host_kv = placed.detail["host_only.kv_cache.k"] + placed.detail["host_only.kv_cache.v"]
    assert host_kv == device.kv_cache_bytes
    assert placed.detail["compute.offload_copy"] == kv_cache_bytes(llama2, 1, 4096, 34 / 32)
    assert (
        placed.total_bytes
        == device.total_bytes - device.kv_cache_bytes + placed.detail["compute.offload_copy"]
    )


def test_decode_bytes_by_tier_follow_the_placement(llama2):
    from toolkit.plan.memory import decode_bytes_by_tier, decode_bytes_per_token, decode_seconds_per_token

    profile = load_profile("rtx3050-4gb")
    deployment = Deployment("gguf", "Q4_K_M", context=4096, gpu_layers=21)
    reads = decode_bytes_by_tier(llama2, deployment, profile)
    layers = _layer_bytes(llama2, "Q4_K_M")
    embedding_row = next(
        t.nbytes // t.shape[0] for t in text_weights(llama2, deployment) if t.role == "token_embd"
    )
    assert reads["ddr4"] == (
        sum(layers[i] for i in range(12)) + kv_cache_bytes(llama2, 12, 4096, 2) + embedding_row
    )
    assert sum(reads.values()) == decode_bytes_per_token(
        llama2, Deployment("gguf", "Q4_K_M", context=4096), profile
    )
    seconds = decode_seconds_per_token(llama2, deployment, profile)
    assert seconds == pytest.approx(reads["gddr6"] / 192e9 + reads["ddr4"] / 51.2e9)
    one_tier = decode_bytes_by_tier(
        llama2, Deployment("gguf", "Q4_K_M", context=4096), load_profile("jetson4gb")
    )
    assert list(one_tier) == ["lpddr5"]


def test_placement_needs_a_discrete_gpu_with_host_memory(llama2):
    for name in ("jetson4gb", "workstation-cpu-16gb"):
        with pytest.raises(BedsideError, match="discrete GPU with host memory"):
            estimate_memory(llama2, Deployment("gguf", "Q4_K_M", kv_on_host=True), load_profile(name))
    with pytest.raises(BedsideError, match="gpu layers must be between 0 and 33"):
        estimate_memory(llama2, Deployment("gguf", "Q4_K_M", gpu_layers=34), load_profile("rtx3050-4gb"))
    with pytest.raises(BedsideError, match="discrete GPU"):
        estimate_memory(llama2, Deployment("onnx", "int4_b32", kv_on_host=True), load_profile("rtx3050-4gb"))


def test_candidates_carry_kv_precision_and_placement(llama2):
    from toolkit.plan.memory import deployment_of

    profile = load_profile("rtx3050-4gb")
    deployment = Deployment("gguf", "Q4_K_M", context=4096, kv_cache_dtype="q8_0", gpu_layers=24)
    memory = estimate_memory(llama2, deployment, profile)
    candidate = Candidate(
        format="gguf",
        quant="Q4_K_M",
        runtime="llama.cpp",
        layers_removed=0,
        kv_cache_dtype="q8_0",
        gpu_layers=24,
        memory=memory,
        fits=True,
        predicted_quality_loss=0.0,
    )
    assert deployment_of(candidate, 4096) == Deployment(
        "gguf", "Q4_K_M", 0, None, "llama.cpp", 4096, kv_cache_dtype="q8_0", gpu_layers=24
    )
    assert estimate_memory(llama2, candidate, profile, context=4096) == memory
    old = Candidate.model_validate_json(candidate.model_dump_json(exclude={"kv_cache_dtype", "gpu_layers"}))
    assert old.kv_cache_dtype is None and old.gpu_layers is None  # plans written before issue 18 still load


# Peak RSS (VmHWM of the measuring child) of the demo with a quantized KV cache: `python -m bench.kv_cache`
# (docs/benchmarks/kv_cache.json, docs/BENCHMARKS.md "Bench 6"), i.e. measure_in_child("llama.cpp", export,
# MeasureJob(context=N, decode_tokens=min(32, N // 4), n_threads=1, runner_options={"kv_cache_dtype": KV})). MiB.
MEASURED_PEAK_RSS_QUANTIZED_KV_MIB = {
    ("Q8_0", "q8_0", 512): 223.3,
    ("Q8_0", "q4_0", 512): 220.3,
    ("Q4_K_M", "q8_0", 512): 186.7,
    ("Q4_K_M", "q4_0", 512): 184.0,
    ("Q8_0", "q8_0", 1024): 231.5,
    ("Q8_0", "q4_0", 1024): 226.0,
    ("Q4_K_M", "q8_0", 1024): 195.1,
    ("Q4_K_M", "q4_0", 1024): 189.5,
    ("Q8_0", "q8_0", 2048): 244.8,
    ("Q8_0", "q4_0", 2048): 233.4,
    ("Q4_K_M", "q8_0", 2048): 208.3,
    ("Q4_K_M", "q4_0", 2048): 197.1,
}


@pytest.mark.parametrize(("quant", "kv", "context"), sorted(MEASURED_PEAK_RSS_QUANTIZED_KV_MIB))
def test_quantized_kv_estimate_within_5_percent_of_the_measured_peak(smollm, quant, kv, context):
    profile = load_profile("workstation-cpu-16gb").model_copy(update={"batch_size": 1})
    estimate = estimate_memory(smollm, Deployment("gguf", quant, context=context, kv_cache_dtype=kv), profile)
    measured = MEASURED_PEAK_RSS_QUANTIZED_KV_MIB[(quant, kv, context)] * MIB
    assert estimate.total_bytes == pytest.approx(measured, rel=0.05)
