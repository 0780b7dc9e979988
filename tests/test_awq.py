"""AWQ (toolkit.compress.quant.awq) and the RTN baseline (toolkit.compress.quant.rtn).

Tiny random Llama models with outlier input channels (a few norm/embedding channels scaled up, as
in real LLMs) so that activation-aware scaling matters; Q4_0 is the grid (block 32, symmetric: the
weights of a random model do not line up with it). The demo-model test skips when the checkpoint or
the radiology corpus is absent.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import torch

from toolkit.compress.quant.awq import (
    BF16_NOISE_SHARE,
    CLIP_RATIOS,
    AwqSearch,
    _alpha_order,
    _capture_layer0_inputs,
    _first_output,
    _fold,
    _LayerStats,
    _scales,
    _search_clip,
    _search_scale,
    awq,
    group_grams,
    resolve_propagation,
    resolve_search_precision,
    search_grid_for,
    sub_grams,
)
from toolkit.compress.quant.export_rounding import LinearRounding
from toolkit.compress.quant.grids import get_grid
from toolkit.compress.quant.rtn import decoder_linears, fake_quantize_model, rtn
from toolkit.core.errors import BedsideError
from toolkit.model.architectures import ScaleGroup

SCHEME = "Q4_0"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_llama(kv_heads: int = 4, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        initializer_range=0.1,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        outliers = torch.randperm(64)[:4]
        model.model.embed_tokens.weight[:, outliers] *= 8
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(1 + 0.2 * torch.randn(64))
            layer.input_layernorm.weight[outliers] *= 6
            layer.post_attention_layernorm.weight.copy_(1 + 0.2 * torch.randn(64))
            layer.post_attention_layernorm.weight[torch.randperm(64)[:4]] *= 6
    return model


def _log_probs(model: torch.nn.Module, ids: torch.Tensor, batch: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                torch.log_softmax(model(ids[i : i + batch]).logits.float(), -1)
                for i in range(0, len(ids), batch)
            ]
        )


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over tokens of KL(reference || other), in nats."""
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def _ids(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_result(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[torch.nn.Module, torch.nn.Module, object, Path]:
    """(float model, AWQ'd model, AwqResult, imatrix path) for a 2-layer MHA Llama."""
    base = _tiny_llama(kv_heads=4)
    model = copy.deepcopy(base)
    path = tmp_path_factory.mktemp("awq") / "awq.imatrix.gguf"
    result = awq(model, _ids(16, 64, 1), SCHEME, progress=False, imatrix_path=path, search_tokens=512)
    return base, model, result, path


def test_folding_alone_keeps_the_float_model() -> None:
    """Folding any scales (norm -> qkv, v -> o, norm -> gate/up, up -> down) changes logits < 1e-4 relative."""
    model = _tiny_llama(kv_heads=4)
    ids = _ids(4, 32, 2)
    with torch.no_grad():
        before = model(ids).logits
    generator = torch.Generator().manual_seed(3)
    for layer in model.model.layers:
        for group in (
            ScaleGroup(
                "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"
            ),
            ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
            ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
        ):
            width = layer.get_submodule(group.linears[0]).in_features
            mean_abs = torch.rand(width, generator=generator) * 10 + 0.01
            _fold(layer, group, _scales(mean_abs, 0.7), norm_offset=0.0)
    with torch.no_grad():
        after = model(ids).logits
    relative = float((after - before).abs().max() / before.abs().max())
    assert relative < 1e-4


def test_folding_gemma_offset_norm() -> None:
    """Gemma's (1 + w) norm: folding divides (1 + w) by s, so the block's input to q is x * (1+w)/s."""
    norm = torch.nn.Module()
    norm.weight = torch.nn.Parameter(torch.randn(64) * 0.1)
    layer = torch.nn.Module()
    layer.norm = norm
    layer.q = torch.nn.Linear(64, 32, bias=False)
    s = _scales(torch.rand(64) + 0.1, 0.5)
    x = torch.randn(5, 64)
    with torch.no_grad():
        before = layer.q(x * (1 + norm.weight))
        _fold(layer, ScaleGroup("norm", ("q",), "q"), s, norm_offset=1.0)
        after = layer.q(x * (1 + norm.weight))
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)


def test_awq_beats_rtn_on_held_out_tokens(tiny_result: tuple) -> None:
    base, model, _result, _path = tiny_result
    held = _ids(8, 64, 99)
    reference = _log_probs(base, held)
    baseline = rtn(copy.deepcopy(base), SCHEME).model
    quantized = fake_quantize_model(copy.deepcopy(model), SCHEME)
    kl_rtn = _kl(reference, _log_probs(baseline, held))
    kl_awq = _kl(reference, _log_probs(quantized, held))
    assert kl_awq < 0.8 * kl_rtn, (kl_awq, kl_rtn)


def test_record_has_alpha_and_loss_per_group_per_layer(tiny_result: tuple) -> None:
    _base, model, result, _path = tiny_result
    record = result.record
    assert record["method"] == "awq" and record["scheme"] == SCHEME and record["search_grid"] == "Q4_0"
    assert len(record["layers"]) == len(model.model.layers)
    for layer in record["layers"]:
        assert len(layer["groups"]) == 4  # MHA: v -> o applies
        for group in layer["groups"]:
            assert 0.0 <= group["alpha"] <= 1.0
        assert "self_attn.q_proj" not in layer["clip"] and "mlp.down_proj" in layer["clip"]
    # The search found scales better than plain rounding somewhere (alpha 0 is RTN, so loss <= loss_rtn
    # per group holds by construction; a search that never moves off alpha 0 would fail here).
    groups = [group for layer in record["layers"] for group in layer["groups"]]
    improved = [g for g in groups if g["alpha"] > 0 and g["loss"] < 0.99 * g["loss_rtn"]]
    assert len(improved) >= len(groups) // 2, [(g["alpha"], g["loss"], g["loss_rtn"]) for g in groups]
    assert 0.5 <= record["clip_summary"]["mean_ratio"] <= 1.0
    assert record["seconds"] > 0
    json.dumps(record)  # goes into compression.json as is


def test_imatrix_written_and_readable(tiny_result: tuple) -> None:
    from exporters.gguf_imatrix import read_imatrix

    _base, model, _result, path = tiny_result
    matrix = read_imatrix(path)
    names = {
        name.removesuffix(".weight") for name, _ in [(n + ".weight", m) for n, m in decoder_linears(model)]
    }
    assert {name.removesuffix(".weight") for name in matrix.values} == names
    assert matrix.values["model.layers.0.mlp.down_proj.weight"].shape == (128,)
    assert matrix.chunk_count == 16 and matrix.chunk_size == 64
    # Importance = mean squared input of the *scaled* model (x / s). Layer 0's q_proj input is exact
    # (the embedding, then the folded norm; clipping never touches q), so check it tightly.
    ids = _ids(16, 64, 1)
    seen: list[torch.Tensor] = []
    handle = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        model(ids)
    handle.remove()
    expected = torch.cat(seen).pow(2).mean(0)
    got = torch.from_numpy(matrix.values["model.layers.0.self_attn.q_proj.weight"])
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-7)


def test_gqa_skips_v_to_o() -> None:
    model = _tiny_llama(kv_heads=2)
    result = awq(model, _ids(8, 32, 4), SCHEME, progress=False, n_grid=4, clip=False, search_tokens=128)
    for layer in result.record["layers"]:
        by_prev = {group["prev_op"]: group for group in layer["groups"]}
        assert "skipped" in by_prev["self_attn.v_proj"]
        assert "alpha" in by_prev["input_layernorm"] and "alpha" in by_prev["mlp.up_proj"]


def test_clip_search_gram_form_equals_the_product_over_tokens() -> None:
    """``d^T H d`` with ``H = X^T X`` per group is ``sum_t (x . d)^2`` (llm-awq's direct form): same errors
    within float rounding, same ratio chosen per (row, group); a partial last group is zero-padded; Grams of
    blocks of 32 accumulated over two batches give the same search at group size 16 (``sub_grams``)."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 80, generator=generator) * 0.05  # 80 = 2 groups of 32 + a padded 16
    inputs = torch.randn(96, 80, generator=generator) * torch.rand(80, generator=generator) * 3
    grid = get_grid("asym4_g32")
    ratios = (1.0, 0.9, 0.8, 0.7)
    ratio, err = _search_clip(
        weight, group_grams(inputs, 32), lambda w, r: grid.fake_quantize(w, clip_ratio=r), 32, ratios
    )
    x = torch.nn.functional.pad(inputs, (0, 16)).double().reshape(96, 3, 32)
    direct = []
    for candidate in ratios:
        full = torch.full((40, 3), candidate)
        diff = torch.nn.functional.pad(weight - grid.fake_quantize(weight, clip_ratio=full), (0, 16)).double()
        direct.append(torch.einsum("tgi,ogi->tog", x, diff.reshape(40, 3, 32)).pow(2).sum(0))  # [out, G]
    stacked = torch.stack(direct)
    torch.testing.assert_close(err.double(), stacked.min(0).values, rtol=1e-5, atol=1e-12)
    assert torch.equal(ratio, torch.tensor(ratios)[stacked.argmin(0)])
    assert ratio.unique().numel() > 1  # the rows do choose differently: the comparison is not vacuous

    grid16 = get_grid("sym6_g16")
    quantize16 = lambda w, r: grid16.fake_quantize(w, clip_ratio=r)  # noqa: E731
    batched = group_grams(inputs[:50], 32) + group_grams(inputs[50:], 32)
    from_blocks = _search_clip(weight, sub_grams(batched, 16), quantize16, 16, ratios)
    direct16 = _search_clip(weight, group_grams(inputs, 16), quantize16, 16, ratios)
    assert torch.equal(from_blocks[0], direct16[0])
    torch.testing.assert_close(from_blocks[1], direct16[1], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("grid_name", ["Q4_0", "Q5_0", "Q8_0", "asym4_g32", "Q5_1", "sym6_g16"])
def test_clip_search_below_the_dense_ratios_follows_the_improving_groups(grid_name: str) -> None:
    """Below ``dense_down_to`` only the groups still improving try more ratios, quantized as gathered blocks: the
    grids the search emulates round each group on its own (gathered blocks equal the full weight's), a group
    whose best over every ratio is at or above ``dense_down_to`` keeps that ratio and error, and no group does
    better than the full search."""
    grid = get_grid(grid_name)
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(48, 128, generator=generator) * 0.05
    scale = 0.2 + torch.rand(128, generator=generator)
    weight[::3, ::16] *= 12  # large weights on inputs that are nearly silent: deep clips pay off there
    scale[::16] = 0.01
    inputs = torch.randn(256, 128, generator=generator) * scale
    size = grid.group_size
    ratio = torch.rand(48 * 128 // size, 1, generator=generator) * 0.5 + 0.5
    blocks = weight.reshape(-1, size)
    torch.testing.assert_close(
        grid.fake_quantize(blocks, ratio).reshape(48, 128), grid.fake_quantize(weight, ratio.reshape(48, -1)),
        rtol=0, atol=0,
    )  # fmt: skip
    quantize = lambda w, r: grid.fake_quantize(w, clip_ratio=r)  # noqa: E731
    grams = group_grams(inputs, size)
    full_ratio, full_err = _search_clip(weight, grams, quantize, size, CLIP_RATIOS)
    ratio, err = _search_clip(weight, grams, quantize, size, CLIP_RATIOS, dense_down_to=0.7)
    kept = full_ratio >= 0.7
    assert torch.equal(ratio[kept], full_ratio[kept]) and torch.equal(err[kept], full_err[kept])
    assert bool((err >= full_err * (1 - 1e-5)).all())  # (gathered blocks: the same products up to rounding)
    assert bool((ratio < 0.7).any()) and bool(((ratio == full_ratio) & (full_ratio < 0.7)).any())


def test_bfloat16_propagation_keeps_statistics_and_says_so(tmp_path: Path) -> None:
    """The non-search sequences pass in bfloat16: the importance matrix (every token's x^2) stays within 2 % of
    the float32 pass's, the record names the precision, and an unknown name is refused."""
    from exporters.gguf_imatrix import read_imatrix

    ids = _ids(16, 64, 1)
    matrices = {}
    for precision in ("float32", "bfloat16"):
        path = tmp_path / f"{precision}.imatrix.gguf"
        result = awq(
            _tiny_llama(), ids, SCHEME, progress=False, n_grid=2, clip=False, search_tokens=128,
            imatrix_path=path, propagation=precision,
        )  # fmt: skip
        assert result.record["propagation"] == precision
        matrices[precision] = read_imatrix(path).values
    last = "model.layers.1.mlp.down_proj.weight"  # the second layer's inputs went through the first in bf16
    for name, values in matrices["float32"].items():
        torch.testing.assert_close(
            torch.from_numpy(matrices["bfloat16"][name]), torch.from_numpy(values), rtol=2e-2, atol=1e-6
        )
    assert not torch.equal(torch.from_numpy(matrices["bfloat16"][last]), torch.from_numpy(matrices["float32"][last]))
    with pytest.raises(BedsideError, match="propagation must be one of auto, float32, bfloat16"):
        resolve_propagation("half", torch.device("cpu"))
    assert resolve_propagation("auto", torch.device("cuda")) == "float32"


def _searched(alphas: list[float], loss: dict[float, float], how: str) -> dict[float, float]:
    found: dict[float, float] = {}
    for alpha in _alpha_order(alphas, how, found):
        found[alpha] = loss[alpha]
    return found


@pytest.mark.parametrize("n_grid", [10, 9, 20])
def test_refined_alpha_search_finds_the_grids_minimum_of_a_unimodal_loss(n_grid: int) -> None:
    """refine evaluates every second alpha and the best one's neighbours: the grid's minimum wherever the
    loss is unimodal, in n_grid / 2 + 3 evaluations."""
    alphas = [i / n_grid for i in range(n_grid + 1)]
    for centre in alphas:
        loss = {alpha: (alpha - centre) ** 2 + 0.01 * alpha for alpha in alphas}
        found = _searched(alphas, loss, "refine")
        assert min(found, key=found.get) == min(loss, key=loss.get), centre
        assert len(found) <= n_grid // 2 + 3 + n_grid % 2 and {alphas[0], alphas[-1]} <= set(found)
    assert _searched(alphas, loss, "grid") == loss
    # not unimodal: a minimum between two coarse points, both worse than a far coarse point, is missed
    bumpy = {alpha: 1.0 for alpha in alphas} | {alphas[3]: 0.0, alphas[8]: 0.5}
    found = _searched(alphas, bumpy, "refine")
    assert min(found, key=found.get) == alphas[8] and alphas[3] not in found


@pytest.mark.parametrize("n_grid", [10, 9, 20])
def test_climbing_alpha_search_finds_the_grids_minimum_of_a_unimodal_loss(n_grid: int) -> None:
    """climb evaluates every third alpha and the last, then the best one's neighbours until the best is a local
    minimum: the grid's minimum of a unimodal loss in at most 4 evaluations past the coarse ones (the last gap is
    up to 4), fewer than refine in total; where the best moves to a neighbour it goes on climbing (refine would
    stop after one step)."""
    alphas = [i / n_grid for i in range(n_grid + 1)]
    coarse = len(range(0, n_grid - 1, 3)) + 1
    for centre in alphas:
        loss = {alpha: (alpha - centre) ** 2 + 0.01 * alpha for alpha in alphas}
        found = _searched(alphas, loss, "climb")
        assert min(found, key=found.get) == min(loss, key=loss.get), centre
        assert len(found) <= coarse + 4 and {alphas[0], alphas[-1]} <= set(found)
    total = {how: 0 for how in ("climb", "refine")}
    for centre in alphas:
        loss = {alpha: (alpha - centre) ** 2 for alpha in alphas}
        for how in total:
            total[how] += len(_searched(alphas, loss, how))
    assert total["climb"] < total["refine"], total
    # a minimum two steps from the best coarse point (coarse 0, 3, 6 ...: the minimum at alpha index 1)
    slope = {alpha: abs(index - 1) + 0.1 * index for index, alpha in enumerate(alphas)}
    found = _searched(alphas, slope, "climb")
    assert min(found, key=found.get) == alphas[1] and alphas[2] in found


def test_alpha_search_is_recorded_and_a_bad_name_refused() -> None:
    ids = _ids(4, 32, 3)
    counts = {}
    for how in ("climb", "refine", "grid"):
        record = awq(
            _tiny_llama(layers=1), ids, SCHEME, progress=False, alpha_search=how, clip=False,
            search_precision="float32",
        ).record  # fmt: skip
        assert record["alpha_search"] == how
        counts[how] = record["alphas_evaluated"]
    assert counts["refine"] == 4 * 8 and counts["grid"] == 4 * 11  # one MHA layer: four groups
    assert 4 * 4 < counts["climb"] < counts["refine"]  # at least the coarse 0, 0.3, 0.6, 1 per group
    with pytest.raises(BedsideError, match="alpha_search must be one of climb, refine, grid, got 'golden'"):
        AwqSearch(_tiny_llama(layers=1), ids, SCHEME, alpha_search="golden")


class _NoisyBlock(torch.nn.Module):
    """``a(x) + b(x)``: ``a`` is the searched linear, ``b`` a float linear ``big`` times larger, whose bfloat16
    rounding then swamps the difference ``a``'s quantization makes."""

    def __init__(self, big: float) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.a = torch.nn.Linear(64, 64, bias=False)
        self.b = torch.nn.Linear(64, 64, bias=False)
        self.a.weight.data = torch.randn(64, 64, generator=generator) * 0.1
        self.b.weight.data = torch.randn(64, 64, generator=generator) * 0.1 * big

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _noisy_search(big: float, precision: str, scheme: str = SCHEME) -> tuple[object, torch.nn.Module]:
    layer = torch.nn.Module()
    layer.block = _NoisyBlock(big)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(512, 64, generator=generator) * (1 + 4 * torch.rand(64, generator=generator))
    calls = [((x,), {}, layer.block(x).detach())]
    group = ScaleGroup(prev_op="norm", linears=("block.a",), inspect="block")
    alphas = [i / 10 for i in range(11)]
    choice = _search_scale(
        layer, group, x.abs().mean(0), x.pow(2).mean(0), calls, [LinearRounding(scheme, False, False)], alphas,
        "exact", 3, "climb", precision,
    )  # fmt: skip
    return choice, layer


def test_auto_search_precision_takes_bfloat16_only_where_its_own_error_is_small() -> None:
    """auto measures bfloat16's error on the group's output (float weights) against the RTN loss: bfloat16 at
    most 1 % (and then a loss within 1 % of float32's), float32 above; explicit precisions and 8-bit grids are not
    measured; the weights are restored after the search."""
    quiet, layer = _noisy_search(0.0, "auto")
    assert quiet.precision == "bfloat16" and quiet.bf16_noise <= BF16_NOISE_SHARE
    assert layer.block.b.weight.abs().sum() == 0 and torch.equal(layer.block.a.weight, _NoisyBlock(0.0).a.weight)
    reference, _ = _noisy_search(0.0, "float32")
    assert reference.precision == "float32" and reference.bf16_noise is None
    assert quiet.alpha > 0 and reference.alpha > 0  # (a near tie: 0.2 and 0.3 are 0.02 % apart here)
    assert quiet.loss == pytest.approx(reference.loss, rel=0.01)
    noisy, _ = _noisy_search(300.0, "auto")
    assert noisy.precision == "float32" and noisy.bf16_noise > BF16_NOISE_SHARE
    forced, _ = _noisy_search(300.0, "bfloat16")
    assert forced.precision == "bfloat16" and forced.bf16_noise is None
    assert forced.loss > 2 * noisy.loss  # the bfloat16 loss is mostly bfloat16's own error
    eight_bit, _ = _noisy_search(0.0, "auto", "Q8_0")
    assert eight_bit.precision == "float32" and eight_bit.bf16_noise is None
    with pytest.raises(BedsideError, match="search_precision must be one of auto, float32, bfloat16, got 'fp8'"):
        resolve_search_precision("fp8", torch.device("cpu"))
    assert resolve_search_precision("auto", torch.device("cuda")) == "float32"
    assert resolve_search_precision("bfloat16", torch.device("cuda")) == "bfloat16"


def test_search_precision_is_recorded_per_group() -> None:
    record = awq(
        _tiny_llama(layers=1), _ids(4, 32, 3), SCHEME, progress=False, clip=False, search_precision="bfloat16"
    ).record
    assert record["search_precision"] == "bfloat16" and record["search_precision_groups"] == {"bfloat16": 4}
    assert all(group["precision"] == "bfloat16" for group in record["layers"][0]["groups"])


def test_statistics_under_bfloat16_autocast_stay_float32() -> None:
    """The hooks gather outside autocast: the block Grams and sums of a batch that passed in bfloat16 are those
    of its float32 inputs (autocast would have rounded the Gram products to bfloat16)."""
    layer = torch.nn.Module()
    layer.proj = torch.nn.Linear(64, 16)
    stats = _LayerStats(layer, [], set(), extra=["proj"], block=32, block_for={"proj"})
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer.proj(x)
    stats.remove()
    assert torch.equal(stats.block_grams["proj"], group_grams(x, 32))
    torch.testing.assert_close(stats.sq_sum["proj"], x.double().pow(2).sum(0), rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.abs_sum["proj"], x.double().abs().sum(0), rtol=1e-6, atol=0)


def test_layer0_inputs_leave_causal_masking_to_sdpa() -> None:
    """An SDPA model's captured kwargs carry no materialised mask (the kernel masks causally itself), and the
    layer's output equals the output with the explicit causal mask; an eager model keeps its mask."""
    ids = _ids(2, 24, 4)
    model = _tiny_llama(layers=1)
    model.config._attn_implementation = "sdpa"
    (hidden, kwargs), = _capture_layer0_inputs(model, model.model.layers, [ids])
    assert kwargs.get("attention_mask") is None
    mask = torch.ones(24, 24, dtype=torch.bool).tril().expand(2, 1, 24, 24)
    with torch.no_grad():
        causal = _first_output(model.model.layers[0](hidden, **kwargs))
        masked = _first_output(model.model.layers[0](hidden, **{**kwargs, "attention_mask": mask}))
    torch.testing.assert_close(causal, masked, rtol=1e-5, atol=1e-6)
    eager = _tiny_llama(layers=1)
    (_hidden, eager_kwargs), = _capture_layer0_inputs(eager, eager.model.layers, [ids])
    assert eager_kwargs["attention_mask"] is not None


def test_kquant_search_uses_stand_in_grid() -> None:
    assert search_grid_for("Q4_K_M").name == "asym4_g32"
    assert search_grid_for("Q4_K_M", 512).name == "asym4_g32"
    assert search_grid_for("Q4_0").name == "Q4_0"
    assert search_grid_for("Q6_K").name == "sym6_g16"


def test_q6k_stand_in_tracks_q6k_error() -> None:
    """sym6_g16 is Q6_K's first pass: its error on a weight is within 20-25 % of Q6_K's, at a fraction of the
    cost; an alpha search ranks candidates on it (Q6_K's own emulation took 37 s per 2048 x 5632 matrix)."""
    from toolkit.compress.quant.grids import get_grid

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 512, generator=generator) * 0.02
    weight[:, ::37] *= 8.0  # outlier columns, as AWQ scaling makes them
    errors = {
        name: (get_grid(name).fake_quantize(weight) - weight).pow(2).mean().item() for name in ("Q6_K", "sym6_g16")
    }
    assert 0.8 * errors["Q6_K"] <= errors["sym6_g16"] <= 1.25 * errors["Q6_K"], errors
    assert errors["sym6_g16"] < 0.1 * (get_grid("Q4_K").fake_quantize(weight) - weight).pow(2).mean().item()


def test_kquant_rows_not_a_multiple_of_256_fall_back_as_llama_cpp_does() -> None:
    """64-wide rows (like the demo model's 576): Q4_K -> Q5_0, Q6_K -> Q8_0 (tensor_type_fallback)."""
    from toolkit.compress.quant.grids import get_grid, grid_for_row

    assert grid_for_row("Q4_K_M", 64).name == "Q5_0" and grid_for_row("Q4_K_M", 512).name == "Q4_K"
    assert grid_for_row("Q6_K", 576).name == "Q8_0" and grid_for_row("int4_b128", 64).name == "int4_b128"
    base = _tiny_llama(kv_heads=2)
    expected = rtn(copy.deepcopy(base), "Q5_0").model
    quantized = rtn(copy.deepcopy(base), "Q4_K_M")
    assert quantized.record["grids"] == ["Q5_0"]
    for (_, got), (_, want) in zip(decoder_linears(quantized.model), decoder_linears(expected), strict=True):
        assert torch.equal(got.weight, want.weight)
    result = awq(base, _ids(4, 32, 5), "Q4_K_M", progress=False, n_grid=2, clip=False, search_tokens=64)
    # llama.cpp's per-tensor types: Q4_K -> Q5_0 on these rows; attn_v / ffn_down of use_more_bits layers are
    # Q6_K -> Q8_0 (toolkit.model.storage_types); no 256-block grid is searched on 64/128-wide rows.
    assert "Q5_0" in result.record["search_grids"] and set(result.record["search_grids"]) <= {"Q5_0", "Q8_0"}
    assert get_grid("Q4_K_M").name == "Q4_K"


LAYERS_KEPT = 8


@pytest.mark.demo
@pytest.mark.heavy
def test_demo_model_awq_beats_rtn(demo_model_dir: Path) -> None:
    """The demo model's first 8 of 30 layers (real weights, a quarter of the time), Q4_0, 4 x 256 radiology
    calibration tokens, a 5-point scale grid; KL on held-apart radiology blocks: AWQ + GPTQ < AWQ < RTN. Sized to the test suite; the
    full-size comparison is bench 8 (bench/quant_methods.py, docs/BENCHMARKS.md)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.data.blocks import make_blocks, split_calibration_eval
    from toolkit.data.sources import load_dataset_spec

    try:
        documents = load_dataset_spec("radiology")
    except BedsideError as error:
        pytest.skip(f"radiology corpus unavailable: {error}")
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    model.model.layers = model.model.layers[:LAYERS_KEPT]
    model.config.num_hidden_layers = LAYERS_KEPT
    calibration, evaluation, _record = split_calibration_eval(documents, 0.2, seed=0)
    calib = make_blocks(calibration, tokenizer, 256, 4, seed=0).input_ids
    held = make_blocks(evaluation, tokenizer, 256, 4, seed=1).input_ids
    reference = _log_probs(model, held)
    kl_rtn = _kl(reference, _log_probs(rtn(copy.deepcopy(model), SCHEME).model, held))
    with_gptq = copy.deepcopy(model)
    start = time.perf_counter()
    result = awq(model, calib, SCHEME, progress=False, n_grid=5, search_tokens=256)
    seconds = time.perf_counter() - start
    kl_awq = _kl(reference, _log_probs(fake_quantize_model(model, SCHEME), held))
    gptq = awq(with_gptq, calib, SCHEME, progress=False, n_grid=5, search_tokens=256, gptq=True)
    kl_gptq = _kl(reference, _log_probs(fake_quantize_model(with_gptq, SCHEME), held))
    print(f"demo {SCHEME}: KL AWQ+GPTQ {kl_gptq:.4f}, AWQ {kl_awq:.4f}, RTN {kl_rtn:.4f}, AWQ {seconds:.0f} s")
    assert kl_gptq < kl_awq < kl_rtn
    assert gptq.record["gptq"]["linears"] == 7 * LAYERS_KEPT  # without a matrix every linear is Q4_0
    assert len(result.record["layers"]) == LAYERS_KEPT
    for layer in result.record["layers"]:  # GQA 9/3 heads: v -> o is skipped
        assert [group["prev_op"] for group in layer["groups"]][1] == "self_attn.v_proj"
        assert "skipped" in layer["groups"][1] and "alpha" in layer["groups"][3]
