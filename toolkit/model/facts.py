"""Model facts from config.json alone (no weights): shapes and parameter counts per component.

The interface every planning step reads. Filled by `read_facts(model)`; architecture knowledge
lives in toolkit/model/architectures.py as data tables, so that a 7B model can be planned on a laptop
without loading (or even having) its weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.core.errors import BedsideError
from toolkit.core.records import SCHEMA_VERSION
from toolkit.model.architectures import (
    ARCHITECTURES,
    VISION_TOWERS,
    MultimodalWrapper,
    TensorRule,
    TextFamily,
    multimodal_wrapper_for,
    supported_architectures,
    text_family_by_model_type,
    text_family_for,
)
from toolkit.model.source import resolve_model_dir


@dataclass(frozen=True)
class TensorSpec:
    """One weight tensor, named by its llama.cpp role (token_embd, attn_q, ffn_down, output, ...).

    `shape` is torch's (out_features, in_features) for linear layers, (vocab, hidden) for embeddings,
    (hidden,) for norms. Formats decide per role and shape which type they store it in.
    `name` is the parameter's name in the model transformers 4.57 builds; for tensors of a
    repeated block (decoder layer, vision layer, projector) it is relative to that block.
    """

    role: str
    shape: tuple[int, ...]
    name: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _numel(tensors: tuple[TensorSpec, ...]) -> int:
    return sum(t.numel for t in tensors)


@dataclass(frozen=True)
class VisionFacts:
    """Vision tower (e.g. CLIP ViT) and projector of a LLaVA-style model.

    `tower_params` counts every tensor the checkpoint holds, including the layers after
    `feature_layers` and the post-layernorm that LLaVA never runs: `unused_params` says how many
    of them a pruned tower could drop.
    """

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    image_size: int
    patch_size: int
    tower_params: int
    projector_params: int
    image_tokens_per_image: int
    num_channels: int = 3
    feature_layers: tuple[int, ...] = (-2,)  # as the config gives them (hidden_states indices)
    layers_used: int = 0  # encoder layers that must run to produce the selected features
    unused_params: int = 0  # tower parameters the selected features do not depend on
    select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    embedding_tensors: tuple[TensorSpec, ...] = ()  # names relative to the tower
    layer_tensors: tuple[TensorSpec, ...] = ()  # one encoder layer, names relative to it
    final_tensors: tuple[TensorSpec, ...] = ()  # post-layernorm
    projector_tensors: tuple[TensorSpec, ...] = ()  # names relative to the projector
    tower_path: str = ""
    layers_path: str = ""
    projector_path: str = ""

    @property
    def layer_params(self) -> int:
        return _numel(self.layer_tensors)

    @property
    def tensor_count(self) -> int:
        return (
            len(self.embedding_tensors)
            + len(self.layer_tensors) * self.num_layers
            + len(self.final_tensors)
            + len(self.projector_tensors)
        )


@dataclass(frozen=True)
class ModelFacts:
    """Text decoder (and optional vision part) of a model, as its config describes it."""

    architecture: str  # e.g. LlamaForCausalLM, LlavaForConditionalGeneration
    family: str  # key in toolkit.model.architectures.ARCHITECTURES (llama, mistral, qwen2, gemma, ...)
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    layer_tensors: tuple[TensorSpec, ...]  # one decoder layer (all layers are the same shape)
    global_tensors: tuple[TensorSpec, ...]  # token_embd, output_norm, output (absent when tied)
    vision: VisionFacts | None = None
    extra: dict[str, object] = field(default_factory=dict)
    layers_path: str = "model.layers"  # module path of the decoder layers (transformers 4.57)

    @property
    def layer_params(self) -> int:
        return _numel(self.layer_tensors)

    @property
    def text_params(self) -> int:
        return self.layer_params * self.num_layers + sum(t.numel for t in self.global_tensors)

    @property
    def vision_params(self) -> int:
        return 0 if self.vision is None else self.vision.tower_params + self.vision.projector_params

    @property
    def total_params(self) -> int:
        return self.text_params + self.vision_params

    @property
    def tensor_count(self) -> int:
        """Tensors a checkpoint of this model holds (tied lm_head not stored separately)."""
        text = len(self.layer_tensors) * self.num_layers + len(self.global_tensors)
        return text + (0 if self.vision is None else self.vision.tensor_count)

    def kv_bytes_per_token(self, bytes_per_element: float, num_layers: int | None = None) -> float:
        """K and V for one token across `num_layers` layers: 2 * layers * kv_heads * head_dim * bytes."""
        layers = self.num_layers if num_layers is None else num_layers
        return 2 * layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def global_params(self, role: str) -> int:
        """Parameters of the global tensor with this role (0 when absent, e.g. a tied `output`)."""
        return sum(t.numel for t in self.global_tensors if t.role == role)

    @property
    def norm_params(self) -> int:
        """All normalisation weights of the text model (per-layer and final): tiny, kept in float."""
        per_layer = sum(t.numel for t in self.layer_tensors if t.role.endswith("norm"))
        return per_layer * self.num_layers + self.global_params("output_norm")

    def components(self) -> dict[str, int]:
        """Parameters per component, in model order; the values sum to `total_params`."""
        parts = {
            "embeddings": self.global_params("token_embd"),
            "decoder_layers": self.layer_params * self.num_layers,
            "final_norm": self.global_params("output_norm"),
            "lm_head": self.global_params("output"),
        }
        if self.vision is not None:
            parts["vision_tower"] = self.vision.tower_params
            parts["projector"] = self.vision.projector_params
        return parts

    def to_dict(self) -> dict[str, object]:
        """JSON-ready record: every field, plus the derived counts a reader would otherwise redo."""
        record: dict[str, object] = {"schema_version": SCHEMA_VERSION, "kind": "model_facts"}
        record.update(asdict(self))
        record["parameters"] = {
            **self.components(),
            "decoder_layer": self.layer_params,
            "norms": self.norm_params,
            "vision_unused": 0 if self.vision is None else self.vision.unused_params,
            "total": self.total_params,
        }
        record["tensor_count"] = self.tensor_count
        record["kv_bytes_per_token_f16"] = self.kv_bytes_per_token(2)
        return record


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_facts(model: str | Path) -> ModelFacts:
    """Facts of `model` ("demo" or a local checkpoint folder) from its config.json; no weights read."""
    folder = resolve_model_dir(model)
    path = folder / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise BedsideError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BedsideError(f"{path} is not valid JSON: {error}") from None
    try:
        return facts_from_config(config)
    except BedsideError as error:
        raise BedsideError(f"{path}: {error}") from None


def facts_from_config(config: dict) -> ModelFacts:
    """Facts from a parsed config.json, filling omitted keys the way transformers 4.57 does."""
    if not isinstance(config, dict):
        raise BedsideError(f"config must be a JSON object, got {type(config).__name__}")
    architecture, model_type = _declared_architecture(config)
    wrapper = multimodal_wrapper_for(architecture, model_type)
    if wrapper is not None:
        return _multimodal_facts(config, wrapper)
    family = text_family_for(architecture, model_type)
    if family is None:
        raise _unsupported(architecture or model_type)
    return _text_facts(config, family, family.causal_lm_class, family.base_model_path, family.lm_head_name)


def _declared_architecture(config: Mapping[str, object]) -> tuple[str | None, str | None]:
    """The head class (`architectures[0]`) and `model_type` a config declares, either may be absent."""
    architectures = config.get("architectures")
    architecture: str | None = None
    if isinstance(architectures, list) and architectures:
        if not isinstance(architectures[0], str):
            raise BedsideError(f"'architectures' must list class names, got {architectures!r}")
        architecture = architectures[0]
    elif architectures is not None and not isinstance(architectures, list):
        raise BedsideError(f"'architectures' must be a list of class names, got {architectures!r}")
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise BedsideError(f"'model_type' must be a string, got {model_type!r}")
    if architecture is None and model_type is None:
        raise BedsideError(
            "config names neither 'architectures' nor 'model_type': "
            f"Bedside supports {', '.join(supported_architectures())}"
        )
    return architecture, model_type


def _unsupported(name: str | None) -> BedsideError:
    hint = ""
    if name in ("llava_llama", "LlavaLlamaForCausalLM"):
        hint = (
            " (an original LLaVA repo checkpoint: use its llava-hf conversion, e.g. llava-hf/llava-1.5-7b-hf)"
        )
    return BedsideError(
        f"unsupported architecture '{name}'{hint}: Bedside supports {', '.join(supported_architectures())}"
    )


# ---------------------------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------------------------


def _filled(config: Mapping[str, object], defaults: Mapping[str, object]) -> dict[str, object]:
    """Defaults overlaid with the config's non-null values (a null key means "use the default")."""
    values = dict(defaults)
    values.update({key: value for key, value in config.items() if value is not None})
    return values


def _positive_int(values: Mapping[str, object], key: str, where: str) -> int:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise BedsideError(f"'{where}{key}' must be a positive integer, got {value!r}")
    return value


def _flag(values: Mapping[str, object], key: str, where: str) -> bool:
    value = values.get(key, False)
    if not isinstance(value, bool):
        raise BedsideError(f"'{where}{key}' must be true or false, got {value!r}")
    return value


def _specs(
    rules: tuple[TensorRule, ...], dims: Mapping[str, int], flags: Mapping[str, object], where: str
) -> tuple[TensorSpec, ...]:
    """Resolve table rows into tensors: drop those whose `when` flag is off, fill symbolic dims."""
    return tuple(
        TensorSpec(rule.role, tuple(dims[d] for d in rule.dims), rule.name)
        for rule in rules
        if rule.when is None or _flag(flags, rule.when, where)
    )


# ---------------------------------------------------------------------------------------------
# Text decoder
# ---------------------------------------------------------------------------------------------


def _text_facts(
    config: Mapping[str, object],
    family: TextFamily,
    architecture: str,
    base_model_path: str,
    lm_head_name: str,
    where: str = "",
) -> ModelFacts:
    values = _filled(config, family.defaults)
    hidden = _positive_int(values, "hidden_size", where)
    heads = _positive_int(values, "num_attention_heads", where)
    if values.get("num_key_value_heads") is None:  # transformers: None -> multi-head attention
        values["num_key_value_heads"] = heads
    kv_heads = _positive_int(values, "num_key_value_heads", where)
    if heads % kv_heads:
        raise BedsideError(
            f"{where}num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    if values.get("head_dim") is None:  # transformers: None -> hidden_size // num_attention_heads
        if hidden % heads:
            raise BedsideError(
                f"{where}hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})"
            )
        values["head_dim"] = hidden // heads
    head_dim = _positive_int(values, "head_dim", where)
    dims = {
        "hidden": hidden,
        "intermediate": _positive_int(values, "intermediate_size", where),
        "head_dim": head_dim,
        "q_dim": heads * head_dim,
        "kv_dim": kv_heads * head_dim,
        "vocab": _positive_int(values, "vocab_size", where),
    }
    tied = _flag(values, "tie_word_embeddings", where)
    global_tensors = [
        TensorSpec("token_embd", (dims["vocab"], hidden), f"{base_model_path}.{family.embedding_name}"),
        TensorSpec("output_norm", (hidden,), f"{base_model_path}.{family.final_norm_name}"),
    ]
    if not tied:
        global_tensors.append(TensorSpec("output", (dims["vocab"], hidden), lm_head_name))
    extra: dict[str, object] = {"model_type": family.model_type}
    for key in ("rope_theta", "sliding_window", "rms_norm_eps", "hidden_act", "hidden_activation"):
        if values.get(key) is not None:
            extra[key] = values[key]
    stored = config.get("dtype") or config.get("torch_dtype")
    if isinstance(stored, str):
        extra["dtype"] = stored  # the weights' stored precision (bf16 sources heal in 16 bits when streamed)
    quantization = config.get("quantization_config")
    if isinstance(quantization, Mapping):
        extra["quantization"] = quantization.get("quant_method", "unknown")
    return ModelFacts(
        architecture=architecture,
        family=family.family,
        num_layers=_positive_int(values, "num_hidden_layers", where),
        hidden_size=hidden,
        intermediate_size=dims["intermediate"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=dims["vocab"],
        tie_word_embeddings=tied,
        max_position_embeddings=_positive_int(values, "max_position_embeddings", where),
        layer_tensors=_specs(family.layer_tensors, dims, values, where),
        global_tensors=tuple(global_tensors),
        extra=extra,
        layers_path=f"{base_model_path}.{family.layers_name}",
    )


# ---------------------------------------------------------------------------------------------
# Vision-language (LLaVA)
# ---------------------------------------------------------------------------------------------


def _sub_config(config: Mapping[str, object], key: str) -> dict[str, object] | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BedsideError(f"'{key}' must be a JSON object, got {value!r}")
    return value


def _multimodal_facts(config: Mapping[str, object], wrapper: MultimodalWrapper) -> ModelFacts:
    values = _filled(config, wrapper.defaults)

    text_config = _sub_config(config, "text_config") or {}
    text_type = text_config.get("model_type", wrapper.default_text_model_type)
    family = text_family_by_model_type(str(text_type))
    if family is None:
        raise BedsideError(
            f"unsupported text_config model_type '{text_type}' in {wrapper.architecture}: "
            f"Bedside supports {', '.join(ARCHITECTURES)}"
        )
    text = _text_facts(
        text_config,
        family,
        wrapper.architecture,
        wrapper.text_model_path,
        wrapper.lm_head_name,
        where="text_config.",
    )

    vision_config = _sub_config(config, "vision_config")
    if vision_config is None:
        vision_config = dict(wrapper.default_vision_config)
    vision_type = str(vision_config.get("model_type", wrapper.default_vision_model_type))
    tower = VISION_TOWERS.get(vision_type)
    if tower is None:
        raise BedsideError(
            f"unsupported vision_config model_type '{vision_type}' in {wrapper.architecture}: "
            f"Bedside supports {', '.join(VISION_TOWERS)}"
        )
    where = "vision_config."
    vision_values = _filled(vision_config, tower.defaults)
    num_layers = _positive_int(vision_values, "num_hidden_layers", where)
    image_size = _positive_int(vision_values, "image_size", where)
    patch_size = _positive_int(vision_values, "patch_size", where)
    patches = (image_size // patch_size) ** 2

    feature_layers = _feature_layers(values.get("vision_feature_layer"), num_layers)
    # hidden_states[0] is the embedding output; hidden_states[i] the output of encoder layer i.
    layers_used = max(index if index >= 0 else index + num_layers + 1 for index in feature_layers)
    strategy = values.get("vision_feature_select_strategy")
    if strategy not in ("default", "full"):
        raise BedsideError(f"'vision_feature_select_strategy' must be 'default' or 'full', got {strategy!r}")
    vision_hidden = _positive_int(vision_values, "hidden_size", where)
    dims = {
        "hidden": vision_hidden,
        "intermediate": _positive_int(vision_values, "intermediate_size", where),
        "channels": _positive_int(vision_values, "num_channels", where),
        "patch": patch_size,
        "positions": patches + 1,  # + the class token
        "text_hidden": text.hidden_size,
        "projector_in": vision_hidden * len(feature_layers),
    }
    embedding = _specs(tower.embedding_tensors, dims, vision_values, where)
    layer = _specs(tower.layer_tensors, dims, vision_values, where)
    final = _specs(tower.final_tensors, dims, vision_values, where)
    projector = _specs(wrapper.projector_tensors, dims, values, "")
    vision = VisionFacts(
        model_type=vision_type,
        num_layers=num_layers,
        hidden_size=vision_hidden,
        intermediate_size=dims["intermediate"],
        num_heads=_positive_int(vision_values, "num_attention_heads", where),
        image_size=image_size,
        patch_size=patch_size,
        tower_params=_numel(embedding) + _numel(layer) * num_layers + _numel(final),
        projector_params=_numel(projector),
        # "default" drops the CLS token; "full" keeps it
        image_tokens_per_image=patches + (1 if strategy == "full" else 0),
        num_channels=dims["channels"],
        feature_layers=feature_layers,
        layers_used=layers_used,
        unused_params=_numel(layer) * (num_layers - layers_used) + _numel(final),
        select_strategy=str(strategy),
        projector_hidden_act=str(values.get("projector_hidden_act")),
        embedding_tensors=embedding,
        layer_tensors=layer,
        final_tensors=final,
        projector_tensors=projector,
        tower_path=wrapper.vision_tower_path,
        layers_path=f"{wrapper.vision_tower_path}.{tower.layers_name}",
        projector_path=wrapper.projector_path,
    )
    extra = dict(text.extra)
    extra["text_model_type"] = extra.pop("model_type")
    extra["model_type"] = wrapper.model_type
    extra["image_token_index"] = values.get("image_token_index")
    return ModelFacts(
        architecture=text.architecture,
        family=text.family,
        num_layers=text.num_layers,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_heads=text.num_heads,
        num_kv_heads=text.num_kv_heads,
        head_dim=text.head_dim,
        vocab_size=text.vocab_size,
        tie_word_embeddings=text.tie_word_embeddings,
        max_position_embeddings=text.max_position_embeddings,
        layer_tensors=text.layer_tensors,
        global_tensors=text.global_tensors,
        vision=vision,
        extra=extra,
        layers_path=text.layers_path,
    )


def _feature_layers(value: object, num_layers: int) -> tuple[int, ...]:
    """`vision_feature_layer` as a tuple of hidden_states indices, each checked against the depth."""
    layers = value if isinstance(value, list) else [value]
    if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise BedsideError(f"'vision_feature_layer' must be an integer or a list of integers, got {value!r}")
    for index in layers:
        if not -(num_layers + 1) <= index <= num_layers:
            raise BedsideError(
                f"'vision_feature_layer' {index} is outside the vision tower's {num_layers} layers"
            )
    return tuple(layers)
