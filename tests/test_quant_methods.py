"""Quantization methods against the export's rounding: `imatrix` (llama.cpp's method) and AWQ searched exactly.

Tiny random Llamas (hidden 64, or 256 where an IQ type needs whole 256-blocks); one heavy demo test exports a
GGUF and checks the file holds exactly what `fake_quantize_model(..., imatrix=...)` predicts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.compress.quant.awq import awq
from toolkit.compress.quant.export_rounding import export_round, linear_roundings
from toolkit.compress.quant.grids import grid_for_row
from toolkit.compress.quant.imatrix import gather_imatrix
from toolkit.compress.quant.rtn import decoder_linears, fake_quantize_model
from toolkit.core.errors import BedsideError

ggml_lib = pytest.importorskip("toolkit.compress.quant.ggml_lib")
try:
    ggml_lib.library_path()
except BedsideError as error:  # pragma: no cover - set-up without llama-cpp-python
    pytest.skip(str(error), allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_llama(
    hidden: int = 64, intermediate: int = 128, layers: int = 2, kv_heads: int = 2
) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        initializer_range=0.1,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        outliers = torch.randperm(hidden)[:4]
        model.model.embed_tokens.weight[:, outliers] *= 8
        for layer in model.model.layers:
            layer.input_layernorm.weight[outliers] *= 6
    return model


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _definition(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """llama-imatrix's quantity by its definition: sum over tokens of x^2 per input column / tokens."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        linear.register_forward_hook(
            lambda _m, args, _o, name=name: seen.setdefault(name, []).append(
                args[0].reshape(-1, args[0].shape[-1])
            )
        )
        for name, linear in decoder_linears(model)
    ]
    with torch.no_grad():
        for sequence in ids:  # one sequence at a time: batching must not change the result
            model(input_ids=sequence[None])
    for handle in handles:
        handle.remove()
    out = {}
    for name, parts in seen.items():
        x = torch.cat(parts).double()
        out[f"{name}.weight"] = (x.pow(2).sum(0) / x.shape[0]).numpy()
    return out


def test_gathered_matrix_equals_the_definition_for_every_decoder_linear() -> None:
    model = _tiny_llama()
    ids = _ids(6, 24, 1)
    stats = gather_imatrix(model, ids, batch_size=4)
    expected = _definition(model, ids)
    assert set(stats.in_sum2) == set(expected) and len(expected) == 2 * 7  # q k v o gate up down, 2 layers
    assert set(stats.counts.values()) == {6 * 24}
    for name, mean in stats.means().items():
        np.testing.assert_allclose(mean, expected[name], rtol=2e-5, atol=1e-9)
    assert stats.record()["tokens"] == 144 and stats.record()["tensors"] == 14


def test_written_matrix_reads_back_as_the_means(tmp_path: Path) -> None:
    from exporters.gguf_imatrix import read_imatrix

    model = _tiny_llama()
    ids = _ids(4, 16, 2)
    stats = gather_imatrix(model, ids)
    matrix = read_imatrix(stats.write(tmp_path / "imatrix.gguf"))
    assert matrix.chunk_count == 4 and matrix.chunk_size == 16
    for name, mean in stats.means().items():
        np.testing.assert_allclose(matrix.values[name], mean, rtol=1e-6)


def test_export_round_is_libggml_with_the_matrix_on_f16_weights() -> None:
    """Q4_0 with a matrix: the per-tensor type table (ffn_down of the first eighth -> Q4_1), f16 first."""
    model = _tiny_llama(hidden=64, intermediate=128, layers=8)
    names = {name: linear.in_features for name, linear in decoder_linears(model)}
    roundings = linear_roundings(model, "Q4_0", names, with_imatrix=True)
    assert roundings["model.layers.0.mlp.down_proj"].type_name == "Q4_1"  # llama.cpp: imatrix + first eighth
    assert roundings["model.layers.1.mlp.down_proj"].type_name == "Q4_0"
    plain = linear_roundings(model, "Q4_0", names, with_imatrix=False)
    assert {rounding.type_name for rounding in plain.values()} == {"Q4_0"}
    weight = model.model.layers[1].self_attn.q_proj.weight.data
    matrix = np.random.default_rng(0).uniform(0.01, 5.0, 64).astype(np.float32)
    got = export_round(weight, roundings["model.layers.1.self_attn.q_proj"], matrix)
    source = weight.to(torch.float16).float().numpy()
    np.testing.assert_array_equal(got.numpy(), ggml_lib.quantize_dequantize(source, "Q4_0", matrix))
    assert not np.array_equal(got.numpy(), ggml_lib.quantize_dequantize(source, "Q4_0"))  # the matrix counts


def test_awq_with_a_matrix_reranks_on_exact_rounding_and_never_loses_to_rtn(tmp_path: Path) -> None:
    model = _tiny_llama(kv_heads=4)
    result = awq(
        model,
        _ids(8, 32, 3),
        "Q4_0",
        progress=False,
        n_grid=4,
        search_tokens=128,
        imatrix_path=tmp_path / "m.gguf",
    )
    record = result.record
    assert record["search_rounding"] == "rerank" and record["rerank"] == 3
    assert record["export_rounding"].startswith("libggml with the importance matrix")
    for layer in record["layers"]:
        for group in layer["groups"]:
            assert group["rounding"] == "rerank" and 0.0 in group["reranked_alphas"]
            assert group["loss"] <= group["loss_rtn"]  # alpha 0 (RTN) is among the exact finalists
        assert all(entry["rounding"] == "rerank" for entry in layer["clip"].values())
    # Without a matrix the torch grid is the export's rounding: the search is exact as it is.
    plain = awq(_tiny_llama(kv_heads=4), _ids(8, 32, 3), "Q4_0", progress=False, n_grid=2, search_tokens=64)
    assert plain.record["search_rounding"] == "exact"
    assert plain.record["export_rounding"].startswith("libggml (llama.cpp's reference")


def test_awq_k_quant_stand_in_is_reranked_or_searched_exactly() -> None:
    """Q4_K on 256-wide rows is searched on its stand-in (asym4_g32): re-ranked on Q4_K itself by default,
    every candidate on Q4_K with search_rounding="exact"."""
    base = _tiny_llama(hidden=256, intermediate=256, layers=1, kv_heads=4)
    ids = _ids(4, 32, 4)
    reranked = awq(copy.deepcopy(base), ids, "Q4_K_M", progress=False, n_grid=2, search_tokens=64).record
    assert reranked["search_rounding"] == "rerank" and "asym4_g32" in reranked["search_grids"]
    exact = awq(
        copy.deepcopy(base), ids, "Q4_K_M", progress=False, n_grid=2, search_tokens=64, search_rounding="exact"
    ).record
    assert exact["search_rounding"] == "exact"
    with pytest.raises(BedsideError, match="search_rounding"):
        awq(copy.deepcopy(base), ids, "Q4_0", progress=False, search_rounding="bogus")


def test_awq_searches_a_type_that_needs_a_matrix(tmp_path: Path) -> None:
    """IQ3_XXS (llama.cpp writes it only with a matrix) on 256-wide rows: searched exactly, with the matrix
    of each candidate's scaled model; the quantized model is what libggml writes with the matrix on disk."""
    from exporters.gguf_imatrix import read_imatrix

    model = _tiny_llama(hidden=256, intermediate=256, layers=1, kv_heads=4)
    path = tmp_path / "imatrix.gguf"
    result = awq(
        model, _ids(4, 32, 5), "IQ3_XXS", progress=False, n_grid=2, search_tokens=64, imatrix_path=path
    )
    record = result.record
    assert record["search_rounding"] == "exact" and "IQ3_XXS" in record["export_types"]
    matrix = read_imatrix(path).values
    assert len(matrix) == 7
    quantized = fake_quantize_model(copy.deepcopy(model), "IQ3_XXS", imatrix=matrix)
    assert all(torch.isfinite(linear.weight).all() for _, linear in decoder_linears(quantized))
    with pytest.raises(BedsideError, match="importance matrix"):
        fake_quantize_model(copy.deepcopy(model), "IQ3_XXS")  # no matrix: llama.cpp refuses too


@pytest.mark.parametrize("with_matrix", [False, True])
def test_fake_quantization_rewrites_the_weights_in_place(with_matrix: bool) -> None:
    """`fake_quantize_model` writes each linear's rounding into the tensor it had (no second copy of the model
    stays allocated: the pipeline's last perplexity check was its process peak, docs/BENCHMARKS.md), and the
    values are the export's rounding of the original weight (libggml + matrix), or the grid's without a matrix."""
    model = _tiny_llama()
    linears = decoder_linears(model)
    originals = {name: linear.weight.detach().clone() for name, linear in linears}
    pointers = {name: linear.weight.data_ptr() for name, linear in linears}
    widths = {name: linear.in_features for name, linear in linears}
    rng = np.random.default_rng(3)
    matrix = {f"{name}.weight": rng.random(width, dtype=np.float32) + 0.1 for name, width in widths.items()}
    fake_quantize_model(model, "Q4_0", imatrix=matrix if with_matrix else None)
    roundings = linear_roundings(model, "Q4_0", widths, True)
    for name, linear in decoder_linears(model):
        assert linear.weight.data_ptr() == pointers[name]
        if with_matrix:
            expected = export_round(originals[name], roundings[name], matrix[f"{name}.weight"])
        else:
            expected = grid_for_row("Q4_0", widths[name]).fake_quantize(originals[name])
        assert torch.equal(linear.weight.detach(), expected), name
        assert not torch.equal(linear.weight.detach(), originals[name])


# ---------------------------------------------------------------------------------------------
# The pipeline's `imatrix` method
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer) -> tuple[Path, Path]:
    """(tiny Llama checkpoint with a byte-level BPE tokenizer, a calibration text file)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    words = [
        "the",
        "heart",
        "size",
        "is",
        "normal",
        "lungs",
        "are",
        "clear",
        "no",
        "pleural",
        "effusion",
        "mild",
        "opacity",
        "stable",
    ]
    root = tmp_path_factory.mktemp("tiny-imatrix")
    folder = root / "model"
    tokenizer = bpe_tokenizer([" ".join(words), "user assistant"], "{{ messages[0]['content'] }}")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = np.random.default_rng(0)
    corpus = root / "reports.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words, size=30)) for _ in range(120)), encoding="utf-8")
    return folder, corpus


def test_imatrix_method_writes_the_matrix_of_the_unscaled_model_for_the_export(
    tiny_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from exporters.gguf_imatrix import read_imatrix
    from toolkit.cli.export import resolve_source
    from toolkit.compress.pipeline import _prepare_data, compress
    from toolkit.compress.record import CompressOptions
    from toolkit.compress.stages import load_tokenizer
    from toolkit.core.hashing import weights_sha256

    folder, corpus = tiny_checkpoint
    options = CompressOptions(
        quant="Q4_0",
        quant_method="imatrix",
        calib=str(corpus),
        calib_sequences=4,
        seq_len=32,
        eval_sequences=2,
    )
    result = compress(folder, tmp_path / "out", options, progress=False)
    record = result.record
    assert record["quant"]["method"] == "imatrix" and record["awq"] is None
    assert record["quant"]["imatrix"]["tokens"] == 4 * 32
    assert result.imatrix is not None and result.imatrix.is_file()
    assert record["checkpoint"]["sha256"] == weights_sha256(folder)  # no scales: the weights are the source's
    # The matrix is the definition on the same calibration blocks, on the unscaled model.
    ids = _prepare_data(load_tokenizer(folder), options).calib_ids
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    expected = _definition(model, ids)
    matrix = read_imatrix(result.imatrix)
    assert set(matrix.values) == set(expected)
    for name, values in expected.items():
        np.testing.assert_allclose(matrix.values[name], values, rtol=2e-5, atol=1e-9)
    # The export of this folder passes that matrix to llama.cpp's quantizer.
    assert resolve_source(str(tmp_path / "out"), "gguf", None).imatrix == tmp_path / "out" / "imatrix.gguf"


@pytest.mark.parametrize("method", ["imatrix", "awq-gptq"])
def test_gguf_only_methods_are_refused_for_onnx_schemes(method: str) -> None:
    from toolkit.compress.pipeline import validate_options
    from toolkit.compress.record import CompressOptions

    with pytest.raises(BedsideError, match=f"--quant-method {method} applies to GGUF schemes only, not 'int4_b32'"):
        validate_options(CompressOptions(quant="int4_b32", quant_method=method))
    validate_options(CompressOptions(quant="Q4_K_M", quant_method=method))


def test_auto_method_is_awq_gptq_for_gguf_and_awq_otherwise() -> None:
    from toolkit.compress.quant.methods import resolve_quant_method
    from toolkit.compress.record import CompressOptions
    from toolkit.deploy.pipeline import DeployOptions

    assert CompressOptions().quant_method == "auto" and DeployOptions(profile="jetson4gb").quant_method == "auto"
    assert resolve_quant_method("auto", "Q4_0") == "awq-gptq"
    assert resolve_quant_method("auto", "Q4_K_M") == "awq-gptq"
    assert resolve_quant_method("auto", "int4_b32") == "awq"
    assert resolve_quant_method("auto", None) == "awq"
    assert resolve_quant_method("rtn", "Q4_0") == "rtn"


@pytest.mark.demo
@pytest.mark.heavy
def test_demo_gguf_with_matrix_holds_exactly_the_predicted_weights(
    demo_model_dir: Path, demo_gguf_file, tmp_path: Path
) -> None:
    """Demo model, matrix gathered on 2 x 64 tokens, Q4_0 quantized with it from the session's F16 conversion (the
    export's own path: convert to F16, then llama_model_quantize): the GGUF's attn_v / ffn_gate / ffn_down (Q4_1 in
    layer 0: llama.cpp's first eighth with a matrix) dequantize to exactly `fake_quantize_model(..., imatrix=...)`
    (libggml + f16 + type table)."""
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoModelForCausalLM

    from exporters.gguf_exporter import quantize
    from exporters.gguf_imatrix import read_imatrix

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    stats = gather_imatrix(model, _ids(2, 64, 6) + 100)
    path = stats.write(tmp_path / "imatrix.gguf")
    target = tmp_path / "model-Q4_0.gguf"
    report = quantize(demo_gguf_file("F16"), target, "Q4_0", imatrix=path, threads=1)
    assert report["imatrix_entries"] == len(stats.in_sum2)
    predicted = fake_quantize_model(model, "Q4_0", imatrix=read_imatrix(path).values)
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(str(target)).tensors}
    for layer, hf, name in (
        (0, "self_attn.v_proj", "attn_v"),  # (attn_q / attn_k rows are permuted by the converter)
        (3, "mlp.gate_proj", "ffn_gate"),
        (0, "mlp.down_proj", "ffn_down"),
        (5, "mlp.down_proj", "ffn_down"),
    ):
        tensor = tensors[f"blk.{layer}.{name}.weight"]
        stored = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
        want = predicted.model.layers[layer].get_submodule(hf).weight.detach().numpy()
        assert stored.shape == want.shape
        np.testing.assert_array_equal(stored.astype(np.float32), want, err_msg=f"blk.{layer}.{name}")
