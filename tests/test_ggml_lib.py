"""libggml's own quantizer through ctypes (toolkit.compress.quant.ggml_lib): exactness, imatrix rules, bad input.

Small random matrices only; IQ types whose lattice set-up takes seconds (IQ2_S, IQ2_XS, IQ1_*) are left out
except where a test needs one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.compress.quant import get_grid
from toolkit.compress.quant.base import BlockShapeError
from toolkit.compress.quant.grids import grid_for_row
from toolkit.core.errors import BedsideError

gguf = pytest.importorskip("gguf")
ggml_lib = pytest.importorskip("toolkit.compress.quant.ggml_lib")
try:
    ggml_lib.library_path()
except BedsideError as error:  # pragma: no cover - set-up without llama-cpp-python
    pytest.skip(str(error), allow_module_level=True)

LibggmlGrid = ggml_lib.LibggmlGrid


def _weights(rows: int, columns: int, seed: int) -> np.ndarray:
    """Gaussian rows of varied scale, with an all-zero row, a constant row and an outlier."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((rows, columns)).astype(np.float32)
    weight *= rng.uniform(1e-3, 10.0, (rows, 1)).astype(np.float32)
    weight[0] = 0.0
    weight[1] = 0.37
    weight[2, 5] = 1000.0
    return weight


def _relative_rmse(approx: np.ndarray, exact: np.ndarray) -> float:
    """Root mean squared error over the root mean square, row by row, then averaged (skips zero rows)."""
    rms = np.sqrt((exact**2).mean(axis=1))
    err = np.sqrt(((approx - exact) ** 2).mean(axis=1))
    live = rms > 0
    return float((err[live] / rms[live]).mean())


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_torch_emulations_equal_libggml_without_imatrix(name):
    weight = _weights(16, 512, seed=11)
    expected = LibggmlGrid(name).fake_quantize(torch.from_numpy(weight)).numpy()
    ours = get_grid(name).fake_quantize(torch.from_numpy(weight)).numpy()
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("name", ["Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS"])
def test_dequantize_equals_gguf_py(name):
    """Our to_float binding (ggml_type_traits) against gguf-py's independent numpy dequantizer."""
    weight = _weights(8, 512, seed=12)
    imatrix = np.random.default_rng(0).uniform(0.1, 2.0, 512).astype(np.float32)
    blocks = ggml_lib.quantize_rows(weight, name, imatrix)
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
    assert blocks.shape == (8, 512 // block * type_size)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name])
    np.testing.assert_array_equal(ggml_lib.dequantize_rows(blocks, name, 512), expected)


# Relative RMS error bounds on Gaussian rows, measured about 0.08 (IQ4), 0.14 (IQ3_S), 0.18 (IQ3_XXS) and
# 0.27 (Q2_K): each type must stay below Q2_K's level, except Q2_K itself.
ERROR_BOUNDS = {"IQ4_NL": 0.10, "IQ4_XS": 0.10, "IQ3_S": 0.17, "IQ3_XXS": 0.22, "Q2_K": 0.33}


def _round_trip_error(name: str, weight: np.ndarray) -> float:
    grid = get_grid(name).with_imatrix(np.ones(weight.shape[1], dtype=np.float32))
    result = grid.fake_quantize(torch.from_numpy(weight)).numpy()
    assert np.isfinite(result).all()
    return _relative_rmse(result, weight)


@pytest.mark.parametrize("name", sorted(ERROR_BOUNDS))
def test_iq_round_trip_error(name):
    weight = np.random.default_rng(13).standard_normal((32, 512)).astype(np.float32)
    error = _round_trip_error(name, weight)
    assert 0.01 < error < ERROR_BOUNDS[name], (name, error)
    if name != "Q2_K":
        assert error < _round_trip_error("Q2_K", weight)


def test_importance_matrix_changes_the_rounding_towards_weighted_columns():
    weight = np.random.default_rng(14).standard_normal((16, 512)).astype(np.float32)
    important = np.ones(512, dtype=np.float32)
    important[:64] = 100.0  # the first 64 inputs matter most
    plain = LibggmlGrid("IQ4_XS").fake_quantize(torch.from_numpy(weight)).numpy()
    weighted = LibggmlGrid("IQ4_XS", imatrix=important).fake_quantize(torch.from_numpy(weight)).numpy()
    assert not np.array_equal(plain, weighted)
    head = slice(0, 64)
    assert (
        np.abs(weighted[:, head] - weight[:, head]).mean() < np.abs(plain[:, head] - weight[:, head]).mean()
    )


def test_a_type_that_needs_an_importance_matrix_refuses_without_one():
    weight = torch.randn(4, 256)
    with pytest.raises(BedsideError, match="IQ3_XXS needs an importance matrix") as caught:
        get_grid("IQ3_XXS").fake_quantize(weight)
    assert "\n" not in str(caught.value)
    assert get_grid("IQ3_XXS").requires_imatrix and not get_grid("IQ4_XS").requires_imatrix
    # libggml aborts the process for these without a matrix; ours is a superset of its list
    lib = ggml_lib._library()
    for name in ggml_lib.QUANTIZABLE_TYPES & set(gguf.GGMLQuantizationType.__members__):
        if lib.ggml_quantize_requires_imatrix(int(gguf.GGMLQuantizationType[name])):
            assert name in ggml_lib.IMATRIX_REQUIRED, name


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("IQ4_XS", (4, 576), "whole 256-blocks"),  # the demo model's rows: llama.cpp falls back to IQ4_NL
        ("IQ4_NL", (4, 48), "whole 32-blocks"),
        ("Q2_K", (512,), "2-D"),
    ],
)
def test_rows_not_holding_whole_blocks_raise(name, shape, message):
    with pytest.raises(BlockShapeError, match=message):
        ggml_lib.quantize_rows(np.zeros(shape, dtype=np.float32), name)
    if len(shape) == 2:
        with pytest.raises(BedsideError, match="divisible"):
            get_grid(name).fake_quantize(torch.zeros(shape))


def test_other_bad_inputs_raise_one_line_errors():
    weight = np.ones((2, 256), dtype=np.float32)
    with pytest.raises(BedsideError, match="one value per input column"):
        ggml_lib.quantize_rows(weight, "IQ4_XS", imatrix=np.ones(128, dtype=np.float32))
    with pytest.raises(BedsideError, match="finite and non-negative"):
        ggml_lib.quantize_rows(weight, "IQ4_XS", imatrix=-np.ones(256, dtype=np.float32))
    bad = weight.copy()
    bad[0, 3] = np.nan
    with pytest.raises(BedsideError, match="NaN"):
        ggml_lib.quantize_rows(bad, "Q4_0")
    with pytest.raises(BedsideError, match="cannot quantize to 'Q8_K'"):
        ggml_lib.quantize_rows(weight, "Q8_K")
    with pytest.raises(BedsideError, match="take 136 bytes each"):
        ggml_lib.dequantize_rows(np.zeros((2, 100), dtype=np.uint8), "IQ4_XS", 256)
    with pytest.raises(BedsideError, match="no integer-code view"):
        get_grid("IQ4_XS").quantize(torch.zeros(2, 256))


def test_threads_do_not_change_the_bytes_and_dtype_device_are_kept():
    weight = _weights(12, 256, seed=15)
    one = ggml_lib.quantize_rows(weight, "IQ4_XS", threads=1)
    three = ggml_lib.quantize_rows(weight, "IQ4_XS", threads=3)
    np.testing.assert_array_equal(one, three)
    half = torch.from_numpy(weight).to(torch.bfloat16)
    result = get_grid("IQ4_NL").fake_quantize(half)
    assert result.dtype == torch.bfloat16 and result.shape == half.shape


def test_registered_grids_and_fallbacks():
    for name in ("Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS"):
        grid = get_grid(name)
        assert isinstance(grid, LibggmlGrid) and grid.name == name
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert grid.bits_per_weight == 8 * type_size / block and grid.row_multiple == block
    assert get_grid("IQ3_M").name == "IQ3_S" and get_grid("IQ2_M").name == "IQ2_S"  # file type -> default
    assert grid_for_row("IQ4_XS", 576).name == "IQ4_NL" and grid_for_row("IQ2_M", 576).name == "IQ4_NL"
    assert grid_for_row("Q2_K", 576).name == "Q4_0" and grid_for_row("IQ3_XXS", 1536).name == "IQ3_XXS"
    clipped = get_grid("IQ4_NL").fake_quantize(torch.randn(4, 64), clip_ratio=torch.tensor(0.5))
    assert clipped.shape == (4, 64)


@pytest.mark.slow
def test_iq2_s_round_trip_with_an_importance_matrix():
    """IQ2_S (IQ2_M's default type) builds its lattice tables on first use (about 6 s on a loaded host)."""
    weight = np.random.default_rng(16).standard_normal((16, 256)).astype(np.float32)
    error = _round_trip_error("IQ2_S", weight)
    assert 0.1 < error < 0.3, error  # about 0.25: between IQ3_XXS and Q2_K's level
