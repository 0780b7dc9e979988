"""Quantization grids: bit-exact against the real quantizers (gguf-py, libggml, ONNX Runtime)."""

from __future__ import annotations

import ctypes
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.compress.quant import GRIDS, BlockShapeError, get_grid
from toolkit.compress.quant.onnx_blockwise import onnx_grid
from toolkit.core.errors import BedsideError
from toolkit.core.formats import all_schemes
from toolkit.model.storage_types import ONNX_SCHEMES, tensor_types

gguf = pytest.importorskip("gguf")

LEGACY_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
KQUANT_TYPES = ("Q3_K", "Q4_K", "Q5_K", "Q6_K")


NEGATIVE_ZERO_ROW = 12


def _weights_with_edge_cases(rows: int, columns: int, seed: int) -> np.ndarray:
    """Gaussian rows of varied scale, then rows that stress the corner cases of block quantizers."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((rows, columns)).astype(np.float32)
    weight *= rng.uniform(1e-3, 10.0, (rows, 1)).astype(np.float32)
    weight[0] = 0.0  # all-zero blocks
    weight[1] = 0.37  # constant positive
    weight[2] = -0.37  # constant negative
    weight[3, :16] = 0.0  # a zero sub-block inside a live super-block
    weight[4, 5] = 1000.0  # large outlier
    weight[5] = np.abs(weight[5])  # one-signed blocks
    weight[6] = -np.abs(weight[6])
    weight[7] = 1e-20  # tiny: scales underflow float16
    weight[8, ::2] = 0.0  # sparse
    # ties: equal magnitudes of both signs, and values landing exactly on .5 after scaling
    weight[9, :32] = np.float32(1.0)
    weight[9, 3] = -127.0
    weight[9, 7] = 127.0
    weight[9, 8:12] = (2.5, -2.5, 0.5, -1.5)
    weight[10, :32] = (-8.0, 2.5, -2.5, 1.5, -0.5, 7.0) + (0.0,) * 26
    if rows < 13:
        return weight
    weight[11, :32] = 1.0  # the tie the other way round: +m before -m
    weight[11, 2], weight[11, 5] = 64.0, -64.0
    weight[NEGATIVE_ZERO_ROW, :32] = 0.0  # negative zeros: ggml's block maximum starts at +0.0f
    weight[NEGATIVE_ZERO_ROW, 0:32:3] = -0.0
    return weight


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """ggml legacy layout: element j in the low nibble of byte j, element j+16 in the high one."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _ggml_legacy_bytes(name: str, weight: torch.Tensor) -> np.ndarray:
    """Pack our quantize() record into ggml's block bytes, to compare with gguf-py byte for byte."""
    record = get_grid(name).quantize(weight)
    rows = weight.shape[0]
    codes = record.codes.numpy().astype(np.int64).reshape(rows, -1, 32)
    parts = [record.fields["d"].numpy().view(np.uint8).reshape(rows, -1, 2)]
    if "m" in record.fields:
        parts.append(record.fields["m"].numpy().view(np.uint8).reshape(rows, -1, 2))
    if name == "Q8_0":
        parts.append(codes.astype(np.int8).view(np.uint8))
    elif name in ("Q4_0", "Q4_1"):
        parts.append(_pack_nibbles(codes))
    else:  # Q5_0 / Q5_1: 32 fifth bits in a little-endian uint32, then the low nibbles
        high_bits = ((codes >> 4) & 1) << np.arange(32)
        parts.append(high_bits.sum(axis=-1).astype("<u4").view(np.uint8).reshape(rows, -1, 4))
        parts.append(_pack_nibbles(codes & 0xF))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


@pytest.mark.parametrize("name", LEGACY_TYPES)
def test_legacy_ggml_grids_match_gguf_py_bytes(name):
    weight = _weights_with_edge_cases(24, 256, seed=1)
    weight[NEGATIVE_ZERO_ROW] = 1.0  # gguf-py keeps -0.0 where libggml writes +0.0 (the libggml test holds it)
    qtype = gguf.GGMLQuantizationType[name]
    reference = gguf.quants.quantize(weight, qtype)
    ours = _ggml_legacy_bytes(name, torch.from_numpy(weight))
    np.testing.assert_array_equal(ours, reference)
    dequantized = gguf.quants.dequantize(reference, qtype)
    np.testing.assert_array_equal(get_grid(name).fake_quantize(torch.from_numpy(weight)).numpy(), dequantized)


def test_q8_0_rounds_ties_away_from_zero():
    weight = torch.zeros(1, 32)
    weight[0, :4] = torch.tensor([127.0, 2.5, -2.5, 0.5])  # d = 1: x/d lands on .5 exactly
    record = get_grid("Q8_0").quantize(weight)
    assert record.codes[0, :4].tolist() == [127, 3, -3, 1]


def _libggml() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama-cpp-python is not installed")
    library = Path(spec.origin).parent / "lib" / "libggml-base.so"
    if not library.exists():
        pytest.skip(f"no {library}")
    lib = ctypes.CDLL(str(library))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def _quantize_with_libggml(weight: np.ndarray, name: str) -> np.ndarray:
    """llama.cpp's own quantizer (what llama_model_quantize calls per tensor), no importance matrix."""
    lib = _libggml()
    qtype = gguf.GGMLQuantizationType[name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    source = np.ascontiguousarray(weight, dtype=np.float32)
    rows, columns = source.shape
    blocks = np.zeros((rows, columns // block * type_size), dtype=np.uint8)
    lib.ggml_quantize_chunk(int(qtype), source.ctypes.data, blocks.ctypes.data, 0, rows, columns, None)
    return blocks


@pytest.mark.parametrize("dim", [-1, 0])
def test_signed_absmax_is_ggmls_first_largest_magnitude(dim):
    """The two-reduction fast path equals ggml's loop (first element of strictly larger |x| wins) on blocks
    full of magnitude ties of both signs, and stores +0.0 for blocks of zeros."""
    from toolkit.compress.quant.ggml_legacy import signed_absmax

    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(-3, 4, (4096, 8), generator=generator).to(torch.float32)
    blocks[0] = -0.0
    blocks = blocks if dim == -1 else blocks.T.contiguous()
    rows = blocks if dim == -1 else blocks.T
    expected = []
    for row in rows.tolist():
        best, value = 0.0, 0.0
        for x in row:
            if abs(x) > best:
                best, value = abs(x), x
        expected.append(value)
    result = signed_absmax(blocks, dim=dim)
    assert torch.equal(result, torch.tensor(expected))
    assert math.copysign(1.0, float(result[0])) == 1.0


@pytest.mark.parametrize("name", LEGACY_TYPES + KQUANT_TYPES)
def test_ggml_grids_match_llama_cpp_quantizer(name):
    weight = _weights_with_edge_cases(16, 512, seed=2)
    blocks = _quantize_with_libggml(weight, name)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name])
    np.testing.assert_array_equal(get_grid(name).fake_quantize(torch.from_numpy(weight)).numpy(), expected)
    if name in LEGACY_TYPES:
        np.testing.assert_array_equal(_ggml_legacy_bytes(name, torch.from_numpy(weight)), blocks)


# where each k-quant super-block stores its float16 super-scale(s), and its sub-block scales
KQUANT_LAYOUT = {
    "Q4_K": {"d": 0, "dmin": 2},
    "Q5_K": {"d": 0, "dmin": 2},
    "Q6_K": {"d": 208},
    "Q3_K": {"d": 108},
}


@pytest.mark.parametrize("name", KQUANT_TYPES)
def test_kquant_super_scales_match_llama_cpp_bytes(name):
    weight = _weights_with_edge_cases(12, 512, seed=3)
    qtype = gguf.GGMLQuantizationType[name]
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = _quantize_with_libggml(weight, name).reshape(12, -1, type_size)
    record = get_grid(name).quantize(torch.from_numpy(weight))
    for field, offset in KQUANT_LAYOUT[name].items():
        stored = np.ascontiguousarray(blocks[..., offset : offset + 2]).view(np.float16)[..., 0]
        np.testing.assert_array_equal(record.fields[field].numpy().view(np.uint16), stored.view(np.uint16))
    if name == "Q6_K":
        np.testing.assert_array_equal(record.fields["sub_scales"].numpy(), blocks[..., 192:208].view(np.int8))


def _matmul_model(weight_k_n: np.ndarray):
    """A one-MatMul ONNX graph ``Y = A @ W`` with a constant ``[K, N]`` weight of the array's dtype."""
    onnx = pytest.importorskip("onnx")
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    k, n = weight_k_n.shape
    element = onnx.helper.np_dtype_to_tensor_dtype(weight_k_n.dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])],
        "matmul",
        [helper.make_tensor_value_info("A", element, ["M", k])],
        [helper.make_tensor_value_info("Y", element, ["M", n])],
        [numpy_helper.from_array(weight_k_n, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_onnx_grids_match_matmul_nbits(bits, block, symmetric):
    ort = pytest.importorskip("onnxruntime")
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # 576 inputs: not a multiple of 128, so the last block is partial (the demo model's hidden size)
    weight = _weights_with_edge_cases(24, 576, seed=4)
    quantizer = MatMulNBitsQuantizer(
        _matmul_model(np.ascontiguousarray(weight.T)), bits=bits, block_size=block, is_symmetric=symmetric
    )
    quantizer.process()
    model = quantizer.model.model
    assert [node.op_type for node in model.graph.node] == ["MatMulNBits"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    # an identity input reads the dequantized weight back out of the runtime: [K, N] = W^T
    runtime_weight = session.run(None, {"A": np.eye(576, dtype=np.float32)})[0].T
    grid = onnx_grid(bits, block, symmetric)
    np.testing.assert_array_equal(grid.fake_quantize(torch.from_numpy(weight)).numpy(), runtime_weight)

    initializers = {item.name: numpy_helper.to_array(item) for item in model.graph.initializer}
    record = grid.quantize(torch.from_numpy(weight))
    np.testing.assert_array_equal(record.fields["scales"].numpy(), initializers["W_scales"])
    if not symmetric:
        zero_points = record.fields["zero_points"].numpy()
        if bits == 4:  # two per byte, even block in the low nibble; an odd count pads with 8
            zero_points = np.pad(zero_points, ((0, 0), (0, zero_points.shape[1] % 2)), constant_values=8)
            zero_points = zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)
        np.testing.assert_array_equal(zero_points, initializers["W_zero_points"])


def test_every_export_scheme_has_a_grid():
    weight = torch.randn(4, 512)
    for scheme in all_schemes():
        grid = get_grid(scheme)
        if getattr(grid, "requires_imatrix", False):  # IQ3_XXS, IQ2_M (IQ2_S): tests/test_ggml_lib.py
            with pytest.raises(BedsideError, match="needs an importance matrix"):
                grid.fake_quantize(weight)
            continue
        result = grid.fake_quantize(weight)
        assert result.shape == weight.shape and result.dtype == weight.dtype
        assert torch.isfinite(result).all()
        assert grid.bits_per_weight >= grid.bits
    assert get_grid("Q4_K_M") is GRIDS["Q4_K"]
    for scheme, spec in ONNX_SCHEMES.items():  # the memory estimator's table says how ONNX stores it
        if spec.bits is not None:
            grid = get_grid(scheme)
            assert (grid.bits, grid.group_size, grid.symmetric) == (
                spec.bits,
                spec.block_size,
                spec.symmetric,
            )
    for fallback in ("Q5_0", "Q8_0", "Q6_K"):  # llama.cpp's substitutes inside k-quant files
        assert get_grid(fallback).name == fallback


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(BedsideError, match="unknown quantization scheme 'Q9_9'.*Q4_K_M"):
        get_grid("Q9_9")


@pytest.mark.parametrize(("name", "in_features"), [("Q4_0", 48), ("Q8_0", 100), ("Q4_K", 576), ("Q6_K", 288)])
def test_ggml_rows_must_hold_whole_blocks(name, in_features):
    with pytest.raises(BlockShapeError, match="divisible"):
        get_grid(name).fake_quantize(torch.randn(2, in_features))
    assert issubclass(BlockShapeError, BedsideError)


def test_onnx_grids_pad_partial_blocks_and_reject_non_matrices():
    grid = get_grid("int4_b128")
    weight = torch.randn(3, 576)
    assert grid.quantize(weight).steps.shape == (3, 5)
    assert grid.fake_quantize(weight).shape == (3, 576)
    with pytest.raises(BlockShapeError, match="2-D"):
        grid.fake_quantize(torch.randn(128))


def test_rtn_error_falls_with_bits():
    weight = torch.randn(16, 512, generator=torch.Generator().manual_seed(0))

    def mse(name: str) -> float:
        return float((get_grid(name).fake_quantize(weight) - weight).pow(2).mean())

    assert mse("Q8_0") < mse("Q4_1") < mse("Q4_0")
    assert mse("Q6_K") < mse("Q5_K") < mse("Q4_K") < mse("Q3_K")
    assert mse("Q4_K") < mse("Q4_0")
    assert mse("int8_b32_asym") < mse("int4_b32_asym") < mse("int4_b128_asym")


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "int4_b128_sym", "asym4_g64"])
def test_clip_ratio_one_is_no_clip_and_smaller_ratios_clip(name):
    grid = get_grid(name)
    weight = torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    n_groups = grid.n_groups(256)
    assert torch.equal(grid.fake_quantize(weight, torch.ones(8, n_groups)), grid.fake_quantize(weight))
    clipped = grid.quantize(weight, torch.full((8, 1), 0.5)).dequantize()
    group_max = weight.reshape(8, n_groups, -1).abs().amax(-1)
    clipped_max = clipped.reshape(8, n_groups, -1).abs().amax(-1)
    # 0.5 * max, plus at most one code step of rounding
    steps = grid.quantize(weight, torch.full((8, 1), 0.5)).steps.abs()
    assert (clipped_max <= 0.5 * group_max + steps + 1e-6).all()
    with pytest.raises(ValueError, match="broadcast"):
        grid.fake_quantize(weight, torch.ones(3, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "int4_b32_sym", "F16"])
def test_half_inputs_compute_in_float32_and_keep_their_dtype(name, dtype):
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
    result = get_grid(name).fake_quantize(weight)
    assert result.dtype == dtype
    assert torch.equal(result, get_grid(name).fake_quantize(weight.float()).to(dtype))


def test_quantized_record_codes_and_dequantize_agree():
    weight = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    for name in ("Q4_0", "Q4_1", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "int4_b32_asym", "int8_b128_sym"):
        grid = get_grid(name)
        record = grid.quantize(weight)
        assert torch.equal(record.dequantize(), grid.fake_quantize(weight))
        assert int(record.codes.min()) >= 0 and int(record.codes.max()) < 2**grid.bits
    signed = get_grid("Q8_0").quantize(weight).codes
    assert int(signed.min()) >= -127 and int(signed.max()) <= 127


@pytest.mark.parametrize("name", LEGACY_TYPES)
def test_legacy_fake_quantize_shortcut_equals_the_record(name):
    """The legacy grids' fake_quantize skips the integer codes: bit-identical to quantize().dequantize() on the
    edge rows (ties, zeros, negative zeros, underflow), with and without clipping, in float32 and bfloat16."""
    grid = get_grid(name)
    weight = torch.from_numpy(_weights_with_edge_cases(16, 256, seed=5))
    ratio = torch.rand(16, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.5
    for clip in (None, ratio):
        for dtype in (torch.float32, torch.bfloat16):
            shortcut = grid.fake_quantize(weight.to(dtype), clip)
            expected = grid.quantize(weight.to(dtype), clip).dequantize().to(dtype)
            assert shortcut.dtype == dtype and torch.equal(shortcut, expected)


def test_float_grids():
    weight = torch.randn(2, 64) * 1e3
    assert torch.equal(get_grid("fp32").fake_quantize(weight), weight)
    assert torch.equal(get_grid("F16").fake_quantize(weight), weight.half().float())
    assert torch.equal(get_grid("F16").quantize(weight).dequantize(), weight.half().float())
    with pytest.raises(ValueError, match="clip_ratio"):
        get_grid("fp16").fake_quantize(weight, torch.ones(1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_onnx_grid_with_float16_scales_matches_a_float16_graph(symmetric):
    ort = pytest.importorskip("onnxruntime")
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weight = _weights_with_edge_cases(16, 256, seed=5).astype(np.float16)
    quantizer = MatMulNBitsQuantizer(
        _matmul_model(np.ascontiguousarray(weight.T)), bits=4, block_size=32, is_symmetric=symmetric
    )
    quantizer.process()
    session = ort.InferenceSession(
        quantizer.model.model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    runtime_weight = session.run(None, {"A": np.eye(256, dtype=np.float16)})[0].T
    grid = onnx_grid(4, 32, symmetric, scale_dtype=torch.float16)
    np.testing.assert_array_equal(grid.fake_quantize(torch.from_numpy(weight)).numpy(), runtime_weight)


@pytest.mark.parametrize("model", ["smollm2-135m", "llama-2-7b"])
def test_every_stored_tensor_type_has_a_grid_that_accepts_its_shape(model):
    from toolkit.core.formats import FORMATS
    from toolkit.model.facts import read_facts

    facts = read_facts(Path(__file__).parent / "fixtures" / model)
    for format_name, schemes in FORMATS.items():
        for scheme in schemes:
            for tensor in tensor_types(facts, format_name, scheme):
                grid = get_grid(tensor.dtype)
                if len(tensor.shape) == 2:
                    grid.check_shape(tensor.shape)  # the type table never picks a type the row cannot hold
