"""Architecture knowledge as data: one table per model family, read by facts, AWQ, pruning, LoRA, export.

Why tables and not code: every later stage asks the same questions of a checkpoint (which tensors
does a decoder layer hold, under which names, which norm feeds which projections, where do the
layers live in a LLaVA) and the answers differ per family only in data. Adding a family is one
entry here; nothing else changes. mlx-lm keeps its `AWQ_MODEL_CONFIGS` the same way.

Conventions
- `defaults` are the values transformers 4.57 fills in when config.json omits a key (read from
  `transformers/models/<family>/configuration_<family>.py`). `None` means "derived": a missing
  `num_key_value_heads` becomes `num_attention_heads`, a missing `head_dim` becomes
  `hidden_size // num_attention_heads`.
- Tensor roles are llama.cpp's GGUF names within one block (`blk.N.attn_q.weight` -> `attn_q`);
  a bias is the weight's role plus `.bias` (`attn_q.bias`). Vision roles follow llama.cpp's clip
  loader (`v.blk.N.attn_out` -> `attn_out`, projector `mm.0`, `mm.2`).
- Tensor shapes are written with symbolic dimensions (`hidden`, `q_dim`, ...) that
  `toolkit.model.facts` resolves from the config, torch layout: Linear weight is (out, in).
- Module and parameter names are those of the model transformers 4.57 builds, relative to one
  decoder layer for layer tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

# ---------------------------------------------------------------------------------------------
# Table row types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRule:
    """One tensor that a block (decoder layer, vision layer) or the model holds.

    `when` names a boolean config key (e.g. `attention_bias`); the tensor exists only when that
    key is true after defaults are filled. `None` means the tensor always exists.
    """

    role: str
    name: str
    dims: tuple[str, ...]
    when: str | None = None


@dataclass(frozen=True)
class ScaleGroup:
    """An AWQ scaling group: linears whose shared input is the output of `prev_op`.

    AWQ divides that input's channels by a scale s and multiplies the linears' input columns by s;
    `prev_op` (a norm, or a linear whose output rows are divided instead) absorbs 1/s.
    `inspect` is the module whose output measures the error of a candidate scale.
    `only_if_same_shape`: the v_proj -> o_proj pair is only foldable when v's output width equals
    o's input width, i.e. without grouped-query attention (AutoAWQ / llm-awq skip it otherwise).
    """

    prev_op: str
    linears: tuple[str, ...]
    inspect: str
    only_if_same_shape: bool = False


@dataclass(frozen=True)
class TextFamily:
    """A decoder-only text family (Llama, Mistral, Qwen2, Gemma, ...)."""

    family: str
    model_type: str
    causal_lm_class: str
    defaults: Mapping[str, object]
    layer_tensors: tuple[TensorRule, ...]
    awq_groups: tuple[ScaleGroup, ...]
    lora_targets: tuple[str, ...]
    # Gemma's RMSNorm multiplies by (1 + weight): folding a scale into it must act on (1 + w).
    norm_weight_offset: float = 0.0
    # The base model (LlamaModel, ...) inside the *ForCausalLM; a LLaVA nests it elsewhere
    # (MultimodalWrapper.text_model_path). Names below are relative to the base model.
    base_model_path: str = "model"
    layers_name: str = "layers"
    embedding_name: str = "embed_tokens.weight"
    final_norm_name: str = "norm.weight"
    lm_head_name: str = "lm_head.weight"  # relative to the whole model

    @property
    def layers_path(self) -> str:
        """Module path of the decoder layers in the *ForCausalLM model (model.layers)."""
        return f"{self.base_model_path}.{self.layers_name}"


@dataclass(frozen=True)
class VisionTower:
    """A vision encoder (CLIP ViT) as a LLaVA-style model embeds it."""

    model_type: str
    defaults: Mapping[str, object]
    embedding_tensors: tuple[TensorRule, ...]  # before the first layer (patch, class, position, pre-norm)
    layer_tensors: tuple[TensorRule, ...]
    final_tensors: tuple[TensorRule, ...]  # after the last layer (post-norm)
    layers_name: str  # relative to the tower module


@dataclass(frozen=True)
class MultimodalWrapper:
    """A vision-language wrapper (LLaVA): a text family + a vision tower + a projector."""

    architecture: str
    model_type: str
    defaults: Mapping[str, object]
    default_text_model_type: str  # text_config given as a dict without model_type
    default_vision_model_type: str  # vision_config given as a dict without model_type
    # vision_config absent altogether: transformers builds this CLIP, not CLIPVisionConfig()'s default
    default_vision_config: Mapping[str, object]
    projector_tensors: tuple[TensorRule, ...]
    # Module paths in the model transformers 4.57 builds
    text_model_path: str  # the text family's base model (its layers are text_model_path.layers)
    vision_tower_path: str
    projector_path: str
    lm_head_name: str
    # Checkpoints saved by older transformers (the llava-hf/* repos: language_model.model.layers...)
    # use other key prefixes; 4.57 renames them on load with these regexes
    # (LlavaForConditionalGeneration._checkpoint_conversion_mapping). Lazy safetensors readers that
    # look tensors up by the names above must apply the same renames.
    checkpoint_key_renames: Mapping[str, str]


def _frozen(mapping: dict[str, object]) -> Mapping[str, object]:
    return MappingProxyType(mapping)


# ---------------------------------------------------------------------------------------------
# Decoder layer tensors, shared building blocks
# ---------------------------------------------------------------------------------------------

_ATTN_NORM = TensorRule("attn_norm", "input_layernorm.weight", ("hidden",))
_FFN_NORM_LLAMA = TensorRule("ffn_norm", "post_attention_layernorm.weight", ("hidden",))


def _attention(q_k_v_bias: str | None, o_bias: str | None) -> tuple[TensorRule, ...]:
    """q, k, v, o projections; `*_bias` is the config flag for the bias ("always" = always there)."""

    def bias(role: str, name: str, dims: tuple[str, ...], flag: str | None) -> tuple[TensorRule, ...]:
        if flag is None:
            return ()
        return (TensorRule(f"{role}.bias", f"{name}.bias", dims, None if flag == "always" else flag),)

    return (
        TensorRule("attn_q", "self_attn.q_proj.weight", ("q_dim", "hidden")),
        *bias("attn_q", "self_attn.q_proj", ("q_dim",), q_k_v_bias),
        TensorRule("attn_k", "self_attn.k_proj.weight", ("kv_dim", "hidden")),
        *bias("attn_k", "self_attn.k_proj", ("kv_dim",), q_k_v_bias),
        TensorRule("attn_v", "self_attn.v_proj.weight", ("kv_dim", "hidden")),
        *bias("attn_v", "self_attn.v_proj", ("kv_dim",), q_k_v_bias),
        TensorRule("attn_output", "self_attn.o_proj.weight", ("hidden", "q_dim")),
        *bias("attn_output", "self_attn.o_proj", ("hidden",), o_bias),
    )


_QK_NORMS = (
    TensorRule("attn_q_norm", "self_attn.q_norm.weight", ("head_dim",)),
    TensorRule("attn_k_norm", "self_attn.k_norm.weight", ("head_dim",)),
)


def _gated_mlp(bias_flag: str | None) -> tuple[TensorRule, ...]:
    rules = [
        TensorRule("ffn_gate", "mlp.gate_proj.weight", ("intermediate", "hidden")),
        TensorRule("ffn_up", "mlp.up_proj.weight", ("intermediate", "hidden")),
        TensorRule("ffn_down", "mlp.down_proj.weight", ("hidden", "intermediate")),
    ]
    if bias_flag is not None:
        rules += [
            TensorRule("ffn_gate.bias", "mlp.gate_proj.bias", ("intermediate",), bias_flag),
            TensorRule("ffn_up.bias", "mlp.up_proj.bias", ("intermediate",), bias_flag),
            TensorRule("ffn_down.bias", "mlp.down_proj.bias", ("hidden",), bias_flag),
        ]
    return tuple(rules)


# Gemma 2 / 3 wrap both sublayers in pre- and post-norms; the MLP's input norm is
# pre_feedforward_layernorm (llama.cpp ffn_norm), post_attention_layernorm normalises the
# attention output before the residual add (llama.cpp post_attention_norm).
_GEMMA2_NORMS_AFTER_ATTENTION = (
    TensorRule("post_attention_norm", "post_attention_layernorm.weight", ("hidden",)),
    TensorRule("ffn_norm", "pre_feedforward_layernorm.weight", ("hidden",)),
)
_GEMMA2_NORM_AFTER_MLP = (TensorRule("post_ffw_norm", "post_feedforward_layernorm.weight", ("hidden",)),)

_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _awq_groups(mlp_norm: str) -> tuple[ScaleGroup, ...]:
    return (
        ScaleGroup(
            "input_layernorm",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "self_attn",
        ),
        ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", only_if_same_shape=True),
        ScaleGroup(mlp_norm, ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
        ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
    )


_LLAMA_AWQ = _awq_groups("post_attention_layernorm")
_GEMMA2_AWQ = _awq_groups("pre_feedforward_layernorm")

# ---------------------------------------------------------------------------------------------
# Text families (defaults: transformers 4.57 configuration_<family>.py __init__ signatures)
# ---------------------------------------------------------------------------------------------

ARCHITECTURES: dict[str, TextFamily] = {
    "llama": TextFamily(
        family="llama",
        model_type="llama",
        causal_lm_class="LlamaForCausalLM",
        defaults=_frozen(
            {
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": None,
                "head_dim": None,
                "max_position_embeddings": 2048,
                "tie_word_embeddings": False,
                "attention_bias": False,
                "mlp_bias": False,
            }
        ),
        layer_tensors=(
            _ATTN_NORM,
            *_attention("attention_bias", "attention_bias"),
            _FFN_NORM_LLAMA,
            *_gated_mlp("mlp_bias"),
        ),
        awq_groups=_LLAMA_AWQ,
        lora_targets=_LORA_TARGETS,
    ),
    "mistral": TextFamily(
        family="mistral",
        model_type="mistral",
        causal_lm_class="MistralForCausalLM",
        defaults=_frozen(
            {
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": None,
                "max_position_embeddings": 4096 * 32,
                "tie_word_embeddings": False,
            }
        ),
        layer_tensors=(_ATTN_NORM, *_attention(None, None), _FFN_NORM_LLAMA, *_gated_mlp(None)),
        awq_groups=_LLAMA_AWQ,
        lora_targets=_LORA_TARGETS,
    ),
    "qwen2": TextFamily(
        family="qwen2",
        model_type="qwen2",
        causal_lm_class="Qwen2ForCausalLM",
        defaults=_frozen(
            {
                "vocab_size": 151936,
                "hidden_size": 4096,
                "intermediate_size": 22016,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "head_dim": None,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": False,
            }
        ),
        # Qwen2Attention hard-codes bias=True on q, k, v and bias=False on o.
        layer_tensors=(_ATTN_NORM, *_attention("always", None), _FFN_NORM_LLAMA, *_gated_mlp(None)),
        awq_groups=_LLAMA_AWQ,
        lora_targets=_LORA_TARGETS,
    ),
    "qwen3": TextFamily(
        family="qwen3",
        model_type="qwen3",
        causal_lm_class="Qwen3ForCausalLM",
        defaults=_frozen(
            {
                "vocab_size": 151936,
                "hidden_size": 4096,
                "intermediate_size": 22016,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "head_dim": 128,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": False,
                "attention_bias": False,
            }
        ),
        layer_tensors=(
            _ATTN_NORM,
            *_attention("attention_bias", "attention_bias"),
            *_QK_NORMS,
            _FFN_NORM_LLAMA,
            *_gated_mlp(None),
        ),
        awq_groups=_LLAMA_AWQ,
        lora_targets=_LORA_TARGETS,
    ),
    "gemma": TextFamily(
        family="gemma",
        model_type="gemma",
        causal_lm_class="GemmaForCausalLM",
        defaults=_frozen(
            {
                "vocab_size": 256000,
                "hidden_size": 3072,
                "intermediate_size": 24576,
                "num_hidden_layers": 28,
                "num_attention_heads": 16,
                "num_key_value_heads": 16,
                "head_dim": 256,
                "max_position_embeddings": 8192,
                "tie_word_embeddings": True,
                "attention_bias": False,
            }
        ),
        layer_tensors=(
            _ATTN_NORM,
            *_attention("attention_bias", "attention_bias"),
            _FFN_NORM_LLAMA,
            *_gated_mlp(None),
        ),
        awq_groups=_LLAMA_AWQ,
        lora_targets=_LORA_TARGETS,
        norm_weight_offset=1.0,
    ),
    "gemma2": TextFamily(
        family="gemma2",
        model_type="gemma2",
        causal_lm_class="Gemma2ForCausalLM",
        defaults=_frozen(
            {
                "vocab_size": 256000,
                "hidden_size": 2304,
                "intermediate_size": 9216,
                "num_hidden_layers": 26,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "max_position_embeddings": 8192,
                "tie_word_embeddings": True,
                "attention_bias": False,
            }
        ),
        layer_tensors=(
            _ATTN_NORM,
            *_attention("attention_bias", "attention_bias"),
            *_GEMMA2_NORMS_AFTER_ATTENTION,
            *_gated_mlp(None),
            *_GEMMA2_NORM_AFTER_MLP,
        ),
        awq_groups=_GEMMA2_AWQ,
        lora_targets=_LORA_TARGETS,
        norm_weight_offset=1.0,
    ),
    "gemma3_text": TextFamily(
        family="gemma3_text",
        model_type="gemma3_text",
        causal_lm_class="Gemma3ForCausalLM",
        defaults=_frozen(
            {
                "vocab_size": 262208,
                "hidden_size": 2304,
                "intermediate_size": 9216,
                "num_hidden_layers": 26,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "head_dim": 256,
                "max_position_embeddings": 131072,
                "tie_word_embeddings": True,
                "attention_bias": False,
            }
        ),
        layer_tensors=(
            _ATTN_NORM,
            *_attention("attention_bias", "attention_bias"),
            *_QK_NORMS,
            *_GEMMA2_NORMS_AFTER_ATTENTION,
            *_gated_mlp(None),
            *_GEMMA2_NORM_AFTER_MLP,
        ),
        awq_groups=_GEMMA2_AWQ,
        lora_targets=_LORA_TARGETS,
        norm_weight_offset=1.0,
    ),
}

# ---------------------------------------------------------------------------------------------
# Vision towers
# ---------------------------------------------------------------------------------------------


def _linear_with_bias(role: str, name: str, out_dim: str, in_dim: str) -> tuple[TensorRule, ...]:
    return (
        TensorRule(role, f"{name}.weight", (out_dim, in_dim)),
        TensorRule(f"{role}.bias", f"{name}.bias", (out_dim,)),
    )


def _layer_norm(role: str, name: str, dim: str) -> tuple[TensorRule, ...]:
    return (
        TensorRule(role, f"{name}.weight", (dim,)),
        TensorRule(f"{role}.bias", f"{name}.bias", (dim,)),
    )


VISION_TOWERS: dict[str, VisionTower] = {
    "clip_vision_model": VisionTower(
        model_type="clip_vision_model",
        # CLIPVisionConfig() defaults (ViT-B/32 at 224): used for keys a given vision_config omits
        defaults=_frozen(
            {
                "hidden_size": 768,
                "intermediate_size": 3072,
                "projection_dim": 512,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "num_channels": 3,
                "image_size": 224,
                "patch_size": 32,
            }
        ),
        # Names relative to the tower (CLIPVisionModel): vision_model.embeddings..., etc.
        embedding_tensors=(
            # Conv2d(num_channels, hidden, kernel=patch, stride=patch, bias=False)
            TensorRule(
                "patch_embd",
                "vision_model.embeddings.patch_embedding.weight",
                ("hidden", "channels", "patch", "patch"),
            ),
            TensorRule("class_embd", "vision_model.embeddings.class_embedding", ("hidden",)),
            TensorRule(
                "position_embd", "vision_model.embeddings.position_embedding.weight", ("positions", "hidden")
            ),
            *_layer_norm("pre_ln", "vision_model.pre_layrnorm", "hidden"),
        ),
        layer_tensors=(
            *_linear_with_bias("attn_q", "self_attn.q_proj", "hidden", "hidden"),
            *_linear_with_bias("attn_k", "self_attn.k_proj", "hidden", "hidden"),
            *_linear_with_bias("attn_v", "self_attn.v_proj", "hidden", "hidden"),
            *_linear_with_bias("attn_out", "self_attn.out_proj", "hidden", "hidden"),
            *_layer_norm("ln1", "layer_norm1", "hidden"),
            *_linear_with_bias("ffn_up", "mlp.fc1", "intermediate", "hidden"),
            *_linear_with_bias("ffn_down", "mlp.fc2", "hidden", "intermediate"),
            *_layer_norm("ln2", "layer_norm2", "hidden"),
        ),
        final_tensors=_layer_norm("post_ln", "vision_model.post_layernorm", "hidden"),
        layers_name="vision_model.encoder.layers",
    ),
}

# ---------------------------------------------------------------------------------------------
# Multimodal wrappers
# ---------------------------------------------------------------------------------------------

MULTIMODAL: dict[str, MultimodalWrapper] = {
    "LlavaForConditionalGeneration": MultimodalWrapper(
        architecture="LlavaForConditionalGeneration",
        model_type="llava",
        defaults=_frozen(
            {
                "image_token_index": 32000,
                "projector_hidden_act": "gelu",
                "vision_feature_select_strategy": "default",
                "vision_feature_layer": -2,
                "image_seq_length": 576,
                "multimodal_projector_bias": True,
            }
        ),
        default_text_model_type="llama",
        default_vision_model_type="clip_vision_model",
        # LlavaConfig(vision_config=None): CLIP ViT-L/14 at 336 px
        default_vision_config=_frozen(
            {
                "model_type": "clip_vision_model",
                "intermediate_size": 4096,
                "hidden_size": 1024,
                "patch_size": 14,
                "image_size": 336,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "vocab_size": 32000,
                "projection_dim": 768,
            }
        ),
        # LlavaMultiModalProjector: linear_1 (vision features -> text hidden), GELU, linear_2.
        # llama.cpp's mmproj calls them mm.0 and mm.2 (index 1 is the activation).
        projector_tensors=(
            TensorRule("mm.0", "linear_1.weight", ("text_hidden", "projector_in")),
            TensorRule("mm.0.bias", "linear_1.bias", ("text_hidden",), "multimodal_projector_bias"),
            TensorRule("mm.2", "linear_2.weight", ("text_hidden", "text_hidden")),
            TensorRule("mm.2.bias", "linear_2.bias", ("text_hidden",), "multimodal_projector_bias"),
        ),
        text_model_path="model.language_model",
        vision_tower_path="model.vision_tower",
        projector_path="model.multi_modal_projector",
        lm_head_name="lm_head.weight",
        checkpoint_key_renames=_frozen(
            {
                r"^language_model.model": "model.language_model",
                r"^vision_tower": "model.vision_tower",
                r"^multi_modal_projector": "model.multi_modal_projector",
                r"^language_model.lm_head": "lm_head",
            }
        ),
    ),
}

# ---------------------------------------------------------------------------------------------
# Look-ups
# ---------------------------------------------------------------------------------------------

_TEXT_BY_CLASS = {family.causal_lm_class: family for family in ARCHITECTURES.values()}
_TEXT_BY_MODEL_TYPE = {family.model_type: family for family in ARCHITECTURES.values()}
_MULTIMODAL_BY_MODEL_TYPE = {wrapper.model_type: wrapper for wrapper in MULTIMODAL.values()}


def supported_architectures() -> list[str]:
    """Class names a config.json may name in `architectures`, text families first."""
    return [family.causal_lm_class for family in ARCHITECTURES.values()] + list(MULTIMODAL)


def text_family_for(architecture: str | None, model_type: str | None) -> TextFamily | None:
    """The text family a config describes, by class name first, then by model_type."""
    if architecture is not None:
        return _TEXT_BY_CLASS.get(architecture)
    return _TEXT_BY_MODEL_TYPE.get(model_type or "")


def text_family_by_model_type(model_type: str) -> TextFamily | None:
    """The text family of a LLaVA `text_config` (which names a model_type, not a class)."""
    return _TEXT_BY_MODEL_TYPE.get(model_type)


def multimodal_wrapper_for(architecture: str | None, model_type: str | None) -> MultimodalWrapper | None:
    """The vision-language wrapper a config describes, by class name first, then by model_type."""
    if architecture is not None:
        return MULTIMODAL.get(architecture)
    return _MULTIMODAL_BY_MODEL_TYPE.get(model_type or "")


def text_family_in(class_name: str | None, model_type: str | None, text_model_type: str | None) -> TextFamily | None:
    """The text family of a whole model, with `base_model_path` where that model nests its decoder.

    A causal LM gets its family as is; a LLaVA gets its language model's family re-rooted at the
    wrapper's `text_model_path`, so `layers_path` and module names of the decoder linears are the
    LLaVA's (model.language_model.layers.N...): quantization and healing then act on the language
    model and leave the vision tower and projector alone.
    """
    wrapper = multimodal_wrapper_for(class_name, model_type) or multimodal_wrapper_for(None, model_type)
    if wrapper is None:
        return text_family_for(class_name, model_type) or text_family_for(None, model_type)
    family = text_family_by_model_type(text_model_type or wrapper.default_text_model_type)
    return None if family is None else replace(family, base_model_path=wrapper.text_model_path)


def lora_target_pattern(family: TextFamily, layers_path: str) -> str:
    """A peft `target_modules` regex that hits the decoder's projections only.

    A plain name list (`["q_proj", ...]`) would also wrap a LLaVA vision tower's CLIP q/k/v
    projections; anchoring on the decoder layers' path keeps LoRA in the language model.
    """
    names = "|".join(family.lora_targets)
    prefix = layers_path.replace(".", r"\.")
    return rf"^{prefix}\.\d+\.(self_attn|mlp)\.({names})$"
