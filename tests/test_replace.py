"""Linear replacement of removed spans (toolkit.compress.prune.replace) and the replace-aware selection.

Tiny random Llamas built here (untied embedding unless a test needs a tied one). Calibration and
held-apart ids are drawn from a 16-token alphabet so the held-apart tokens are of the same kind as
the calibration ones (on ids drawn from the whole vocabulary a random model's states differ per
token and no fit carries over).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from toolkit.compress.pipeline import validate_options
from toolkit.compress.prune import find_decoder_stack, remove_layers, select_layers, skip_layers
from toolkit.compress.prune.replace import (
    Span,
    fold_target,
    held_apart_errors,
    replace_removed_layers,
    spans_of,
)
from toolkit.compress.record import CompressOptions
from toolkit.core.errors import BedsideError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_LAYERS = 6
ALPHABET = 16


def tiny_llama(tied: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def ids(sequences: int, tokens: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, ALPHABET, (sequences, tokens), generator=torch.Generator().manual_seed(seed))


CALIB = ids(24, seed=1)
HELD = ids(6, seed=2)


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def test_spans_of_splits_removed_layers_into_maximal_runs():
    assert spans_of([7, 3, 4]) == [Span(3, 4), Span(7, 7)]
    assert spans_of([]) == []


@pytest.mark.parametrize("layers", [[2, 3], [4, 5], [1, 3], [0, 1]])
def test_fitted_map_lowers_the_span_output_error_on_held_apart_tokens(layers):
    model = tiny_llama()
    replacement = replace_removed_layers(copy.deepcopy(model), layers, CALIB, eval_input_ids=HELD)
    assert len(replacement.record["spans"]) == len(spans_of(layers))
    for entry in replacement.record["spans"]:
        assert entry["relative_error_after"] < entry["relative_error_before"]
        assert entry["held_apart_relative_error_after"] < entry["held_apart_relative_error_before"]
        assert entry["held_apart_tokens"] == HELD.numel() and entry["calibration_tokens"] == CALIB.numel()
    # the record's held-apart numbers are what the maps do on those tokens
    again = held_apart_errors(model, replacement.maps, HELD)
    for entry, span in zip(replacement.record["spans"], replacement.maps, strict=True):
        assert entry["held_apart_relative_error_after"] == pytest.approx(again[span][1], rel=1e-9)


def test_calibration_errors_from_the_sums_equal_a_direct_measurement():
    model = tiny_llama()
    replacement = replace_removed_layers(copy.deepcopy(model), [2, 3], CALIB)
    direct = held_apart_errors(model, replacement.maps, CALIB)[Span(2, 3)]
    entry = replacement.record["spans"][0]
    assert entry["relative_error_before"] == pytest.approx(direct[0], rel=1e-6)
    assert entry["relative_error_after"] == pytest.approx(direct[1], rel=1e-4)


def _with_map_unfolded(model: nn.Module, span: Span, transform: torch.Tensor) -> list:
    """Hooks that apply T to the output of the fold target instead of changing its weight."""
    stack = find_decoder_stack(model)
    module = stack.layers[span.start - 1].mlp.down_proj if span.start > 0 else model.get_input_embeddings()

    def hook(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        return (output.double() @ transform.double()).to(output.dtype)

    return [module.register_forward_hook(hook)]


@pytest.mark.parametrize("layers", [[2, 3], [0, 1], [1, 3, 4]])
def test_folding_is_exact(layers):
    """Folded + removed model == original model with the maps applied by hooks and the spans skipped."""
    model = tiny_llama()
    folded = copy.deepcopy(model)
    replacement = replace_removed_layers(folded, layers, CALIB)
    remove_layers(folded, layers)
    handles = [h for span, t in replacement.maps.items() for h in _with_map_unfolded(model, span, t)]
    try:
        with skip_layers(model, layers):
            expected = model(input_ids=HELD, use_cache=False, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        got = folded(input_ids=HELD, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(got.hidden_states[-1], expected.hidden_states[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    # and the replaced model differs from plain removal (the map does something)
    plain = remove_layers(copy.deepcopy(model), layers)
    assert not torch.allclose(logits(plain, HELD), got.logits, atol=1e-4)


def test_replacement_adds_no_parameter():
    model = tiny_llama()
    plain = remove_layers(copy.deepcopy(model), [2, 3])
    replaced = copy.deepcopy(model)
    replace_removed_layers(replaced, [2, 3], CALIB)
    remove_layers(replaced, [2, 3])
    assert parameter_count(replaced) == parameter_count(plain)
    assert replaced.state_dict().keys() == plain.state_dict().keys()
    changed = [k for k, v in replaced.state_dict().items() if not torch.equal(v, plain.state_dict()[k])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_span_at_layer_zero_with_a_tied_embedding_is_refused_or_skipped():
    model = tiny_llama(tied=True)
    with pytest.raises(BedsideError) as error:
        replace_removed_layers(copy.deepcopy(model), [0, 1], CALIB)
    assert "tied" in _one_line(error)
    lenient = copy.deepcopy(model)
    replacement = replace_removed_layers(lenient, [0, 1, 4], CALIB, strict=False)
    assert [entry["layers"] for entry in replacement.record["spans"]] == [[4]]
    assert (
        replacement.record["skipped"][0]["layers"] == [0, 1]
        and "tied" in replacement.record["skipped"][0]["reason"]
    )
    assert torch.equal(lenient.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_gemma_post_feedforward_norm_is_refused():
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            attn_implementation="eager",
        )
    ).eval()
    assert isinstance(fold_target(gemma, Span(2, 2)), str)
    with pytest.raises(BedsideError) as error:
        replace_removed_layers(gemma, [2], CALIB)
    assert "norm" in _one_line(error)


@pytest.mark.parametrize(
    ("calibration", "needle"),
    [(None, "calibration input ids"), (torch.zeros(0, 8, dtype=torch.long), "too small")],
)
def test_missing_calibration_data_is_refused(calibration, needle):
    with pytest.raises(BedsideError) as error:
        replace_removed_layers(tiny_llama(), [2], calibration)
    assert needle in _one_line(error)


def test_bad_layers_ridge_and_mode_are_refused():
    with pytest.raises(BedsideError):
        replace_removed_layers(tiny_llama(), [9], CALIB)
    with pytest.raises(BedsideError) as error:
        replace_removed_layers(tiny_llama(), [2], CALIB, ridge=-1.0)
    assert "ridge" in _one_line(error)
    with pytest.raises(BedsideError) as error:
        validate_options(CompressOptions(prune_layers=1, replace="cubic"))
    assert "--replace" in _one_line(error) and "linear" in str(error.value)


def test_replace_aware_selection_picks_the_span_with_the_lowest_kl_after_replacement():
    model = tiny_llama(tied=True)
    before = copy.deepcopy(model.state_dict())
    selection = select_layers("replace-aware", model, CALIB, 2, top_k=3)
    for key, value in model.state_dict().items():  # the search restores every weight it folded into
        assert torch.equal(value, before[key])
    details = selection.details
    start = details["block_start"]
    assert selection.layers_to_remove == [start, start + 1]
    kl = {int(s): v for s, v in details["kl_after_replacement"].items()}
    assert len(kl) == 3 and start == min(kl, key=lambda s: (kl[s], s))
    after = {int(s): v for s, v in details["relative_error_after"].items()}
    assert set(kl) == set(sorted(after, key=lambda s: (after[s], s))[:3])  # re-ranked: the 3 best fits
    assert "0" in details["not_foldable"] and 0 not in after  # tied embedding: no span at layer 0
    assert len(selection.scores) == NUM_LAYERS and selection.forward_passes == 2 + 3
    assert all(
        details["relative_error_after"][s] < details["relative_error_before"][s]
        for s in details["relative_error_after"]
    )
