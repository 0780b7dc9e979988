"""Model facts from config.json alone: counts against published totals, tables against transformers."""

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from toolkit.cli import model as cli_model
from toolkit.core.errors import BedsideError
from toolkit.model.architectures import ARCHITECTURES, MULTIMODAL, lora_target_pattern
from toolkit.model.facts import ModelFacts, facts_from_config, read_facts

FIXTURES = Path(__file__).parent / "fixtures"

# Published parameter totals (what `sum(p.numel() for p in model.parameters())` gives, i.e. tied
# embeddings once). Sources: the Hugging Face model pages' safetensors "total" and the keras-hub
# presets' "params", cross-checked in public code that loads the checkpoints.
PUBLISHED_TOTALS = {
    # meta-llama/Llama-2-7b-hf; keras-hub llama preset params; gguf general.parameter_count
    "llama-2-7b": 6_738_415_616,
    # llava-hf/llava-1.5-7b-hf: safetensors header audit, 686 tensors, 14,126,854,144 bytes in f16
    "llava-1.5-7b": 7_063_427_072,
    # mistralai/Mistral-7B-v0.1; gguf general.parameter_count
    "mistral-7b": 7_241_732_096,
    # Qwen/Qwen2-0.5B (q, k, v biases; tied): safetensors 290 tensors
    "qwen2-0.5b": 494_032_768,
    # google/gemma-2b; keras-hub gemma_2b_en params
    "gemma-2b": 2_506_172_416,
    # google/gemma-2-2b
    "gemma-2-2b": 2_614_341_888,
    # google/gemma-3-1b-it; keras-hub gemma3_1b params
    "gemma-3-1b": 999_885_952,
    # Qwen/Qwen3-0.6B as model.parameters() counts it (its safetensors also store the tied
    # lm_head, so the hub page shows 751,632,384 = this + 151936 x 1024)
    "qwen3-0.6b": 596_049_920,
    # HuggingFaceTB/SmolLM2-135M (the demo model's architecture)
    "smollm2-135m": 134_515_008,
}

# Tensors in the published safetensors files (tied lm_head not stored).
PUBLISHED_TENSOR_COUNTS = {"llava-1.5-7b": 686, "qwen2-0.5b": 290}


def fixture_facts(name: str) -> ModelFacts:
    return read_facts(FIXTURES / name)


# --------------------------------------------------------------------------- published totals


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_total_matches_published(name):
    facts = fixture_facts(name)
    published = PUBLISHED_TOTALS[name]
    assert abs(facts.total_params - published) <= 0.005 * published
    assert facts.total_params == published  # exact, since every tensor is known from the config


@pytest.mark.parametrize("name", sorted(PUBLISHED_TENSOR_COUNTS))
def test_tensor_count_matches_published(name):
    assert fixture_facts(name).tensor_count == PUBLISHED_TENSOR_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_components_add_up(name):
    facts = fixture_facts(name)
    assert sum(facts.components().values()) == facts.total_params
    assert facts.text_params + facts.vision_params == facts.total_params
    assert facts.layer_params == sum(t.numel for t in facts.layer_tensors)
    roles = [t.role for t in facts.layer_tensors]
    assert len(roles) == len(set(roles))
    if facts.vision is not None:
        v = facts.vision
        embedding = sum(t.numel for t in v.embedding_tensors)
        final = sum(t.numel for t in v.final_tensors)
        assert v.tower_params == embedding + v.layer_params * v.num_layers + final
        assert v.projector_params == sum(t.numel for t in v.projector_tensors)


# --------------------------------------------------------------------------- LLaVA


def test_llava_15_shape():
    facts = fixture_facts("llava-1.5-7b")
    assert facts.architecture == "LlavaForConditionalGeneration"
    assert facts.family == "llama"
    # text_config omits these: LlamaConfig defaults fill them
    assert (facts.num_layers, facts.hidden_size, facts.intermediate_size) == (32, 4096, 11008)
    assert (facts.num_heads, facts.num_kv_heads, facts.head_dim) == (32, 32, 128)
    assert facts.vocab_size == 32064
    assert not facts.tie_word_embeddings
    assert facts.layers_path == "model.language_model.layers"
    v = facts.vision
    assert v is not None
    assert v.image_tokens_per_image == 576  # (336 / 14)^2, CLS dropped
    assert (v.num_layers, v.hidden_size, v.intermediate_size, v.num_heads) == (24, 1024, 4096, 16)
    assert v.tower_params == 303_507_456
    assert v.projector_params == 20_979_712
    # feature layer -2: hidden_states[23] is the output of layer 23; layer 24 and post_layernorm unused
    assert v.layers_used == 23
    assert v.unused_params == v.layer_params + 2 * 1024
    shapes = {t.role: t.shape for t in v.projector_tensors}
    assert shapes == {"mm.0": (4096, 1024), "mm.0.bias": (4096,), "mm.2": (4096, 4096), "mm.2.bias": (4096,)}
    assert {t.role: t.shape for t in v.embedding_tensors}["position_embd"] == (577, 1024)


def test_llava_full_strategy_keeps_cls_and_feature_layer_list_widens_projector():
    config = json.loads((FIXTURES / "llava-1.5-7b" / "config.json").read_text())
    config["vision_feature_select_strategy"] = "full"
    config["vision_feature_layer"] = [-2, -5]
    v = facts_from_config(config).vision
    assert v.image_tokens_per_image == 577
    assert {t.role: t.shape for t in v.projector_tensors}["mm.0"] == (4096, 2048)
    assert v.layers_used == 23


def test_llava_defaults_match_llava_config():
    """No text_config / vision_config: Llama-7B text and CLIP ViT-L/14-336, as LlavaConfig() builds."""
    facts = facts_from_config({"architectures": ["LlavaForConditionalGeneration"]})
    assert (facts.num_layers, facts.hidden_size, facts.vocab_size) == (32, 4096, 32000)
    v = facts.vision
    assert (v.num_layers, v.hidden_size, v.image_size, v.patch_size) == (24, 1024, 336, 14)
    assert v.image_tokens_per_image == 576


def test_llava_with_another_text_family():
    facts = facts_from_config(
        {
            "model_type": "llava",
            "text_config": {
                "model_type": "qwen2",
                "hidden_size": 896,
                "num_attention_heads": 14,
                "num_key_value_heads": 2,
                "intermediate_size": 4864,
                "num_hidden_layers": 24,
            },
            "vision_config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 16,
            },
        }
    )
    assert facts.family == "qwen2"
    assert "attn_q.bias" in {t.role for t in facts.layer_tensors}
    assert facts.vision.image_tokens_per_image == 4


# --------------------------------------------------------------------------- families


def test_biases_norms_and_tying_per_family():
    roles = {name: {t.role for t in fixture_facts(name).layer_tensors} for name in PUBLISHED_TOTALS}
    assert {"attn_q.bias", "attn_k.bias", "attn_v.bias"} <= roles["qwen2-0.5b"]
    assert "attn_output.bias" not in roles["qwen2-0.5b"]
    assert not any(
        r.endswith(".bias") for r in roles["llama-2-7b"] | roles["mistral-7b"] | roles["qwen3-0.6b"]
    )
    assert {"post_attention_norm", "post_ffw_norm"} <= roles["gemma-2-2b"]
    assert {"post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"} <= roles["gemma-3-1b"]
    assert {"attn_q_norm", "attn_k_norm"} <= roles["qwen3-0.6b"]
    assert "post_ffw_norm" not in roles["gemma-2b"]
    # gemma ties by default (its config omits the key); llama-2 says false
    assert fixture_facts("gemma-2b").tie_word_embeddings
    assert "output" not in {t.role for t in fixture_facts("gemma-2b").global_tensors}
    assert "output" in {t.role for t in fixture_facts("llama-2-7b").global_tensors}


def test_head_dim_and_kv_heads_derived_like_transformers():
    facts = facts_from_config({"model_type": "llama", "hidden_size": 512, "num_attention_heads": 8})
    assert facts.num_kv_heads == 8 and facts.head_dim == 64
    gemma = fixture_facts("gemma-2b")  # head_dim 256 explicit: q is 8 x 256 = hidden, k is 1 x 256
    shapes = {t.role: t.shape for t in gemma.layer_tensors}
    assert shapes["attn_k"] == (256, 2048) and shapes["attn_output"] == (2048, 2048)
    biased = facts_from_config({"model_type": "llama", "attention_bias": True, "mlp_bias": True})
    assert {"attn_output.bias", "ffn_down.bias"} <= {t.role for t in biased.layer_tensors}


def test_kv_bytes_per_token():
    llama = fixture_facts("llama-2-7b")
    assert llama.kv_bytes_per_token(2) == 2 * 32 * 32 * 128 * 2 == 524_288
    assert llama.kv_bytes_per_token(1, num_layers=16) == 131_072
    mistral = fixture_facts("mistral-7b")  # GQA: 8 KV heads, a quarter of llama-2's cache
    assert mistral.kv_bytes_per_token(2) == 131_072
    assert fixture_facts("smollm2-135m").kv_bytes_per_token(2) == 2 * 30 * 3 * 64 * 2


def test_awq_groups_and_lora_targets_name_real_modules():
    for family in ARCHITECTURES.values():
        facts = facts_from_config({"model_type": family.model_type})
        names = {t.name for t in facts.layer_tensors}
        for group in family.awq_groups:
            assert f"{group.prev_op}.weight" in names, (family.family, group.prev_op)
            for linear in group.linears:
                assert f"{linear}.weight" in names, (family.family, linear)
        for target in family.lora_targets:
            assert any(name.endswith(f"{target}.weight") for name in names)
    assert ARCHITECTURES["gemma2"].awq_groups[2].prev_op == "pre_feedforward_layernorm"
    assert ARCHITECTURES["gemma"].norm_weight_offset == 1.0


def test_lora_pattern_skips_the_vision_tower():
    facts = fixture_facts("llava-1.5-7b")
    pattern = lora_target_pattern(ARCHITECTURES[facts.family], facts.layers_path)
    assert re.fullmatch(pattern, "model.language_model.layers.3.self_attn.q_proj")
    assert re.fullmatch(pattern, "model.language_model.layers.31.mlp.down_proj")
    assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.3.self_attn.q_proj")


def test_llava_checkpoint_keys_map_to_module_names():
    """llava-hf checkpoints store language_model.model.*; the names in facts are transformers 4.57's."""
    facts = fixture_facts("llava-1.5-7b")
    renames = MULTIMODAL[facts.architecture].checkpoint_key_renames

    def rename(key):
        for pattern, replacement in renames.items():
            key = re.sub(pattern, replacement, key)
        return key

    q_proj = next(t.name for t in facts.layer_tensors if t.role == "attn_q")
    assert (
        rename("language_model.model.layers.0.self_attn.q_proj.weight") == f"{facts.layers_path}.0.{q_proj}"
    )
    assert rename("language_model.lm_head.weight") == "lm_head.weight"
    assert rename("multi_modal_projector.linear_1.weight").startswith(facts.vision.projector_path)


# --------------------------------------------------------------------------- against transformers

TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "head_dim": 16,
}


def _expected_names(facts: ModelFacts) -> dict[str, tuple[int, ...]]:
    """Full parameter names and shapes our tables predict (layer 0 and 1 expanded)."""
    expected = {t.name: t.shape for t in facts.global_tensors}
    for index in range(facts.num_layers):
        expected |= {f"{facts.layers_path}.{index}.{t.name}": t.shape for t in facts.layer_tensors}
    v = facts.vision
    if v is not None:
        expected |= {f"{v.tower_path}.{t.name}": t.shape for t in v.embedding_tensors + v.final_tensors}
        for index in range(v.num_layers):
            expected |= {f"{v.layers_path}.{index}.{t.name}": t.shape for t in v.layer_tensors}
        expected |= {f"{v.projector_path}.{t.name}": t.shape for t in v.projector_tensors}
    return expected


def _meta_model_parameters(config: dict) -> dict[str, tuple[int, ...]]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(**config)
    model_class = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = model_class(hf_config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
@pytest.mark.parametrize("tied", [False, True])
def test_tables_match_transformers_text(family, tied):
    spec = ARCHITECTURES[family]
    config = {
        "model_type": spec.model_type,
        "architectures": [spec.causal_lm_class],
        "tie_word_embeddings": tied,
        **TINY_TEXT,
    }
    facts = facts_from_config(config)
    assert _meta_model_parameters(config) == _expected_names(facts)


def test_tables_match_transformers_llava():
    config = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {"model_type": "llama", **TINY_TEXT},
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
    }
    facts = facts_from_config(json.loads(json.dumps(config)))  # transformers edits dicts in place
    assert _meta_model_parameters(config) == _expected_names(facts)


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_defaults_match_transformers_configs(family):
    transformers = pytest.importorskip("transformers")
    spec = ARCHITECTURES[family]
    hf = transformers.AutoConfig.for_model(spec.model_type)
    facts = facts_from_config({"model_type": spec.model_type})
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert (facts.hidden_size, facts.intermediate_size, facts.num_layers) == (
        hf.hidden_size,
        hf.intermediate_size,
        hf.num_hidden_layers,
    )
    assert (facts.num_heads, facts.num_kv_heads, facts.head_dim) == (
        hf.num_attention_heads,
        hf.num_key_value_heads,
        head_dim,
    )
    assert (facts.vocab_size, facts.max_position_embeddings, facts.tie_word_embeddings) == (
        hf.vocab_size,
        hf.max_position_embeddings,
        hf.tie_word_embeddings,
    )


# --------------------------------------------------------------------------- bad inputs


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(
        BedsideError, match=r"unsupported architecture 'GPT2LMHeadModel'.*LlamaForCausalLM.*Llava"
    ):
        facts_from_config({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(BedsideError, match="llava-hf"):
        facts_from_config({"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama"})
    with pytest.raises(BedsideError, match="neither"):
        facts_from_config({"hidden_size": 4096})


def test_unsupported_llava_parts():
    with pytest.raises(BedsideError, match="text_config model_type 'phi3'"):
        facts_from_config({"model_type": "llava", "text_config": {"model_type": "phi3"}})
    with pytest.raises(BedsideError, match="vision_config model_type 'siglip_vision_model'"):
        facts_from_config({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}})
    with pytest.raises(BedsideError, match="vision_feature_select_strategy"):
        facts_from_config({"model_type": "llava", "vision_feature_select_strategy": "cls"})
    with pytest.raises(BedsideError, match="outside"):
        facts_from_config({"model_type": "llava", "vision_feature_layer": -40})


def test_bad_values_are_user_errors():
    with pytest.raises(BedsideError, match="'hidden_size' must be a positive integer"):
        facts_from_config({"model_type": "llama", "hidden_size": "4096"})
    with pytest.raises(BedsideError, match="not a multiple of num_key_value_heads"):
        facts_from_config({"model_type": "llama", "num_key_value_heads": 5})
    with pytest.raises(BedsideError, match="'text_config.vocab_size' must be a positive integer"):
        facts_from_config({"model_type": "llava", "text_config": {"vocab_size": -1}})
    with pytest.raises(BedsideError, match="JSON object"):
        facts_from_config(["llama"])


def test_missing_or_malformed_config_names_the_path(tmp_path):
    with pytest.raises(BedsideError, match="not found"):
        read_facts(tmp_path / "nowhere")
    with pytest.raises(BedsideError, match=re.escape(str(tmp_path))):
        read_facts(tmp_path)  # folder without config.json
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(BedsideError, match=re.escape(str(tmp_path / "config.json")) + ".*not valid JSON"):
        read_facts(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(BedsideError, match=re.escape(str(tmp_path / "config.json")) + ".*unsupported"):
        read_facts(tmp_path)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def app():
    app = typer.Typer()
    cli_model.register(app)

    @app.callback()
    def main():  # a callback keeps `inspect` a named subcommand
        pass

    return app


def test_cli_inspect_table(app):
    result = CliRunner().invoke(app, ["inspect", str(FIXTURES / "llava-1.5-7b")], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    for text in ("7,063,427,072", "303,507,456", "20,979,712", "6,476,267,520", "576", "686 tensors"):
        assert text in result.output


def test_cli_inspect_json(app):
    result = CliRunner().invoke(app, ["inspect", str(FIXTURES / "qwen2-0.5b"), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["parameters"]["total"] == 494_032_768
    assert record["parameters"]["lm_head"] == 0 and record["tie_word_embeddings"] is True
    assert record["vision"] is None and record["tensor_count"] == 290


def test_cli_inspect_error_is_a_bedside_error(app, tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert isinstance(result.exception, BedsideError)


def test_multimodal_table_is_keyed_by_class():
    assert set(MULTIMODAL) == {"LlavaForConditionalGeneration"}
