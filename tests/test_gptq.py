"""GPTQ onto ggml's exact Q4_0 / Q5_0 grid (toolkit.compress.quant.gptq) and its place in AWQ (``gptq=True``).

The reference for the algorithm is the textbook form (Frantar et al. 2023, Algorithm 1 without lazy batches:
the full inverse Hessian updated after every column, Optimal Brain Surgeon's rule); the reference for the
grid is ggml itself: the torch emulation of ``quantize_row_q4_0_ref`` (bit-exact, tests/test_quant_grids.py)
and libggml's matrix-weighted rounding, which must give back exactly the values GPTQ chose.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.gguf_imatrix import read_imatrix
from toolkit.compress.quant.ggml_legacy import Q4_0, Q5_0
from toolkit.compress.quant.ggml_lib import LibggmlGrid
from toolkit.compress.quant.gptq import gptq_round, output_error, round_step, step_bits
from toolkit.core.errors import BedsideError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(out: int = 96, inputs: int = 128, tokens: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Gram matrix of correlated inputs with a few outlier channels (as in real LLMs)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(inputs, inputs, generator=generator) / inputs**0.5 + torch.eye(inputs)
    x = torch.randn(tokens, inputs, generator=generator) @ mix
    x[:, torch.randperm(inputs, generator=generator)[:4]] *= 6
    weight = (0.05 * torch.randn(out, inputs, generator=generator)).to(torch.bfloat16).to(torch.float32)
    return weight, x.T @ x


def _textbook_gptq(
    weight: torch.Tensor, gram: torch.Tensor, tokens: int, bits: int, k: int, order: torch.Tensor
) -> torch.Tensor:
    """Algorithm 1 of the paper without lazy batches, columns in ``order``: after quantizing column i, every
    column not yet quantized moves by ``-(w_i - q_i) / [H^-1]_ii * [H^-1]_i,j`` and row/column i leave the
    inverse (OBS's update). Steps and anchors come from the starting weight (static groups)."""
    half = 1 << (bits - 1)
    h = gram.to(torch.float64) / tokens
    h += 0.01 * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    w = weight.to(torch.float64).clone()
    blocks = weight.reshape(weight.shape[0], -1, 32)
    index = blocks.abs().argmax(dim=-1)
    signed = blocks.gather(2, index[..., None]).squeeze(-1)
    step = round_step(signed / -half, k).to(torch.float64)
    q = torch.zeros_like(w)
    for i in order.tolist():
        d = step[:, i // 32]
        codes = torch.round(w[:, i] / d).clamp(-half, half - 1)
        codes = torch.where(index[:, i // 32] == i % 32, torch.full_like(codes, -half), codes)
        q[:, i] = codes * d
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w -= err[:, None] * hinv[i][None, :]
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return q.to(torch.float32)


def test_step_bits_keep_every_value_exact() -> None:
    """k = min(p_storage, 11) - (b - 1): bfloat16 at Q4_0 -> 5, float16 / float32 -> 8; Q5_0 one fewer."""
    assert step_bits(torch.bfloat16, 4) == 5
    assert step_bits(torch.float16, 4) == 8
    assert step_bits(torch.float32, 4) == 8
    assert step_bits(torch.bfloat16, 5) == 4
    with pytest.raises(BedsideError, match="float64"):
        step_bits(torch.float64, 4)
    steps = torch.tensor([0.0123456, -3.3e-3, 7.7e-5, 1.0, -0.3])
    rounded = round_step(steps, 5)
    assert torch.allclose(rounded, steps, rtol=2**-5)
    codes = torch.arange(-8, 8, dtype=torch.float32)
    products = rounded[:, None] * codes[None, :]
    assert torch.equal(products.to(torch.bfloat16).to(torch.float32), products)
    assert torch.equal(products.to(torch.float16).to(torch.float32), products)


@pytest.mark.parametrize(("grid", "type_name"), [(Q4_0, "Q4_0"), (Q5_0, "Q5_0")])
def test_gptq_values_survive_the_exports_rounding(grid: object, type_name: str) -> None:
    """Stored in bfloat16, converted to float16 and rounded by ggml, plain and matrix-weighted (libggml), the
    GPTQ weight comes back bit for bit."""
    weight, gram = _problem()
    rounded = gptq_round(weight, gram, 2048, type_name, storage_dtype=torch.bfloat16)
    stored = rounded.to(torch.bfloat16).to(torch.float16).to(torch.float32)
    assert torch.equal(stored, rounded)
    assert torch.equal(grid.fake_quantize(stored), rounded)
    matrix = np.asarray(torch.diagonal(gram) / 2048, dtype=np.float32)
    assert torch.equal(LibggmlGrid(type_name, matrix).fake_quantize(stored), rounded)


def test_gptq_equals_the_textbook_algorithm() -> None:
    """In natural and in activation order, with lazy batches of 32 or 128 columns and the Cholesky form, the
    codes are the textbook algorithm's (float rounding may flip a near-tie: at most 0.5 % of weights differ)."""
    weight, gram = _problem(out=48, inputs=96)
    natural = torch.arange(96)
    by_activation = torch.argsort(torch.diagonal(gram), descending=True, stable=True)
    for act_order, order in ((False, natural), (True, by_activation)):
        reference = _textbook_gptq(weight, gram, 2048, 4, 8, order)
        for block in (32, 128):
            ours = gptq_round(weight, gram, 2048, "Q4_0", act_order=act_order, block_columns=block)
            assert float((ours != reference).float().mean()) <= 0.005


def test_gptq_lowers_the_output_error_of_the_exports_rounding() -> None:
    """tr(D H D^T) of GPTQ at most 75 % of round-to-nearest's (ggml's Q4_0 on the same weight) on correlated
    inputs; with white inputs (H = I) there is nothing to compensate and both are within 5 %."""
    weight, gram = _problem()
    rtn = Q4_0.fake_quantize(weight)
    ours = gptq_round(weight, gram, 2048, "Q4_0", storage_dtype=torch.float16)
    assert output_error(weight, ours, gram, 2048) <= 0.75 * output_error(weight, rtn, gram, 2048)
    white = torch.eye(weight.shape[1]) * 2048
    plain = gptq_round(weight, white, 2048, "Q4_0", storage_dtype=torch.float16, damp=0.0)
    assert output_error(weight, plain, white, 2048) == pytest.approx(output_error(weight, rtn, white, 2048), rel=0.05)


def test_gptq_refuses_other_types_and_partial_blocks() -> None:
    weight, gram = _problem()
    with pytest.raises(BedsideError, match="Q4_K"):
        gptq_round(weight, gram, 2048, "Q4_K")
    with pytest.raises(BedsideError, match="whole blocks"):
        gptq_round(weight[:, :100], gram[:100, :100], 2048, "Q4_0")


def _exported(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """``model`` (saved in bfloat16) with every decoder linear as the GGUF export with ``path``'s matrix stores it."""
    from toolkit.compress.quant.export_rounding import export_round, linear_roundings
    from toolkit.compress.quant.rtn import decoder_linears

    matrix = read_imatrix(path)
    names = {name: module.in_features for name, module in decoder_linears(model)}
    roundings = linear_roundings(model, "Q4_0", names, with_imatrix=True)
    for name, module in decoder_linears(model):
        stored = module.weight.data.to(torch.bfloat16)
        module.weight.data = export_round(stored, roundings[name], matrix.values[f"{name}.weight"])
    return model


def test_awq_with_gptq_writes_the_export_codes(tmp_path: Path) -> None:
    """AWQ + GPTQ on a tiny Llama stored in bfloat16: each GPTQ linear is exactly what the export stores
    (libggml with the scaled model's matrix, after the bfloat16 save and the float16 conversion) and the record
    counts no differing block; a linear keeps GPTQ only where its output error on H is below the export's own
    rounding (this random model's layer-0 q, k, v, fed 48x outlier channels, do not); GPTQ's linears are not
    clipped; the held-out KL of the export is below AWQ alone's. (Real weights: tests/test_awq.py's demo test.)"""
    from tests.test_awq import _ids, _kl, _log_probs, _tiny_llama
    from toolkit.compress.quant.awq import awq
    from toolkit.compress.quant.rtn import decoder_linears

    base = _tiny_llama(kv_heads=4)
    held = _ids(8, 64, 7)
    reference = _log_probs(base, held)
    model = copy.deepcopy(base)
    result = awq(
        model, _ids(16, 64, 1), "Q4_0", progress=False, imatrix_path=tmp_path / "gptq.gguf", search_tokens=512,
        gptq=True, gptq_tokens=1024, storage_dtype=torch.bfloat16,
    )  # fmt: skip
    weights = {name: module.weight.data.clone() for name, module in decoder_linears(model)}
    exported = _exported(model, tmp_path / "gptq.gguf")
    kept = 0
    for layer in result.record["layers"]:
        assert layer["clip"] == {}
        for short, entry in layer["gptq"].items():
            name = f"model.layers.{layer['layer']}.{short}"
            assert entry["blocks_differing"] == 0
            use_gptq = entry["error_gptq"] < entry["error_export_rounding"]
            assert entry["rounding"] == ("gptq" if use_gptq else "export")
            stored = weights[name].to(torch.bfloat16).to(torch.float32)
            assert torch.equal(exported.get_submodule(name).weight.data, stored) == use_gptq, name
            kept += not use_gptq
    summary = result.record["gptq"]
    assert summary["linears"] == 14 and summary["blocks_differing_in_export"] == 0
    assert summary["kept_export_rounding"] == kept and 0 < kept < 14
    assert summary["tokens"] == 1024 and summary["storage_dtype"] == "bfloat16"
    assert summary["output_error_ratio"] < 0.5

    plain = copy.deepcopy(base)
    alone = awq(plain, _ids(16, 64, 1), "Q4_0", progress=False, imatrix_path=tmp_path / "awq.gguf", search_tokens=512)
    assert alone.record["gptq"] is None and alone.record["layers"][0]["clip"]
    kl_gptq = _kl(reference, _log_probs(exported, held))
    kl_awq = _kl(reference, _log_probs(_exported(plain, tmp_path / "awq.gguf"), held))
    assert kl_gptq < kl_awq
