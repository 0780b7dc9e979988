"""The one table of export formats, their quantization schemes and the runtimes that read them.

Every config, exporter, runner, estimator and CLI option refers to these names; nothing restates
them. GGUF schemes carry llama.cpp's file-type number (llama.h `LLAMA_FTYPE_MOSTLY_*`); ONNX schemes
say how the decoder is stored (float graph, or weight-only MatMulNBits with bits and block size).
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.errors import BedsideError

# llama_ftype numbers (llama.h; llama_cpp.LLAMA_FTYPE_MOSTLY_*), largest file first (Llama-3-8B sizes of
# llama.cpp's tools/perplexity/README.md scoreboard). IQ3_XXS and IQ2_M need an importance matrix wherever
# their low-bit types are written (toolkit.compress.quant.ggml_lib.IMATRIX_REQUIRED).
GGUF_FTYPES: dict[str, int] = {
    "F16": 1,  # LLAMA_FTYPE_MOSTLY_F16
    "Q8_0": 7,  # LLAMA_FTYPE_MOSTLY_Q8_0
    "Q6_K": 18,  # LLAMA_FTYPE_MOSTLY_Q6_K
    "Q5_K_M": 17,  # LLAMA_FTYPE_MOSTLY_Q5_K_M
    "Q4_K_M": 15,  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    "Q4_0": 2,  # LLAMA_FTYPE_MOSTLY_Q4_0
    "IQ4_XS": 30,  # LLAMA_FTYPE_MOSTLY_IQ4_XS
    "Q3_K_M": 12,  # LLAMA_FTYPE_MOSTLY_Q3_K_M
    "IQ3_M": 27,  # LLAMA_FTYPE_MOSTLY_IQ3_M
    "IQ3_XXS": 23,  # LLAMA_FTYPE_MOSTLY_IQ3_XXS
    "Q2_K": 10,  # LLAMA_FTYPE_MOSTLY_Q2_K
    "IQ2_M": 29,  # LLAMA_FTYPE_MOSTLY_IQ2_M
}


@dataclass(frozen=True)
class OnnxScheme:
    """How an ONNX scheme stores the decoder.

    Float graphs: every initializer in `float_dtype`. MatMulNBits schemes: linear weights as `bits`-bit
    codes in blocks of `block_size` along K with one scale per block (in `float_dtype`) and, when not
    `symmetric`, one `bits`-bit zero point per block; everything else stays in `float_dtype`.
    """

    float_dtype: str
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool = False


# symmetric=False is MatMulNBitsQuantizer's default (is_symmetric=False) in onnxruntime 1.31; the
# exporter writes what this table says, because the memory estimate's byte count follows it.
# int8 uses block 32 so that its grid and prior match Q8_0; int4 block sizes are in the scheme names.
ONNX_SCHEMES: dict[str, OnnxScheme] = {
    "fp32": OnnxScheme("fp32"),
    "fp16": OnnxScheme("fp16"),
    "int8": OnnxScheme("fp32", bits=8, block_size=32),
    "int4_b32": OnnxScheme("fp32", bits=4, block_size=32),
    "int4_b128": OnnxScheme("fp32", bits=4, block_size=128),
}

# Scheme names per export format, largest first.
FORMATS: dict[str, tuple[str, ...]] = {
    "gguf": tuple(GGUF_FTYPES),
    "onnx": tuple(ONNX_SCHEMES),
}

# Other spellings users type, per format: name -> canonical scheme.
SCHEME_ALIASES: dict[str, dict[str, str]] = {"onnx": {"int4": "int4_b32"}}

# Runtime name -> the formats it reads ("hf" is a Hugging Face checkpoint folder, the torch reference).
RUNTIMES: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("gguf",),
    "onnxruntime": ("onnx",),
    "torch": ("hf",),
}

# The runtime that reads each format (the inverse of RUNTIMES).
FORMAT_RUNTIME: dict[str, str] = {fmt: runtime for runtime, formats in RUNTIMES.items() for fmt in formats}

# Bytes per KV-cache element, largest first (ggml block sizes: q8_0 34 bytes and q4_0 18 bytes per block of 32).
# llama.cpp stores K and V in these types (-ctk/-ctv; llama_context_params.type_k/type_v = GGML_TYPE_<NAME>); a
# quantized V cache needs flash attention. ONNX Runtime keeps the graph's float type (f32 or f16).
KV_CACHE_DTYPES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
QUANTIZED_KV_CACHE_DTYPES: tuple[str, ...] = ("q8_0", "q4_0")


def all_schemes() -> list[str]:
    """Every quantization scheme name of every format."""
    return [scheme for schemes in FORMATS.values() for scheme in schemes]


def allowed_schemes(format_name: str) -> tuple[str, ...]:
    """A format's scheme names followed by its aliases (what a user may type)."""
    return (*FORMATS[format_name], *SCHEME_ALIASES.get(format_name, {}))


def format_of_scheme(scheme: str) -> str | None:
    """The format whose scheme (or alias) `scheme` is, case-insensitively; None when no format has it."""
    for format_name in FORMATS:
        if any(name.lower() == scheme.lower() for name in allowed_schemes(format_name)):
            return format_name
    return None


def resolve_scheme(format_name: str, quant: str) -> tuple[str, str]:
    """Canonical (format, scheme) for the user's spelling; BedsideError listing the allowed values otherwise."""
    fmt = format_name.strip().lower()
    if fmt not in FORMATS:
        raise BedsideError(f"unknown format '{format_name}': choose one of {', '.join(FORMATS)}")
    wanted = SCHEME_ALIASES.get(fmt, {}).get(quant.strip().lower(), quant.strip())
    for scheme in FORMATS[fmt]:
        if scheme.lower() == wanted.lower():
            return fmt, scheme
    raise BedsideError(f"unknown {fmt} scheme '{quant}': choose one of {', '.join(allowed_schemes(fmt))}")


# The vision tower + projector of a LLaVA as each format's exporter writes it: GGUF's mmproj in f16 or q8_0
# (exporters/gguf_mmproj.py; patch and position embeddings stay f16); ONNX's vision graph stays float, fp16 in
# the fp16 scheme and fp32 in every other (exporters/onnx_llava.py). The planner offers only these.
VISION_DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")


def vision_dtypes_for(format_name: str, scheme: str) -> tuple[str, ...]:
    """The vision-tower storage choices an export of `format_name` in `scheme` can produce."""
    if format_name == "gguf":
        return ("f16", "q8_0")
    return ("f16",) if scheme == "fp16" else ("f32",)
