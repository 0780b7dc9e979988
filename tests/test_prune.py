"""Layer selection and depth-pruning surgery on tiny random models of every supported family.

Matrix: architectures (Llama, Mistral with a sliding window, Qwen2 with mixed full/sliding layers,
Gemma 2 and Gemma 3 with alternating layer_types, a LLaVA with a tiny CLIP tower) x methods.
Surgery is checked against two references: the original model run with the blocks skipped
(`skip_layers`), and a smaller model built from scratch and loaded with the kept weights.
One test uses the real demo model (skipped when set-up has not built it).
"""

from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from toolkit.compress.prune import (
    SELECTION_METHODS,
    LayerSelection,
    find_decoder_stack,
    register_selection_method,
    remove_layers,
    select_layers,
    skip_layers,
)
from toolkit.core.errors import BedsideError

NUM_LAYERS = 4
VOCAB = 256
IMAGE_TOKEN = 255
SLIDING = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _text_kwargs(**extra: object) -> dict[str, object]:
    return {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "initializer_range": 0.1,  # layers that matter, so KL differences are not all ~0
        **extra,
    }


def _llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    config = LlavaConfig(
        text_config=LlamaConfig(**_text_kwargs()),
        vision_config=vision,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=4,
    )
    return LlavaForConditionalGeneration(config)


# Sliding windows (6) shorter than the test sequences (12+) so the per-layer attention type matters.
BUILDERS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_text_kwargs())),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_text_kwargs(sliding_window=6))),
    "qwen2": lambda: Qwen2ForCausalLM(
        Qwen2Config(**_text_kwargs(use_sliding_window=True, sliding_window=6, max_window_layers=2))
    ),
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(
            **_text_kwargs(head_dim=16, sliding_window=6, layer_types=SLIDING, attn_implementation="eager")
        )
    ),
    "gemma3": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_text_kwargs(head_dim=16, sliding_window=6, layer_types=SLIDING, attn_implementation="eager")
        )
    ),
    "llava": _llava,
}
ARCHS = list(BUILDERS)
METHODS = ["last", "block-influence", "angular", "activation"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matmuls run faster on one thread, and far faster on a shared, busy 2-core machine
    (OpenMP threads waiting for each other: a demo-model forward took 10 s on 2 threads, 1.5 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def calibration_ids(sequences: int = 3, tokens: int = 16, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, IMAGE_TOKEN - 5, (sequences, tokens), generator=generator)


def model_inputs(arch: str) -> dict[str, torch.Tensor]:
    """Text ids for every model; for the LLaVA, an image too (4 image tokens + pixel values)."""
    ids = calibration_ids(2, 14, seed=7)
    if arch != "llava":
        return {"input_ids": ids}
    image_tokens = torch.full((2, 4), IMAGE_TOKEN)
    generator = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.cat([ids[:, :2], image_tokens, ids[:, 2:]], dim=1),
        "pixel_values": torch.randn(2, 3, 16, 16, generator=generator),
    }


@torch.no_grad()
def logits_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs, use_cache=False).logits


def layers_prefix(model: nn.Module) -> str:
    return (
        "model.language_model.layers."
        if isinstance(model, LlavaForConditionalGeneration)
        else "model.layers."
    )


def rebuilt_without(model: nn.Module, removed: list[int]) -> nn.Module:
    """Reference independent of the surgery: a fresh smaller model loaded with the kept weights."""
    config = copy.deepcopy(model.config)
    text = config.get_text_config(decoder=True)
    kept = [i for i in range(text.num_hidden_layers) if i not in removed]
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = [text.layer_types[i] for i in kept]
    text.num_hidden_layers = len(kept)
    smaller = type(model)(config).eval()
    prefix = layers_prefix(model)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in removed:
                continue
            key = f"{prefix}{kept.index(int(index))}.{rest}"
        state[key] = value
    smaller.load_state_dict(state)
    return smaller


def expected_passes(method: str, n_remove: int, top_k: int | None = None) -> int:
    if method == "last":
        return 0
    if method in ("block-influence", "angular"):
        return 1
    rounds = [NUM_LAYERS] + [
        NUM_LAYERS - k if top_k is None else min(top_k, NUM_LAYERS - k) for k in range(1, n_remove)
    ]
    return 1 + sum(rounds)


# ----------------------------------------------------------------------------------------------
# Selection: every architecture x every method
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    return {arch: tiny_model(arch) for arch in ARCHS}


def test_registry_holds_the_four_methods():
    assert set(METHODS) <= set(SELECTION_METHODS)
    for method in SELECTION_METHODS.values():
        assert method.summary, f"{method.name} has no docstring"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_selection_matrix(models, arch, method):
    model = models[arch]
    for n_remove in (0, 2):
        selection = select_layers(method, model, calibration_ids(), n_remove)
        assert isinstance(selection, LayerSelection)
        assert selection.method == method
        assert len(selection.layers_to_remove) == n_remove
        assert selection.layers_to_remove == sorted(set(selection.layers_to_remove))
        assert all(0 <= i < NUM_LAYERS for i in selection.layers_to_remove)
        assert len(selection.scores) == NUM_LAYERS
        assert all(math.isfinite(score) for score in selection.scores)
        assert selection.forward_passes == expected_passes(method, n_remove)
        assert selection.seconds >= 0
        json.dumps(selection.to_dict())  # the record must be JSON as is


def test_last_keeps_final_layer(models):
    for n_remove in range(NUM_LAYERS):
        selection = select_layers("last", models["llama"], None, n_remove)
        assert NUM_LAYERS - 1 not in selection.layers_to_remove
        assert selection.layers_to_remove == list(range(NUM_LAYERS - 1 - n_remove, NUM_LAYERS - 1))
        lowest = sorted(range(NUM_LAYERS), key=selection.scores.__getitem__)[:n_remove]
        assert sorted(lowest) == selection.layers_to_remove


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_influence_removes_lowest_scores(models, arch):
    selection = select_layers("block-influence", models[arch], calibration_ids(), 2)
    ranked = sorted(range(NUM_LAYERS), key=selection.scores.__getitem__)
    assert selection.layers_to_remove == sorted(ranked[:2])
    assert all(-1e-6 <= score <= 2 for score in selection.scores)  # 1 - cos lies in [0, 2]


@pytest.mark.parametrize("n_remove", [1, 2, 3])
def test_angular_picks_the_closest_contiguous_block(models, n_remove):
    selection = select_layers("angular", models["qwen2"], calibration_ids(), n_remove)
    start = selection.layers_to_remove[0]
    assert selection.layers_to_remove == list(range(start, start + n_remove))
    distances = {int(k): v for k, v in selection.details["block_distances"].items()}
    assert sorted(distances) == list(range(NUM_LAYERS - n_remove + 1))  # every l with l + n <= L
    assert distances[start] == min(distances.values())
    assert all(0 <= d <= 1 for d in distances.values())


# ----------------------------------------------------------------------------------------------
# The activation method
# ----------------------------------------------------------------------------------------------


def _make_layer_identity(model: nn.Module, index: int) -> None:
    """Zero the attention output and MLP down projections: the layer adds 0 to its input."""
    layer = find_decoder_stack(model).layers[index]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "llava"])
def test_activation_removes_identity_layer_first_and_rescores(arch):
    model = tiny_model(arch)
    _make_layer_identity(model, 2)
    selection = select_layers("activation", model, calibration_ids(), 2)
    details = selection.details
    assert details["removal_order"][0] == 2
    assert selection.scores[2] < 1e-7
    assert min(s for i, s in enumerate(selection.scores) if i != 2) > 100 * max(selection.scores[2], 1e-9)
    # Round 1 re-scored every remaining layer with layer 2 gone; since layer 2 is an identity,
    # D({2, i}) must equal D({i}) from round 0, and the second pick is round 0's runner-up.
    round0, round1 = details["rounds"]
    assert set(round1) == {"0", "1", "3"}
    for layer, kl in round1.items():
        assert kl == pytest.approx(round0[layer], rel=1e-4, abs=1e-8)
    runner_up = min((i for i in range(NUM_LAYERS) if i != 2), key=selection.scores.__getitem__)
    assert details["removal_order"][1] == runner_up
    assert selection.forward_passes == 1 + NUM_LAYERS + (NUM_LAYERS - 1)
    assert details["kl_after_each_removal"][0] == pytest.approx(selection.scores[2])


def test_activation_top_k_prefilters_by_block_influence(models):
    selection = select_layers("activation", models["llama"], calibration_ids(), 3, top_k_candidates=1)
    assert selection.forward_passes == expected_passes("activation", 3, top_k=1)
    bi = selection.details["block_influence"]
    first = selection.details["removal_order"][0]
    remaining = [i for i in range(NUM_LAYERS) if i != first]
    assert list(selection.details["rounds"][1]) == [str(min(remaining, key=bi.__getitem__))]
    assert len(selection.details["rounds"][0]) == NUM_LAYERS  # round 0 always measures every layer


@pytest.mark.parametrize("arch", ["mistral", "gemma3", "llava"])
@pytest.mark.parametrize("quantized", [False, True])
def test_activation_prefix_reuse_is_exact(models, arch, quantized):
    knobs = {"quant_scheme": RoundingGrid()} if quantized else {}
    fast = select_layers("activation", models[arch], calibration_ids(), 2, **knobs)
    knobs = {"quant_scheme": RoundingGrid()} if quantized else {}
    slow = select_layers("activation", models[arch], calibration_ids(), 2, reuse_prefix=False, **knobs)
    assert fast.layers_to_remove == slow.layers_to_remove
    for fast_round, slow_round in zip(fast.details["rounds"], slow.details["rounds"], strict=True):
        assert fast_round == pytest.approx(slow_round, rel=1e-6, abs=1e-10)
    assert fast.forward_passes == slow.forward_passes
    assert fast.details["decoder_layer_forwards"] < slow.details["decoder_layer_forwards"]


def test_activation_limits_calibration(models):
    ids = calibration_ids(sequences=5, tokens=20)
    selection = select_layers("activation", models["llama"], ids, 1, max_sequences=2, max_tokens=8)
    assert selection.details["calibration_sequences"] == 2
    assert selection.details["calibration_tokens"] == 16


class RoundingGrid:
    """A stand-in quantizer: round every weight to a multiple of `step` (no toolkit.compress.quant needed)."""

    name = "round-0.05"

    def __init__(self, step: float = 0.05) -> None:
        self.step = step
        self.calls = 0

    def fake_quantize(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.round(weight / self.step) * self.step


def test_activation_quantizes_once_and_restores_weights(models):
    model = models["llama"]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    grid = RoundingGrid()
    plain = select_layers("activation", model, calibration_ids(), 1)
    quantized = select_layers("activation", model, calibration_ids(), 1, quant_scheme=grid)
    linears_per_layer = 7
    assert grid.calls == linears_per_layer * NUM_LAYERS  # once up front, not per candidate
    assert quantized.details["quant"]["linears"] == linears_per_layer * NUM_LAYERS
    assert quantized.details["quant"]["full_model_kl"] > 0
    assert quantized.forward_passes == plain.forward_passes + 1
    assert quantized.scores != plain.scores
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} not restored"


def test_activation_with_a_real_grid_uses_llama_cpp_fallback(models):
    pytest.importorskip("toolkit.compress.quant.grids")
    selection = select_layers("activation", models["llama"], calibration_ids(), 1, quant_scheme="Q4_K_M")
    # rows of 64 and 128 are not multiples of Q4_K's 256: llama.cpp stores them as Q5_0
    assert selection.details["quant"]["grids"] == {"Q5_0": 7 * NUM_LAYERS}
    assert selection.details["quant"]["full_model_kl"] > 0


# ----------------------------------------------------------------------------------------------
# Surgery
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("removed", [[1, 2], [0, 3]])
@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_equals_skipping_and_a_rebuilt_model(arch, removed):
    original = tiny_model(arch)
    inputs = model_inputs(arch)
    with torch.no_grad(), skip_layers(original, removed):
        skipped = logits_of(original, inputs)
    reference = logits_of(rebuilt_without(original, removed), inputs)
    full = logits_of(original, inputs)
    pruned = remove_layers(copy.deepcopy(original), removed)
    got = logits_of(pruned, inputs)
    torch.testing.assert_close(got, skipped, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(got, full, atol=1e-3)  # removing the layers did change the model
    torch.testing.assert_close(logits_of(original, inputs), full, atol=0, rtol=0)  # skip restored


def test_skip_layers_restores_an_instance_forward():
    """accelerate's offload hooks set `forward` on the layer instance: skipping must put it back."""
    model = tiny_model("llama")
    layer = find_decoder_stack(model).layers[1]
    calls = []
    original_forward = layer.forward

    def hooked_forward(*args, **kwargs):
        calls.append(1)
        return original_forward(*args, **kwargs)

    layer.forward = hooked_forward
    inputs = model_inputs("llama")
    with skip_layers(model, [1]):
        logits_of(model, inputs)
    assert calls == []
    assert layer.__dict__["forward"] is hooked_forward
    logits_of(model, inputs)
    assert calls == [1]


@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_updates_config_and_cache_indices(arch):
    model = remove_layers(tiny_model(arch), [0, 2])
    text = model.config.get_text_config(decoder=True)
    stack = find_decoder_stack(model)
    assert stack.num_layers == text.num_hidden_layers == 2
    for new_index, layer in enumerate(stack.layers):
        assert layer.self_attn.layer_idx == new_index
        if hasattr(layer, "layer_idx"):
            assert layer.layer_idx == new_index
    if arch in ("gemma2", "gemma3"):
        assert text.layer_types == [SLIDING[1], SLIDING[3]]
        assert [layer.attention_type for layer in stack.layers] == text.layer_types
    if arch == "qwen2":  # [full, full, sliding, sliding] minus 0 and 2
        assert text.layer_types == ["full_attention", "sliding_attention"]
        assert text.max_window_layers == 1
    if arch == "llava":
        assert model.config.vision_config.num_hidden_layers == 2  # the vision tower is untouched


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_model_saves_reloads_and_generates(arch, tmp_path):
    model = remove_layers(tiny_model(arch), [1])
    model.save_pretrained(tmp_path)
    loader = LlavaForConditionalGeneration if arch == "llava" else AutoModelForCausalLM
    # same attention kernel as the in-memory model (Gemma's eager vs the sdpa default differ by ~1e-5)
    reloaded = loader.from_pretrained(tmp_path, attn_implementation=model.config._attn_implementation).eval()
    assert find_decoder_stack(reloaded).num_layers == NUM_LAYERS - 1
    inputs = model_inputs(arch)
    torch.testing.assert_close(logits_of(reloaded, inputs), logits_of(model, inputs), atol=1e-5, rtol=0)

    prompt = calibration_ids(1, 10, seed=11)
    settings = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = reloaded.generate(prompt, use_cache=True, **settings)
        uncached = reloaded.generate(prompt, use_cache=False, **settings)
    assert cached.shape[1] == prompt.shape[1] + 8
    assert torch.equal(cached, uncached)


# ----------------------------------------------------------------------------------------------
# Bad requests: one-line user errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([0, 1, 2, 3], "cannot remove all 4 decoder layers"),
        ([0, 1, 2, 3, 4], "cannot remove 5 layers: the model has only 4"),
        ([1, 1], "layer 1 is listed twice"),
        ([4], "layer 4 does not exist: the model has 4 decoder layers (indices 0-3)"),
        ([-1], "layer -1 does not exist"),
        ([1.0], "must be integers"),
    ],
)
def test_surgery_refuses_bad_requests(models, layers, message):
    model = copy.deepcopy(models["llama"])
    with pytest.raises(BedsideError) as error:
        remove_layers(model, layers)
    assert message in str(error.value)
    assert find_decoder_stack(model).num_layers == NUM_LAYERS  # nothing happened


def test_selection_refuses_bad_requests(models):
    model = models["llama"]
    with pytest.raises(BedsideError, match="unknown layer-selection method 'deepest'"):
        select_layers("deepest", model, calibration_ids(), 1)
    with pytest.raises(BedsideError, match="cannot remove 4 of 4 decoder layers"):
        select_layers("activation", model, calibration_ids(), 4)
    with pytest.raises(BedsideError, match="whole number"):
        select_layers("last", model, None, -1)
    with pytest.raises(BedsideError, match="has no knob 'top_k'"):
        select_layers("activation", model, calibration_ids(), 1, top_k=2)
    with pytest.raises(BedsideError, match=r"shape \(sequences, tokens\)"):
        select_layers("angular", model, torch.arange(10), 1)
    with pytest.raises(BedsideError, match="integer token ids"):
        select_layers("block-influence", model, torch.zeros(2, 8), 1)
    with pytest.raises(BedsideError, match="must be a torch tensor"):
        select_layers("activation", model, None, 1)
    with pytest.raises(BedsideError, match="unknown quantization scheme"):
        select_layers("activation", model, calibration_ids(), 1, quant_scheme="Q4_nonsense")
    with pytest.raises(BedsideError, match="cannot skip all 4"), skip_layers(model, range(4)):
        pass


def test_unsupported_architecture_is_a_user_error():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB))
    with pytest.raises(BedsideError, match="cannot find the decoder layers of a GPT2LMHeadModel"):
        remove_layers(gpt2, [0])


def test_a_new_method_is_one_decorated_function(models):
    @register_selection_method("first-for-test", needs_calibration=False)
    def select_first(model, calib_input_ids, n_remove, *, offset: int = 0):
        """Remove layers offset .. offset+n-1."""
        return LayerSelection(
            "first-for-test", list(range(offset, offset + n_remove)), [1.0] * NUM_LAYERS, 0, 0.0
        )

    try:
        selection = select_layers("first-for-test", models["llama"], None, 2, offset=1)
        assert selection.layers_to_remove == [1, 2]
        assert SELECTION_METHODS["first-for-test"].knobs == {"offset": 0}
        with pytest.raises(ValueError, match="registered twice"):
            register_selection_method("first-for-test")(select_first)
    finally:
        del SELECTION_METHODS["first-for-test"]


# ----------------------------------------------------------------------------------------------
# The real demo model
# ----------------------------------------------------------------------------------------------


def _medical_token_blocks(tokenizer, n_blocks: int, length: int) -> torch.Tensor:
    """Consecutive blocks of PubMedQA contexts (shared data) or skip when that data is absent."""
    from toolkit.core import paths

    data = paths.shared_data_dir()
    source = data / "pubmedqa" / "dev.jsonl" if data is not None else None
    if source is None or not source.is_file():
        pytest.skip("shared PubMedQA data not found (../shared/data/pubmedqa/dev.jsonl)")
    texts = []
    with source.open(encoding="utf-8") as handle:
        for line in handle:
            texts.append(" ".join(json.loads(line)["contexts"]))
            if len(texts) >= 8:
                break
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    need = n_blocks * length
    assert len(ids) >= need
    return torch.tensor(ids[:need]).reshape(n_blocks, length)


@torch.no_grad()
def _kl_of_removal(model: nn.Module, layers: list[int], ids: torch.Tensor) -> float:
    reference = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    with skip_layers(model, layers):
        candidate = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    kl = torch.nn.functional.kl_div(candidate, reference, reduction="none", log_target=True).sum(-1)
    return float(kl.mean())


@pytest.mark.demo
@pytest.mark.slow
@pytest.mark.heavy
def test_demo_activation_beats_last_on_held_apart_text(demo_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    blocks = _medical_token_blocks(tokenizer, n_blocks=4, length=48)
    calibration, held_apart = blocks[:2], blocks[2:]

    start = time.perf_counter()
    activation = select_layers("activation", model, calibration, 2, top_k_candidates=2)
    last = select_layers("last", model, None, 2)
    kl_activation = _kl_of_removal(model, activation.layers_to_remove, held_apart)
    kl_last = _kl_of_removal(model, last.layers_to_remove, held_apart)
    print(
        f"\ndemo, 2 of 30 layers, held-apart KL: activation {activation.layers_to_remove} "
        f"{kl_activation:.4f} ({activation.forward_passes} passes, {activation.seconds:.1f} s) vs "
        f"last {last.layers_to_remove} {kl_last:.4f}; total {time.perf_counter() - start:.1f} s"
    )
    assert kl_activation < kl_last
