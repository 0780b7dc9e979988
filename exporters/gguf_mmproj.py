"""LLaVA vision tower + projector -> llama.cpp "mmproj" GGUF (what libmtmd / clip.cpp loads beside the text GGUF).

Why written here with gguf-py and not through llama.cpp's legacy route (tools/mtmd/legacy-models/llava_surgery_v2.py,
then convert_image_encoder_to_gguf.py --llava-projector ... --clip-model-is-vision), although that route works:

- the surgery script writes `llava.clip` / `llava.projector` into the checkpoint folder itself, and the converter
  then needs a CLIP-only folder (config.json + weights) rebuilt by hand from those pickles: a copy of the
  checkpoint, two pickled intermediates read back with `torch.load`, and three scripts in three processes;
- with `--clip-model-is-vision` the converter reads `vision_feature_layer` from the *vision* config, where llava-hf
  never puts it (it lives in the LLaVA config); without it the file gets `block_count = N-1` and no feature-layer
  key, and this clip.cpp then drops one more layer (llama.cpp #25817: the tower runs one layer short), so the
  feature layer has to be patched into the rebuilt folder; and it takes image mean / std from command-line flags,
  not from the checkpoint's processor;
- it writes f32 / f16 only; a q8_0 tower would need clip.cpp's quantizer, which libmtmd does not export.

The file itself is small and fully specified by what clip.cpp reads, so this module writes exactly what
convert_image_encoder_to_gguf.py writes for a llava-hf checkpoint (same keys, same tensor names, same f16 / f32
split; checked key by key and tensor by tensor against the legacy route's output on the tiny test LLaVA), straight
from the safetensors, in the calling process, with the installed `gguf` package (no code from the model or the
llama.cpp tree is imported). The layout, as clip.cpp (llama-cpp-python 0.3.36) reads it:

- general.architecture "clip", clip.has_vision_encoder / has_llava_projector true, clip.projector_type "mlp",
  clip.vision.{image_size, patch_size, embedding_length, feed_forward_length, projection_dim,
  attention.head_count, attention.layer_norm_epsilon, block_count, image_mean, image_std, feature_layer},
  clip.use_gelu (tower activation "gelu"; CLIP's "quick_gelu" is clip.cpp's default).
- vision_feature_layer: transformers indexes hidden_states (0 = the embeddings after pre-layernorm, i = output of
  encoder layer i-1), so -2 on a tower of N layers is index N-1. clip.cpp (models/llava.cpp) runs layers
  0..max(feature_layer)-1 and takes the hidden state after the last one, so the file gets
  `clip.vision.feature_layer = [N-1]`, `block_count = N-1`, and only those layers' tensors; the post-layernorm,
  which LLaVA never applies, is left out. Several feature layers (concatenated features) work when they are
  ascending, the order clip.cpp stacks them in.
- tensors: v.patch_embd.weight, v.class_embd, v.position_embd.weight, v.pre_ln.*, v.blk.{i}.{attn_q, attn_k,
  attn_v, attn_out, ln1, ln2, ffn_down, ffn_up}.*, mm.0.*, mm.2.*. CLIP's fc1 is named ffn_down and fc2 ffn_up,
  the legacy (swapped) naming: clip.cpp recognises it from ffn_down's width and swaps back. The correct naming
  would be misread whenever intermediate_size == hidden_size, the legacy one never is.
- types: "f16" (default) is the legacy converter's: 4-D and 2-D weights F16, everything else (biases, norms, class
  embedding) F32. "q8_0" additionally stores the 2-D linear weights (attention, MLP, projector) as Q8_0 where the
  row length is a multiple of 32 (F16 otherwise); the patch and position embeddings stay F16, as llama.cpp's
  quantizer leaves them. The same table as toolkit/model/storage_types.vision_tensor_types, so the plan's byte
  count is the file's.

The checkpoint's processor (preprocessor_config.json) is required: its image_mean / image_std go to the keys
clip.cpp normalises with, and the whole file is kept as `bedside.preprocessor_config` so that the llama.cpp runner
can resize and centre-crop the way CLIPImageProcessor does (clip.cpp's own fixed-size LLaVA path letterboxes the
whole image instead, which changes the pixels of any non-square image).
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters.base import ExportError
from toolkit.core.formats import vision_dtypes_for
from toolkit.core.vision import MMPROJ_PREFIX, PROCESSOR_FILE

VISION_DTYPES = vision_dtypes_for("gguf", "")  # f16, q8_0: the planner offers the same (toolkit.core.formats)
FILE_TYPES = {"f16": 1, "q8_0": 7}  # general.file_type: LLAMA_FTYPE_MOSTLY_F16 / MOSTLY_Q8_0
PREPROCESSOR_KEY = "bedside.preprocessor_config"
Q8_0_BLOCK = 32
_UNQUANTIZED = ("v.patch_embd.weight", "v.position_embd.weight")
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def is_llava(config: dict[str, Any]) -> bool:
    """True for a LlavaForConditionalGeneration config (the text part goes to convert_hf_to_gguf.py, the rest here)."""
    return config.get("model_type") == "llava" or "LlavaForConditionalGeneration" in (
        config.get("architectures") or []
    )


def mmproj_file_name(model_file: str | Path, vision_dtype: str) -> str:
    """`mmproj-<model stem>-<vision dtype>.gguf`: the name the llama.cpp runner looks for beside the model GGUF."""
    return f"{MMPROJ_PREFIX}{Path(model_file).stem}-{vision_dtype}.gguf"


@dataclass(frozen=True)
class VisionLayout:
    """What the mmproj needs from a LLaVA config: the tower's sizes and which of its layers run."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    image_size: int
    patch_size: int
    projection_dim: int
    layer_norm_eps: float
    use_gelu: bool
    feature_layers: tuple[int, ...]  # non-negative hidden_states indices, ascending

    @property
    def block_count(self) -> int:
        """Encoder layers clip.cpp runs (and the file keeps): up to the deepest feature layer."""
        return max(self.feature_layers)

    @property
    def image_tokens(self) -> int:
        """Positions one image takes in the language model ("default" strategy: the class token dropped)."""
        return (self.image_size // self.patch_size) ** 2


def vision_layout(config: dict[str, Any]) -> VisionLayout:
    """Read and check the vision part of a LLaVA config; ExportError for what clip.cpp's "mlp" projector cannot run."""
    vision = config.get("vision_config") or {}
    model_type = vision.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise ExportError(
            f"vision tower {model_type!r} is not supported for GGUF (llama.cpp's LLaVA projector takes a CLIP tower)"
        )
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ExportError(
            f"vision_feature_select_strategy {strategy!r} is not supported for GGUF: llama.cpp's LLaVA projector "
            "drops the class token (strategy 'default')"
        )
    projector_act = config.get("projector_hidden_act", "gelu")
    if projector_act != "gelu":
        raise ExportError(
            f"projector_hidden_act {projector_act!r} is not supported for GGUF (llama.cpp applies GELU)"
        )
    tower_act = vision.get("hidden_act", "quick_gelu")
    if tower_act not in ("gelu", "quick_gelu"):
        raise ExportError(
            f"vision tower activation {tower_act!r} is not supported for GGUF (gelu or quick_gelu)"
        )
    layers = int(vision.get("num_hidden_layers", 24))
    requested = config.get("vision_feature_layer", -2)
    requested = [requested] if isinstance(requested, int) else list(requested)
    feature_layers = tuple(layer if layer >= 0 else layers + layer + 1 for layer in requested)
    if not feature_layers or any(not 1 <= layer <= layers for layer in feature_layers):
        raise ExportError(
            f"vision_feature_layer {config.get('vision_feature_layer')!r} is outside the tower's {layers} layers "
            "(or selects the embeddings, which llama.cpp cannot)"
        )
    if list(feature_layers) != sorted(set(feature_layers)):
        raise ExportError(
            f"vision_feature_layer {requested} must be ascending for GGUF (llama.cpp concatenates them in layer order)"
        )
    return VisionLayout(
        hidden_size=int(vision.get("hidden_size", 1024)),
        intermediate_size=int(vision.get("intermediate_size", 4096)),
        num_heads=int(vision.get("num_attention_heads", 16)),
        num_layers=layers,
        image_size=int(vision.get("image_size", 336)),
        patch_size=int(vision.get("patch_size", 14)),
        projection_dim=int(vision.get("projection_dim", 768)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-5)),
        use_gelu=tower_act == "gelu",
        feature_layers=feature_layers,
    )


def read_processor(model_dir: Path) -> dict[str, Any]:
    """preprocessor_config.json of the checkpoint (image_mean / image_std required); ExportError naming the fix."""
    path = model_dir / PROCESSOR_FILE
    try:
        processor = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(
            f"{model_dir} has no {PROCESSOR_FILE} (the image processor: size, crop, mean, std), which the GGUF "
            "vision projector needs: copy it from the checkpoint's original folder"
        ) from None
    except (OSError, ValueError) as error:
        raise ExportError(f"{path} is not valid JSON ({error}): copy the original {PROCESSOR_FILE}") from None
    if not isinstance(processor, dict) or not ("image_mean" in processor and "image_std" in processor):
        raise ExportError(f"{path} lacks image_mean / image_std: copy the original {PROCESSOR_FILE}")
    return processor


class SafetensorsTensors:
    """Tensors of a checkpoint's safetensors files read as float32 numpy (F32, F16, BF16), without torch.

    Only the header of each file is parsed up front; a tensor is read (memory-mapped) when asked for.
    """

    def __init__(self, model_dir: Path) -> None:
        self.entries: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ExportError(
                f"{model_dir} has no *.safetensors: the GGUF vision projector is read from safetensors "
                "(re-save the checkpoint with save_pretrained(safe_serialization=True))"
            )
        for path in files:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                start = 8 + length + int(entry["data_offsets"][0])
                self.entries[name] = (path, start, str(entry["dtype"]), tuple(int(x) for x in entry["shape"]))

    def names(self) -> list[str]:
        return sorted(self.entries)

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 array."""
        path, start, dtype, shape = self.entries[name]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ExportError(
                f"{path.name}: tensor {name} has dtype {dtype}, not a float type the mmproj can take"
            )
        count = int(np.prod(shape)) if shape else 1
        raw = np.fromfile(path, dtype=_SAFETENSORS_DTYPES[dtype], count=count, offset=start).reshape(shape)
        if dtype == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32)


# transformers' CLIP names (after "vision_model.") -> clip.cpp's, as convert_image_encoder_to_gguf.py maps them
_TOWER_NAMES = (
    (re.compile(r"^embeddings\.class_embedding$"), "v.class_embd"),
    (re.compile(r"^embeddings\.patch_embedding\.(weight|bias)$"), r"v.patch_embd.\1"),
    (re.compile(r"^embeddings\.position_embedding\.weight$"), "v.position_embd.weight"),
    (re.compile(r"^pre_layrnorm\.(weight|bias)$"), r"v.pre_ln.\1"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)$"), r"v.blk.\1.attn_q.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)$"), r"v.blk.\1.attn_k.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)$"), r"v.blk.\1.attn_v.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$"), r"v.blk.\1.attn_out.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)$"), r"v.blk.\1.ln1.\2"),
    (re.compile(r"^encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)$"), r"v.blk.\1.ln2.\2"),
    (
        re.compile(r"^encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)$"),
        r"v.blk.\1.ffn_down.\2",
    ),  # legacy naming
    (re.compile(r"^encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)$"), r"v.blk.\1.ffn_up.\2"),
)
_PROJECTOR_NAME = re.compile(r"multi_modal_projector\.linear_([12])\.(weight|bias)$")
_SKIPPED = ("post_layernorm.", "embeddings.position_ids")


def gguf_vision_name(checkpoint_name: str, block_count: int) -> str | None:
    """clip.cpp's name for a checkpoint tensor of the tower or projector; None for tensors the mmproj leaves out
    (the language model, the post-layernorm, layers after the deepest feature layer)."""
    projector = _PROJECTOR_NAME.search(checkpoint_name)
    if projector:
        return f"mm.{0 if projector.group(1) == '1' else 2}.{projector.group(2)}"
    if "vision_tower." not in checkpoint_name or "vision_model." not in checkpoint_name:
        return None
    local = checkpoint_name.split("vision_model.", 1)[1]
    if local.startswith(_SKIPPED):
        return None
    for pattern, replacement in _TOWER_NAMES:
        if pattern.match(local):
            name = pattern.sub(replacement, local)
            layer = re.match(r"v\.blk\.(\d+)\.", name)
            return None if layer and int(layer.group(1)) >= block_count else name
    raise ExportError(
        f"vision tower tensor {checkpoint_name} has no llama.cpp name (not a CLIP layout this writer knows)"
    )


def storage_type(name: str, shape: tuple[int, ...], vision_dtype: str) -> str:
    """GGML type a vision tensor is stored in (the table in the module docstring)."""
    if len(shape) == 4:
        return "F16"
    if len(shape) < 2 or not name.endswith(".weight"):
        return "F32"
    if vision_dtype == "q8_0" and name not in _UNQUANTIZED and shape[-1] % Q8_0_BLOCK == 0:
        return "Q8_0"
    return "F16"


def write_mmproj(
    model_dir: Path,
    config: dict[str, Any],
    target: Path,
    vision_dtype: str = "f16",
    metadata: dict[str, list[Any]] | None = None,
) -> dict[str, Any]:
    """Write the vision tower + projector of the LLaVA at `model_dir` as an mmproj GGUF at `target`.

    `metadata`: extra {key: [kind, value]} pairs (kinds str, u32, i64, f64, bool), e.g. the bedside.* keys of the
    text GGUF. The caller writes `target` inside a scratch folder and renames it into place. Returns the summary
    export.json records: tensor types, counts, block count, feature layers, image tokens.
    """
    import gguf

    if vision_dtype not in VISION_DTYPES:
        raise ExportError(
            f"unknown vision dtype {vision_dtype!r} for the GGUF mmproj; choose one of {', '.join(VISION_DTYPES)}"
        )
    layout = vision_layout(config)
    processor = read_processor(model_dir)
    tensors = SafetensorsTensors(model_dir)
    names = {name: gguf_vision_name(name, layout.block_count) for name in tensors.names()}
    selected = {source: name for source, name in names.items() if name is not None}
    required = {"v.patch_embd.weight", "v.position_embd.weight", "mm.0.weight"} | {
        f"v.blk.{layer}.attn_q.weight" for layer in range(layout.block_count)
    }
    missing = sorted(required - set(selected.values()))
    if missing:
        raise ExportError(f"{model_dir}: the LLaVA checkpoint lacks vision tensors {', '.join(missing[:4])}")

    writer = gguf.GGUFWriter(path=str(target), arch="clip")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_file_type(FILE_TYPES[vision_dtype])
    writer.add_name(str(config.get("_name_or_path") or model_dir.name))
    writer.add_description("image encoder for LLaVA")
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", layout.image_size)
    writer.add_uint32("clip.vision.patch_size", layout.patch_size)
    writer.add_uint32("clip.vision.embedding_length", layout.hidden_size)
    writer.add_uint32("clip.vision.feed_forward_length", layout.intermediate_size)
    writer.add_uint32("clip.vision.projection_dim", layout.projection_dim)
    writer.add_uint32("clip.vision.attention.head_count", layout.num_heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", layout.layer_norm_eps)
    writer.add_uint32("clip.vision.block_count", layout.block_count)
    writer.add_array("clip.vision.feature_layer", list(layout.feature_layers))
    writer.add_array("clip.vision.image_mean", [float(x) for x in processor["image_mean"]])
    writer.add_array("clip.vision.image_std", [float(x) for x in processor["image_std"]])
    writer.add_bool("clip.use_gelu", layout.use_gelu)
    writer.add_string(PREPROCESSOR_KEY, json.dumps(processor, sort_keys=True))
    adders = {"str": writer.add_string, "u32": writer.add_uint32, "i64": writer.add_int64,
              "f64": writer.add_float64, "bool": writer.add_bool}  # fmt: skip
    for key, (kind, value) in (metadata or {}).items():
        adders[kind](key, value)

    types: Counter[str] = Counter()
    for source in sorted(selected, key=lambda s: _tensor_order(selected[s])):
        name = selected[source]
        data = tensors.load(source).squeeze()
        kind = storage_type(name, data.shape, vision_dtype)
        types[kind] += 1
        if kind == "Q8_0":
            quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float16 if kind == "F16" else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "vision_dtype": vision_dtype,
        "tensor_types": dict(types),
        "tensor_count": sum(types.values()),
        "block_count": layout.block_count,
        "tower_layers": layout.num_layers,
        "feature_layers": list(layout.feature_layers),
        "image_tokens": layout.image_tokens,
    }


def _tensor_order(name: str) -> tuple[int, int, str]:
    """Projector first, then embeddings, then layers in order (the legacy converter's order)."""
    if name.startswith("mm."):
        return (0, 0, name)
    layer = re.match(r"v\.blk\.(\d+)\.", name)
    return (2, int(layer.group(1)), name) if layer else (1, 0, name)
