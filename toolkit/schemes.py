"""Export formats and the quantization schemes each supports: the names every config refers to."""

FORMATS: dict[str, tuple[str, ...]] = {
    # llama.cpp file types, largest first
    "gguf": ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M"),
    # ONNX Runtime: float graphs, or weight-only MatMulNBits (bits, block size along the input dim)
    "onnx": ("fp32", "fp16", "int8", "int4_b32", "int4_b128"),
}

RUNTIMES: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("gguf",),
    "onnxruntime": ("onnx",),
    "torch": ("hf",),
}

KV_CACHE_DTYPES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}


def all_schemes() -> list[str]:
    """Every quantization scheme name of every format."""
    return [scheme for schemes in FORMATS.values() for scheme in schemes]
