"""Which storage type each tensor gets in each export format and scheme: the tables a byte count relies on.

GGUF (llama.cpp): a reproduction of `llama_tensor_get_type` in vendor/llama.cpp/src/llama-quant.cpp of the
llama-cpp-python 0.3.36 sdist (the llama.cpp Bedside runs), checked tensor by tensor against llama.cpp's own
quantizer (dry run on the demo GGUF, tests/test_memory.py) and against published Llama-2-7B file sizes:

  * only tensors with 2+ dimensions are quantized (`tensor_allows_quantization`); 1-D tensors (norms, biases)
    keep the type the converter wrote, F32 (convert_hf_to_gguf.py writes n_dims <= 1 as F32);
  * every other tensor starts at the file type's default type (`llama_ftype_get_default_type`), then the mix
    rules of `llama_tensor_get_type_impl` raise some of them (tables GGUF_MIXES below);
  * `output` (and `token_embd` when the embeddings are tied) become Q6_K (Q5_K in IQ3_XXS / IQ2_M), or Q8_0 when
    the file type is Q8_0 or the row length is not a multiple of the default type's block;
  * `use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2` picks the layers whose attn_v and ffn_down
    get Q6_K in Q4_K_M / Q5_K_M;
  * some rules depend on grouped-query attention (`n_gqa() = n_head / n_head_kv >= 4`) and on whether an
    importance matrix is given (IQ3_XXS, IQ4_XS, Q4_0); IQ2_M follows the separate branch of the IQ2/IQ1 file
    types (attn_v, ffn_down of the first eighth and attn_output at IQ3_S, untied token_embd at IQ3_S, no 70B
    bump of attn_v);
  * finally `tensor_type_fallback`: a row length not divisible by the type's block (256 for K-quants) demotes
    IQ1_S/IQ1_M/IQ2_*/IQ3_*/IQ4_XS -> IQ4_NL, Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and to
    F16 when even 32 does not divide it. On a hidden size of 576 (the demo model) this is what turns 180 of 272
    tensors of a Q4_K_M into 32-blocks.

ONNX (onnxruntime): float graphs store every initializer as fp32 or fp16. Weight-only schemes replace each
MatMul with a constant weight by com.microsoft.MatMulNBits (onnxruntime.quantization.matmul_nbits_quantizer):
  B packed uint8 [N, n_blocks, block*bits/8], scales [N * n_blocks] in the graph's float type,
  zero_points (asymmetric only) uint8 [N * ceil(n_blocks * bits / 8)], with n_blocks = ceil(K / block)
  (ORT contrib-op spec, MatMulNBits). The embedding Gather stays float; a tied lm_head is exported as
  Transpose(embedding) and is not quantized ("MatMul doesn't have const weight", see docs/ENVIRONMENT.md,
  section "ONNX export and int4 on the demo model");
  an untied lm_head is an ordinary MatMul and is quantized.
"""

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from toolkit.core.formats import FORMATS, ONNX_SCHEMES, VISION_DTYPES
from toolkit.model.facts import ModelFacts, TensorSpec, VisionFacts
from toolkit.model.ggml_types import ggml_type

# ---------------------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------------------


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of layers, and every third one in between.

    i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2   (C integer division)
    """
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


# Conditions a mix rule can carry, on (index of this tensor among its category, count of that category,
# imatrix given, n_gqa = n_head / n_head_kv).
_CONDITIONS: dict[str, Callable[[int, int, bool, int], bool]] = {
    "always": lambda i, n, imatrix, gqa: True,
    "use_more_bits": lambda i, n, imatrix, gqa: use_more_bits(i, n),
    "first_two": lambda i, n, imatrix, gqa: i < 2,  # Q3_K_M attn_v: qs.i_attention_wv < 2
    "first_sixteenth": lambda i, n, imatrix, gqa: i < n // 16,  # Q3_K_M ffn_down: i_layer < n_layer/16
    "first_eighth": lambda i, n, imatrix, gqa: i < n // 8,  # IQ3_M / IQ2_M ffn_down
    "imatrix_first_eighth": lambda i, n, imatrix, gqa: imatrix and i < n // 8,  # Q4_0 ffn_down with imatrix
    "no_imatrix": lambda i, n, imatrix, gqa: not imatrix,  # IQ3_XXS attn_v, ffn_down
    # IQ4_XS, IQ3_XXS ffn_down without an importance matrix
    "no_imatrix_first_eighth": lambda i, n, imatrix, gqa: not imatrix and i < n // 8,
    "gqa4": lambda i, n, imatrix, gqa: gqa >= 4,  # qs.model.hparams.n_gqa() >= 4
}


@dataclass(frozen=True)
class GgufMix:
    """One llama.cpp file type (ftype): its default tensor type and the per-category rules that override it.

    `rules[category]` is a tuple of (condition, ggml type); the first condition that holds wins.
    `quantized` is False for F16: llama.cpp skips its type-selection logic for a non-quantized default.
    `output`: the type of `output` (and of a tied `token_embd`) when its row holds whole blocks of the default
    type (else Q8_0). `bump_70b`: LLM_TYPE_70B raises a Q3_K/Q4_K attn_v to Q5_K (not in the IQ2/IQ1 branch).
    """

    default: str
    quantized: bool = True
    rules: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    output: str = "Q6_K"
    bump_70b: bool = True

    def rule(self, category: str) -> tuple[tuple[str, str], ...]:
        return dict(self.rules).get(category, ())


# llama-quant.cpp, llama_tensor_get_type_impl, for the schemes Bedside offers (toolkit.core.formats.FORMATS["gguf"]).
GGUF_MIXES: dict[str, GgufMix] = {
    "F16": GgufMix(default="F16", quantized=False),
    "Q8_0": GgufMix(default="Q8_0", output="Q8_0"),
    "Q6_K": GgufMix(default="Q6_K"),
    "Q5_K_M": GgufMix(
        default="Q5_K",
        rules=(
            ("attn_v", (("use_more_bits", "Q6_K"),)),
            ("ffn_down", (("use_more_bits", "Q6_K"),)),
        ),
    ),
    "Q4_K_M": GgufMix(
        default="Q4_K",
        rules=(
            ("attn_v", (("use_more_bits", "Q6_K"),)),
            ("ffn_down", (("use_more_bits", "Q6_K"),)),
        ),
    ),
    "Q4_0": GgufMix(
        default="Q4_0",
        rules=(("ffn_down", (("imatrix_first_eighth", "Q4_1"),)),),
    ),
    "Q3_K_M": GgufMix(
        default="Q3_K",
        rules=(
            ("attn_v", (("first_two", "Q5_K"), ("always", "Q4_K"))),
            ("ffn_down", (("first_sixteenth", "Q5_K"), ("always", "Q4_K"))),  # non-Falcon branch
            ("attn_output", (("always", "Q4_K"),)),
        ),
    ),
    "IQ4_XS": GgufMix(
        default="IQ4_XS",
        rules=(
            ("attn_v", (("gqa4", "Q5_K"),)),
            ("ffn_down", (("no_imatrix_first_eighth", "Q5_K"),)),
        ),
    ),
    "IQ3_M": GgufMix(
        default="IQ3_S",
        rules=(
            ("attn_v", (("always", "Q4_K"),)),
            ("ffn_down", (("first_eighth", "Q4_K"),)),  # the n_expert == 8 branch is not modelled
            ("attn_output", (("always", "Q4_K"),)),
        ),
    ),
    "IQ3_XXS": GgufMix(
        default="IQ3_XXS",
        output="Q5_K",
        rules=(
            ("token_embd", (("always", "IQ3_S"),)),  # untied only; a tied one follows `output`
            ("attn_v", (("gqa4", "Q4_K"), ("no_imatrix", "IQ3_S"))),
            ("attn_k", (("always", "IQ2_S"),)),
            ("attn_q", (("always", "IQ2_S"),)),
            ("ffn_down", (("no_imatrix_first_eighth", "Q4_K"), ("no_imatrix", "Q3_K"))),
            ("attn_output", (("always", "IQ3_S"),)),
        ),
    ),
    "Q2_K": GgufMix(
        default="Q2_K",
        rules=(
            ("attn_v", (("gqa4", "Q4_K"), ("always", "Q3_K"))),
            ("ffn_down", (("always", "Q3_K"),)),
            ("attn_output", (("always", "Q3_K"),)),
        ),
    ),
    # the IQ2_XXS / IQ2_XS / IQ2_S / IQ2_M / IQ1_S / IQ1_M branch (n_expert rules not modelled)
    "IQ2_M": GgufMix(
        default="IQ2_S",
        output="Q5_K",
        bump_70b=False,
        rules=(
            ("token_embd", (("always", "IQ3_S"),)),
            ("attn_v", (("gqa4", "Q4_K"), ("always", "IQ3_S"))),
            ("ffn_down", (("first_eighth", "IQ3_S"),)),
            ("attn_output", (("always", "IQ3_S"),)),
        ),
    ),
}

# tensor_type_fallback: a 256-block type whose row length is not a multiple of 256 becomes a 32-block type.
GGUF_FALLBACK: dict[str, str] = {
    **{iq: "IQ4_NL" for iq in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS")},
    "TQ1_0": "Q4_0",
    "TQ2_0": "Q4_0",
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

# Type of the output matrix (and of token_embd when tied): GgufMix.output (Q6_K in most mixes), or
GGUF_OUTPUT_TYPE_SMALL_ROWS = "Q8_0"  # when the row is not a multiple of the default type's block
GGUF_UNQUANTIZED_TYPE = "F32"  # 1-D tensors as convert_hf_to_gguf.py writes them


def gguf_category(role: str) -> str:
    """llama.cpp's `tensor_get_category` on a role name (substring tests, in llama.cpp's order)."""
    if role == "output":
        return "output"
    if role in ("token_embd", "per_layer_token_embd"):
        return "token_embd"
    for needle, category in (
        ("attn_qkv", "attn_v"),  # category_is_attn_v() covers ATTENTION_QKV and ATTENTION_KV_B
        ("attn_kv_b", "attn_v"),
        ("attn_v", "attn_v"),
        ("attn_k", "attn_k"),
        ("attn_q", "attn_q"),
        ("attn_output", "attn_output"),
        ("ffn_up", "ffn_up"),
        ("ffn_gate", "ffn_gate"),
        ("ffn_down", "ffn_down"),
    ):
        if needle in role:
            return category
    return "other"


def gguf_fallback(type_name: str, ncols: int) -> str:
    """llama.cpp's tensor_type_fallback: demote a type whose block does not divide the row length."""
    if ggml_type(type_name).fits_row(ncols):
        return type_name
    demoted = GGUF_FALLBACK.get(type_name, type_name)  # 32-block types stay, then the F16 check below
    if not ggml_type(demoted).fits_row(ncols):
        return "F16"
    return demoted


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of the exported model with the type it is stored in and its size."""

    name: str  # GGUF-style name: blk.{layer}.{role}.weight, token_embd.weight, output.weight
    role: str
    layer: int | None  # index among the kept layers (file order); None for global tensors
    shape: tuple[int, ...]
    dtype: str  # ggml type name (Q4_K, F32, ...) or ONNX storage (fp32, fp16, int4_b32, ...)
    nbytes: int


def _is_llama_70b(facts: ModelFacts, n_layers: int) -> bool:
    """llama-model.cpp: a Llama-architecture model with 80 layers and GQA is LLM_TYPE_70B."""
    return facts.family == "llama" and n_layers == 80 and facts.num_kv_heads != facts.num_heads


def gguf_tensor_types(
    facts: ModelFacts,
    quant: str,
    kept_layers: int | None = None,
    imatrix: bool = False,
    n_layer_all: int | None = None,
) -> list[StoredTensor]:
    """Every text tensor of a GGUF of `facts` with `kept_layers` decoder layers, typed as llama.cpp writes it.

    bytes(tensor) = rows * ncols / block(type) * bytes_per_block(type)   (toolkit.model.ggml_types)

    `n_layer_all` is the block count in the source GGUF's metadata, which llama.cpp uses as the ffn_down count
    (init_quantize_state_counters). A GGUF converted from a pruned checkpoint (Bedside's path) has
    n_layer_all = kept_layers, the default; llama.cpp's own `prune_layers` keeps the unpruned count there.
    """
    if quant not in GGUF_MIXES:
        raise KeyError(f"no GGUF type table for {quant!r}; known: {', '.join(GGUF_MIXES)}")
    mix = GGUF_MIXES[quant]
    n_layers = facts.num_layers if kept_layers is None else kept_layers
    tied = not any(t.role == "output" for t in facts.global_tensors)
    is_70b = _is_llama_70b(facts, n_layers) and mix.bump_70b
    gqa = facts.num_heads // facts.num_kv_heads if facts.num_kv_heads else 0
    counters: dict[str, int] = {}

    def choose(spec: TensorSpec, layer: int | None) -> str:
        if len(spec.shape) < 2:
            return GGUF_UNQUANTIZED_TYPE
        if not mix.quantized:
            return mix.default
        ncols = spec.shape[-1]
        category = gguf_category(spec.role)
        new_type = mix.default
        if category == "output" or (tied and category == "token_embd"):
            if not ggml_type(mix.default).fits_row(ncols):
                new_type = GGUF_OUTPUT_TYPE_SMALL_ROWS
            else:
                new_type = mix.output
        elif category in ("attn_v", "ffn_down"):
            index = counters.get(category, 0)
            counters[category] = index + 1
            # one attn_v per kept layer (n_attention_wv counts tensors); ffn_down uses hparams.n_layer_all
            count = n_layers if category == "attn_v" or n_layer_all is None else n_layer_all
            for condition, type_name in mix.rule(category):
                if _CONDITIONS[condition](index, count, imatrix, gqa):
                    new_type = type_name
                    break
            if category == "attn_v" and is_70b and new_type in ("Q3_K", "Q4_K"):
                new_type = "Q5_K"
        else:
            for condition, type_name in mix.rule(category):
                if _CONDITIONS[condition](0, n_layers, imatrix, gqa):
                    new_type = type_name
                    break
        return gguf_fallback(new_type, ncols)

    def stored(spec: TensorSpec, name: str, layer: int | None) -> StoredTensor:
        dtype = choose(spec, layer)
        return StoredTensor(
            name, spec.role, layer, spec.shape, dtype, ggml_type(dtype).tensor_bytes(spec.shape)
        )

    tensors: list[StoredTensor] = []
    globals_by_role = {t.role: t for t in facts.global_tensors}
    if "token_embd" in globals_by_role:
        tensors.append(stored(globals_by_role["token_embd"], "token_embd.weight", None))
    for layer in range(n_layers):
        for spec in facts.layer_tensors:
            tensors.append(stored(spec, f"blk.{layer}.{spec.role}.weight", layer))
    for spec in facts.global_tensors:
        if spec.role != "token_embd":
            tensors.append(stored(spec, f"{spec.role}.weight", None))
    return tensors


# ---------------------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------------------

ONNX_FLOAT_BYTES: dict[str, int] = {"fp32": 4, "fp16": 2}


@dataclass(frozen=True)
class MatMulNBitsBytes:
    """The three initializers of one MatMulNBits weight, in bytes."""

    packed: int
    scales: int
    zero_points: int

    @property
    def total(self) -> int:
        return self.packed + self.scales + self.zero_points


def matmul_nbits_bytes(
    n: int, k: int, bits: int, block_size: int, scale_bytes: int, symmetric: bool
) -> MatMulNBitsBytes:
    """Bytes of a [K -> N] MatMulNBits weight (ORT contrib-op spec).

    n_blocks = ceil(K / block); packed = N * n_blocks * block * bits / 8; scales = N * n_blocks * scale_bytes;
    zero_points = N * ceil(n_blocks * bits / 8) when asymmetric, else 0.
    """
    n_blocks = math.ceil(k / block_size)
    packed = n * n_blocks * block_size * bits // 8
    scales = n * n_blocks * scale_bytes
    zero_points = 0 if symmetric else n * math.ceil(n_blocks * bits / 8)
    return MatMulNBitsBytes(packed, scales, zero_points)


def onnx_quantizes(role: str, shape: tuple[int, ...]) -> bool:
    """MatMul weights with a constant 2-D initializer: every linear of the decoder and an untied lm_head.

    The embedding is a Gather (stays float); norms and biases are 1-D.
    """
    return len(shape) == 2 and role not in ("token_embd", "per_layer_token_embd")


def onnx_tensor_types(facts: ModelFacts, quant: str, kept_layers: int | None = None) -> list[StoredTensor]:
    """Every text initializer of an ONNX export of `facts`, typed per ONNX_SCHEMES[quant]."""
    if quant not in ONNX_SCHEMES:
        raise KeyError(f"no ONNX type table for {quant!r}; known: {', '.join(ONNX_SCHEMES)}")
    scheme = ONNX_SCHEMES[quant]
    float_bytes = ONNX_FLOAT_BYTES[scheme.float_dtype]
    n_layers = facts.num_layers if kept_layers is None else kept_layers

    def stored(spec: TensorSpec, name: str, layer: int | None) -> StoredTensor:
        if (
            scheme.bits is not None
            and scheme.block_size is not None
            and onnx_quantizes(spec.role, spec.shape)
        ):
            n, k = spec.shape
            size = matmul_nbits_bytes(n, k, scheme.bits, scheme.block_size, float_bytes, scheme.symmetric)
            return StoredTensor(name, spec.role, layer, spec.shape, quant, size.total)
        return StoredTensor(name, spec.role, layer, spec.shape, scheme.float_dtype, spec.numel * float_bytes)

    tensors = [stored(t, f"{t.role}.weight", None) for t in facts.global_tensors if t.role == "token_embd"]
    for layer in range(n_layers):
        tensors.extend(stored(spec, f"blk.{layer}.{spec.role}.weight", layer) for spec in facts.layer_tensors)
    tensors.extend(
        stored(t, f"{t.role}.weight", None) for t in facts.global_tensors if t.role != "token_embd"
    )
    return tensors


# ---------------------------------------------------------------------------------------------------------
# Both formats
# ---------------------------------------------------------------------------------------------------------

TYPE_TABLES: dict[str, dict[str, object]] = {
    "gguf": dict(GGUF_MIXES),
    "onnx": dict(ONNX_SCHEMES),
}


def has_type_table(format_name: str, quant: str) -> bool:
    """Whether the byte count of `format_name`/`quant` is known (every scheme in toolkit.core.formats must be)."""
    return quant in TYPE_TABLES.get(format_name, {})


def tensor_types(
    facts: ModelFacts, format_name: str, quant: str, kept_layers: int | None = None, imatrix: bool = False
) -> list[StoredTensor]:
    """The text model's tensors as `format_name` stores them under scheme `quant`."""
    if format_name not in FORMATS:
        raise KeyError(f"unknown format {format_name!r}; known: {', '.join(FORMATS)}")
    if format_name == "gguf":
        return gguf_tensor_types(facts, quant, kept_layers, imatrix)
    if format_name == "onnx":
        return onnx_tensor_types(facts, quant, kept_layers)
    raise KeyError(f"no type table for format {format_name!r}")


# Vision tower + projector (a GGUF "mmproj" or the ONNX vision graph). llama.cpp's legacy LLaVA converter
# (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py) drops the encoder layers after the selected feature
# layer, writes 4-D tensors and 2-D weights in f16 and everything else (biases, norms, class embedding) in f32;
# llama-quantize then leaves ".patch_embd" and ".position_embd" unquantized (tensor_allows_quantization).
# ONNX: "f32" / "f16" store every initializer in that float; "q8_0" would mean MatMulNBits int8 block 32 (fp16
# scales, asymmetric) on the 2-D linear weights (counted, but no exporter writes it: toolkit.core.formats.
# vision_dtypes_for says which choices an export produces).
VISION_UNQUANTIZED_ROLES = ("patch_embd", "position_embd")


def _synthesized_vision_layer(vision: VisionFacts) -> tuple[TensorSpec, ...]:
    """A CLIP encoder layer from the sizes alone, for VisionFacts built without tensor lists."""
    h, i = vision.hidden_size, vision.intermediate_size
    specs = []
    for role, shape in (
        ("attn_q", (h, h)),
        ("attn_k", (h, h)),
        ("attn_v", (h, h)),
        ("attn_out", (h, h)),
        ("ffn_up", (i, h)),
        ("ffn_down", (h, i)),
    ):
        specs += [TensorSpec(role, shape), TensorSpec(f"{role}.bias", (shape[0],))]
    specs += [TensorSpec(n, (h,)) for n in ("ln1", "ln1.bias", "ln2", "ln2.bias")]
    return tuple(specs)


def vision_tensor_specs(vision: VisionFacts) -> list[tuple[str, TensorSpec]]:
    """(name, spec) of every vision tensor an export keeps: embeddings, the layers that run, projector.

    Layers after the selected feature layer (`layers_used`) and the unused post-layernorm are dropped.
    """
    layer = vision.layer_tensors or _synthesized_vision_layer(vision)
    layers = vision.layers_used or vision.num_layers
    specs = [(f"v.{t.role}", t) for t in vision.embedding_tensors]
    if not vision.embedding_tensors:
        patches = (vision.image_size // vision.patch_size) ** 2
        h = vision.hidden_size
        specs += [
            (
                "v.patch_embd",
                TensorSpec("patch_embd", (h, vision.num_channels, vision.patch_size, vision.patch_size)),
            ),
            ("v.class_embd", TensorSpec("class_embd", (h,))),
            ("v.position_embd", TensorSpec("position_embd", (patches + 1, h))),
        ]
    for index in range(layers):
        specs += [(f"v.blk.{index}.{t.role}", t) for t in layer]
    if vision.unused_params == 0:
        specs += [(f"v.{t.role}", t) for t in vision.final_tensors]
    if vision.projector_tensors:
        specs += [(t.role, t) for t in vision.projector_tensors]
    elif vision.projector_params:
        specs.append(
            ("mm", TensorSpec("mm", (vision.projector_params,)))
        )  # sizes unknown: count as 1-D float
    return specs


def vision_tensor_types(vision: VisionFacts, format_name: str, vision_dtype: str) -> list[StoredTensor]:
    """Every vision tensor with its stored type and bytes.

    GGUF: 1-D -> F32; patch/position embeddings and 4-D -> F16; other 2-D weights -> F16 or Q8_0 (f32: all F32).
    ONNX: f32 / f16 -> that float everywhere; q8_0 -> 2-D linear weights as MatMulNBits(8 bits, block 32, fp16
    scales, zero points), the rest fp16.
    """
    if vision_dtype not in VISION_DTYPES:
        raise KeyError(f"unknown vision dtype {vision_dtype!r}; known: {', '.join(VISION_DTYPES)}")
    if format_name not in ("gguf", "onnx"):
        raise KeyError(f"no vision type table for format {format_name!r}")
    tensors = []
    for name, spec in vision_tensor_specs(vision):
        linear = len(spec.shape) == 2 and spec.role not in VISION_UNQUANTIZED_ROLES
        if vision_dtype == "f32":
            dtype, nbytes = ("F32" if format_name == "gguf" else "fp32"), spec.numel * 4
        elif format_name == "gguf":
            if len(spec.shape) < 2:
                dtype = "F32"
            elif linear and vision_dtype == "q8_0":
                dtype = gguf_fallback("Q8_0", spec.shape[-1])
            else:
                dtype = "F16"
            nbytes = ggml_type(dtype).tensor_bytes(spec.shape)
        elif linear and vision_dtype == "q8_0":
            dtype = "int8"
            nbytes = matmul_nbits_bytes(spec.shape[0], spec.shape[1], 8, 32, 2, symmetric=False).total
        else:
            dtype, nbytes = "fp16", spec.numel * 2
        tensors.append(StoredTensor(name, spec.role, None, spec.shape, dtype, nbytes))
    return tensors


def vision_weight_bytes(vision: VisionFacts, format_name: str, vision_dtype: str) -> dict[str, int]:
    """Bytes of the vision tower + projector per storage type (sum of vision_tensor_types)."""
    return dict(_vision_weight_bytes(vision, format_name, vision_dtype))


@functools.lru_cache(maxsize=64)
def _vision_weight_bytes(
    vision: VisionFacts, format_name: str, vision_dtype: str
) -> tuple[tuple[str, int], ...]:
    totals: dict[str, int] = {}
    for tensor in vision_tensor_types(vision, format_name, vision_dtype):
        totals[tensor.dtype] = totals.get(tensor.dtype, 0) + tensor.nbytes
    return tuple(sorted(totals.items()))
