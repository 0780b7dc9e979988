"""GGUF files on llama.cpp through llama-cpp-python 0.3.36.

The model is loaded with `llama_cpp.Llama` (tokenizer, metadata, chat template, context), but
tokens are evaluated through llama.cpp's public C API (`llama_batch` + `llama_decode` +
`llama_get_logits`) rather than `Llama.eval`: that lets one context serve generation and scoring
alike (logits of every position of a batch on demand), with no `logits_all=True` buffer of
n_ctx x vocab floats. Scoring memory is then one batch of logits, and the context keeps the
memory a deployment has.

AMX crash guard: llama.cpp's AMX backend (CPU builds with -march=native on CPUs with AMX)
segfaults on batched decode of quantized weights (upstream #20824). When the loaded library
reports AMX, the runner loads models with `use_extra_bufts=False` (no AMX/repack buffers), a
field of `llama_model_params` that the 0.3.36 `Llama(...)` signature does not expose; on other
builds it keeps the repack buffers, which speed up Q4_0/Q4_K on AVX2. The test suite proves
batched quantized decode on the machine it runs on.

No mmap with repack buffers: llama.cpp reads a repacked tensor's file pages to build its interleaved
copy, and with the file mapped those pages stay resident beside the copy, so the weights count twice.
Reading the file instead (`use_mmap=False`) keeps one copy: the demo at Q4_0, context 512, peaked at
235.9 MiB mapped vs 179.8 read, with the repack's prefill speed kept (`python -m bench.mmap_repack`,
docs/RUNTIMES.md "llama.cpp: mmap and CPU repack"). Mapped files stay the default where nothing is
repacked (GPU offload, AMX builds).

GPU: layers are offloaded (`n_gpu_layers=-1`) when the build supports offload
(`llama_supports_gpu_offload()`) and the device is CUDA; a CPU-only build reports device "cpu".

KV cache and placement (a plan's choices, runtime.json's settings; `runner_options` maps one to the other):
`kv_cache_dtype` f16 (llama.cpp's default), q8_0 or q4_0 is passed as type_k and type_v (the GGML_TYPE_*
numbers of llama_cpp); a quantized V cache needs flash attention, so `flash_attn` None turns it on for a
quantized cache and on CUDA (what llama.cpp's own LLAMA_FLASH_ATTN_TYPE_AUTO does and the memory estimate
assumes; llama-cpp-python's `Llama(flash_attn=False)` default would refuse a quantized V cache). `kv_offload`
False keeps the KV cache in host memory (offload_kqv = false); `gpu_layers` N is llama.cpp's n_gpu_layers (the
output head and the last N - 1 layers on the GPU), None every layer. On CPU-only runs the placement options
have nothing to place and are ignored.

Images (a LLaVA exported by `bedside export`: the text GGUF plus `mmproj-*.gguf` beside it, see
exporters/gguf_mmproj.py): the vision tower + projector runs in libmtmd, the multimodal library the 0.3.36 wheel
ships (`llama_cpp.mtmd_cpp`). The runner loads the mmproj beside the model automatically (or the file named by
`mmproj`), encodes an image with `mtmd_encode_chunk`, and appends the projected features to the KV cache itself as
a `llama_batch` of embeddings at positions n_past.. (plain 1-D positions, causal, as LlavaForConditionalGeneration
places them), with the logits of the last image position kept; `mtmd_helper_eval_chunk_single` would decode the
same batch but keeps no logits for an image. Pixels: when the mmproj carries `bedside.preprocessor_config`, the
image is resized (shortest edge) and centre-cropped by runtimes/image.py exactly as CLIPImageProcessor does and
handed to clip.cpp at the tower's size, so clip.cpp only normalises it; clip.cpp's own LLaVA preprocessing
letterboxes the whole image to a square instead (used for mmproj files from elsewhere).

Upstream defect worked around (llama.cpp #25814, fix proposed in #25844): the LLaVA graph of this libmtmd
(tools/mtmd/models/llava.cpp) concatenates the class embedding after the patch embeddings, while the position
embeddings and the selected output rows still assume it first: every patch gets its neighbour's position
embedding, patch 0's output is dropped and the [CLS] output reaches the language model. On the tiny test LLaVA
that moved the projected features by 1.56 (their own range is 1.56). The runner passes libmtmd an eval callback
that, for the one CONCAT node whose second source is `v.class_embd`, rotates the rows so the class embedding
comes first, which is the upstream fix's layout; the features then match transformers to 1e-3 (f16 weights).
A build that concatenates in the right order has `v.class_embd` as the first source and is left alone.
`details["vision_cls_fix"]` says whether the callback fired.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from runtimes.image import open_rgb, preprocess
from runtimes.registry import model_ggufs, register_runner, require_format
from runtimes.results import RuntimeLoadError
from runtimes.runner import Message, Runner, render_chat_template
from toolkit.core.formats import KV_CACHE_DTYPES, QUANTIZED_KV_CACHE_DTYPES
from toolkit.core.vision import MMPROJ_PREFIX

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)  # what llama.cpp reads (version 1 had 32-bit counts and is refused there too)
GGML_MAX_DIMS = 4
# GGUF metadata value types: id -> (name, struct format); 8 (string) and 9 (array) are variable-sized.
_SCALAR_TYPES = {
    0: ("uint8", "<B"),
    1: ("int8", "<b"),
    2: ("uint16", "<H"),
    3: ("int16", "<h"),
    4: ("uint32", "<I"),
    5: ("int32", "<i"),
    6: ("float32", "<f"),
    7: ("bool", "<?"),
    10: ("uint64", "<Q"),
    11: ("int64", "<q"),
    12: ("float64", "<d"),
}
_STRING, _ARRAY = 8, 9
_TYPE_NAMES = {**{i: name for i, (name, _) in _SCALAR_TYPES.items()}, _STRING: "string", _ARRAY: "array"}
# Bounds no GGUF writer comes near: beyond them a count or length is corrupted, not cut off.
MAX_COUNT = 1 << 24  # metadata keys or tensors (real files: tens of keys, hundreds of tensors)
MAX_ARRAY_ITEMS = 1 << 26  # items of one metadata array (a 256k-token vocabulary is 1 << 18)
MAX_STRING_BYTES = 1 << 30  # one string (chat templates are kilobytes)


@dataclass
class GGUFHeader:
    """What the header of a GGUF file says, read without loading tensors (for error messages)."""

    version: int
    architecture: str | None
    alignment: int
    n_tensors: int
    data_offset: int
    data_bytes_needed: int | None  # end of the last tensor's data; None if a tensor type is unknown
    keys: set[str] = field(default_factory=set)


class _Truncated(Exception):
    """The file ends inside the header (a cut-off download or copy)."""


class _Corrupted(Exception):
    """The header holds something no GGUF writer produces; the message says what."""


class _HeaderReader:
    """Reads the header fields, checking every length against the bytes the file has left."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self.handle = handle
        self.size = size

    @property
    def left(self) -> int:
        return self.size - self.handle.tell()

    def need(self, count: int, what: str, plausible: bool = True) -> None:
        """Raise unless `count` more bytes exist: corrupted when the length itself is implausible, else cut off."""
        if count <= self.left:
            return
        if not plausible:
            raise _Corrupted(
                f"{what} runs past the end of the file ({count:,} bytes needed, {self.left:,} left)"
            )
        raise _Truncated(f"{what} needs {count:,} bytes, {self.left:,} left")

    def read(self, count: int, what: str) -> bytes:
        self.need(count, what)
        return self.handle.read(count)

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("<Q", what)
        self.need(length, f"{what}: string length {length:,}", length <= MAX_STRING_BYTES)
        return self.handle.read(length).decode("utf-8", errors="replace")

    def value(self, value_type: int, what: str) -> Any:
        """Read a scalar or string (returned), or skip an array (None)."""
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY:
            item_type, count = self.unpack("<IQ", what)
            plausible = count <= MAX_ARRAY_ITEMS
            if item_type in _SCALAR_TYPES:
                name, fmt = _SCALAR_TYPES[item_type]
                self.need(
                    struct.calcsize(fmt) * count, f"{what}: array of {count:,} {name} values", plausible
                )
                self.handle.seek(struct.calcsize(fmt) * count, 1)
            elif item_type in (_STRING, _ARRAY):
                self.need(count * 8, f"{what}: array of {count:,} {_TYPE_NAMES[item_type]} values", plausible)
                for index in range(count):
                    self.value(item_type, f"{what}[{index}]")
            else:
                raise _Corrupted(f"{what}: array of unknown value type {item_type} (known: 0-12)")
            return None
        if value_type not in _SCALAR_TYPES:
            raise _Corrupted(f"{what}: unknown value type {value_type} (known: 0-12)")
        return self.unpack(_SCALAR_TYPES[value_type][1], what)[0]


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF header (metadata keys, tensor table) in well under a second, tensors untouched.

    Raises RuntimeLoadError naming the file and what is wrong: not GGUF, cut off inside the header
    ("truncated inside the GGUF header"), or a field no writer produces ("corrupted GGUF header: ...",
    naming the metadata key or tensor and the value).
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise RuntimeLoadError(
                f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})"
            )
        reader = _HeaderReader(handle, size)
        try:
            version, n_tensors, n_kv = reader.unpack("<IQQ", "version and counts")
            if version not in GGUF_VERSIONS:
                raise _Corrupted(
                    f"version {version} (llama.cpp reads versions {', '.join(map(str, GGUF_VERSIONS))})"
                )
            for count, what in ((n_kv, "metadata keys"), (n_tensors, "tensors")):
                if count > MAX_COUNT:
                    raise _Corrupted(f"{count:,} {what} (no GGUF writer makes more than {MAX_COUNT:,})")
            architecture, alignment, keys = None, 32, set()
            for index in range(1, n_kv + 1):
                where = f"metadata key {index} of {n_kv:,}"
                key = reader.string(where)
                where = f"{where} '{key}'"
                (value_type,) = reader.unpack("<I", where)
                value = reader.value(value_type, where)
                keys.add(key)
                if key == "general.architecture":
                    architecture = value
                elif key == "general.alignment":
                    if (
                        isinstance(value, bool)
                        or not isinstance(value, int)
                        or value <= 0
                        or value & (value - 1)
                    ):
                        raise _Corrupted(f"general.alignment {value!r} is not a power of two")
                    alignment = value
            data_end: int | None = 0
            for index in range(1, n_tensors + 1):
                where = f"tensor {index} of {n_tensors:,}"
                name = reader.string(where)
                where = f"{where} '{name}'"
                (n_dims,) = reader.unpack("<I", where)
                if not 1 <= n_dims <= GGML_MAX_DIMS:
                    raise _Corrupted(f"{where}: {n_dims:,} dimensions (GGUF allows 1 to {GGML_MAX_DIMS})")
                dims = reader.unpack(f"<{n_dims}Q", where)
                tensor_type, offset = reader.unpack("<IQ", where)
                if offset % alignment:
                    raise _Corrupted(
                        f"{where}: data offset {offset:,} is not a multiple of the alignment {alignment}"
                    )
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(tensor_type)]
                except (ValueError, KeyError):
                    data_end = None  # a type newer than this gguf package: its size is unknown
                    continue
                if dims[0] % block:
                    raise _Corrupted(
                        f"{where}: first dimension {dims[0]:,} is not a multiple of its type's block of {block}"
                    )
                elements = 1
                for dim in dims:
                    elements *= dim
                if data_end is not None:
                    data_end = max(data_end, offset + elements // block * type_size)
        except _Truncated as error:
            raise RuntimeLoadError(
                f"{path}: truncated inside the GGUF header ({size:,} bytes; {error}): copy or export it again"
            ) from None
        except _Corrupted as error:
            raise RuntimeLoadError(f"{path}: corrupted GGUF header: {error}") from None
        position = handle.tell()
    data_offset = (position + alignment - 1) // alignment * alignment
    return GGUFHeader(
        version=version,
        architecture=architecture,
        alignment=alignment,
        n_tensors=n_tensors,
        data_offset=data_offset,
        data_bytes_needed=None if data_end is None else data_offset + data_end,
        keys=keys,
    )


def diagnose_gguf(path: str | Path) -> str:
    """One-line reason why llama.cpp may refuse `path` (called after a failed load)."""
    path = Path(path)
    try:
        header = read_gguf_header(path)
    except RuntimeLoadError as error:
        return str(error)
    size = path.stat().st_size
    if header.data_bytes_needed is not None and size < header.data_bytes_needed:
        return f"{path}: truncated GGUF file ({size:,} bytes, its tensors need {header.data_bytes_needed:,})"
    if "tokenizer.ggml.tokens" not in header.keys:
        return f"{path}: GGUF file has no tokenizer (no tokenizer.ggml.tokens in its metadata)"
    return (
        f"{path}: llama.cpp could not load this GGUF file (architecture {header.architecture!r}; "
        "unsupported architecture or corrupted tensor data)"
    )


def system_info() -> str:
    """llama.cpp's compile-time feature line (e.g. 'AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1')."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")


def build_has_amx() -> bool:
    """True when the loaded libggml was built with the AMX backend (the one that crashes)."""
    return "AMX" in system_info()


KV_CACHE_TYPES = tuple(KV_CACHE_DTYPES)  # each is llama_cpp.GGML_TYPE_<NAME>
QUANTIZED_KV = QUANTIZED_KV_CACHE_DTYPES


def ggml_type(kv_cache_dtype: str) -> int:
    """llama_cpp's GGML_TYPE_* number of a KV-cache dtype name (f16 -> GGML_TYPE_F16 = 1, q8_0 -> 8, q4_0 -> 2)."""
    import llama_cpp

    if kv_cache_dtype not in KV_CACHE_TYPES:
        raise RuntimeLoadError(
            f"unknown KV-cache dtype {kv_cache_dtype!r} (llama.cpp runner: {', '.join(KV_CACHE_TYPES)})"
        )
    return int(getattr(llama_cpp, f"GGML_TYPE_{kv_cache_dtype.upper()}"))


def runner_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """LlamaCppRunner keyword arguments from a bundle's runtime.json (toolkit.deploy.bundle.RuntimeConfig) or a
    plan's settings: kv_cache_dtype, flash_attn, kv_offload, gpu_layers (-1 / 0 / None: the runner's default)."""
    options: dict[str, Any] = {}
    if settings.get("kv_cache_dtype"):
        options["kv_cache_dtype"] = str(settings["kv_cache_dtype"])
    if isinstance(settings.get("flash_attn"), bool):
        options["flash_attn"] = settings["flash_attn"]
    if settings.get("kv_offload") is False:
        options["kv_offload"] = False
    layers = settings.get("gpu_layers")
    if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0:
        options["gpu_layers"] = layers
    return options


def default_mmap(extra_buffers: bool, offload: bool) -> bool:
    """Whether the runner maps the GGUF file: not when CPU repack buffers are on (one copy, not two)."""
    return offload or not extra_buffers


@contextlib.contextmanager
def _model_params_override(**fields: Any) -> Iterator[None]:
    """Make `llama_model_default_params()` return params with `fields` set, while loading a model.

    `Llama.__init__` builds its `llama_model_params` from that function and ignores unknown
    keyword arguments, so this is the one way to reach fields such as `use_extra_bufts` through
    the high-level class. Only fields the binding's struct has are set.
    """
    import llama_cpp.llama_cpp as low_level

    original = low_level.llama_model_default_params
    known = {name for name, _ in low_level.llama_model_params._fields_}
    fields = {key: value for key, value in fields.items() if key in known}

    def patched() -> Any:
        params = original()
        for key, value in fields.items():
            setattr(params, key, value)
        return params

    low_level.llama_model_default_params = patched
    try:
        yield
    finally:
        low_level.llama_model_default_params = original


# ----------------------------------------------------------------------------------------------
# Vision projector (mmproj) through libmtmd

PREPROCESSOR_KEY = "bedside.preprocessor_config"  # written by exporters/gguf_mmproj.py
_GGML_LOG_LEVEL_ERROR = 3
_mtmd_errors: list[str] = []  # error lines libmtmd / clip.cpp logged lately (its log is otherwise silenced)
_mtmd_log_callback: Any = None  # the ctypes callback object, kept alive for the process


def _install_mtmd_log() -> None:
    """Route libmtmd's log into `_mtmd_errors` (errors only) instead of stderr, once per process."""
    global _mtmd_log_callback
    if _mtmd_log_callback is not None:
        return
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: Any) -> None:
        if level == _GGML_LOG_LEVEL_ERROR and text:
            _mtmd_errors.append(text.decode("utf-8", errors="replace").strip())
            del _mtmd_errors[:-8]

    _mtmd_log_callback = collect
    mtmd.mtmd_log_set(collect, None)


def _last_mtmd_error() -> str:
    return _mtmd_errors[-1] if _mtmd_errors else "no error message"


def find_mmproj(model: Path) -> Path | None:
    """The vision projector beside `model`: the one `mmproj-*.gguf` of its folder, or the one named after it
    (`mmproj-<model stem>-*.gguf`) when there are several; None when there is none."""
    candidates = sorted(model.parent.glob(f"{MMPROJ_PREFIX}*.gguf"))
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    named = [path for path in candidates if path.name.startswith(f"{MMPROJ_PREFIX}{model.stem}-")]
    if len(named) == 1:
        return named[0]
    names = ", ".join(path.name for path in candidates)
    raise RuntimeLoadError(
        f"{model.parent}: several vision projectors ({names}); pass the one to load as mmproj="
    )


class _GGMLTensor(ctypes.Structure):
    """The head of ggml.h's `struct ggml_tensor` up to `name` (fields only read, never allocated here)."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * 10),
    ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
]
_GGML_TYPE_F32 = 0


class _ClassTokenFirst:
    """libmtmd eval callback putting the class embedding first in the LLaVA graph (llama.cpp #25814, module docstring).

    Asks for the node that concatenates `v.class_embd` after the patch embeddings, then rotates its rows by one
    (read and written with ggml_backend_tensor_get / _set, so it works wherever the tower runs).
    """

    def __init__(self) -> None:
        import llama_cpp

        library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        self._get = library.ggml_backend_tensor_get
        self._set = library.ggml_backend_tensor_set
        for function in (self._get, self._set):
            function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
            function.restype = None
        self._op_name = library.ggml_op_name
        self._op_name.argtypes = [ctypes.c_int]
        self._op_name.restype = ctypes.c_char_p
        self.fired = 0
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _is_class_last_concat(self, tensor: _GGMLTensor) -> bool:
        first, second = tensor.src[0], tensor.src[1]
        return (
            bool(second)
            and bool(first)
            and second.contents.name == b"v.class_embd"
            and self._op_name(tensor.op) == b"CONCAT"
            and tensor.type == _GGML_TYPE_F32
            and tensor.ne[2] == 1
            and tensor.ne[1] == first.contents.ne[1] + 1
        )

    def _on_node(self, pointer: int, ask: bool, user_data: Any) -> bool:
        tensor = ctypes.cast(pointer, ctypes.POINTER(_GGMLTensor)).contents
        if not self._is_class_last_concat(tensor):
            return not ask  # ask: not needed; after compute: go on
        if ask:
            return True
        rows, width = int(tensor.ne[1]), int(tensor.ne[0])
        buffer = np.empty((rows, width), np.float32)
        self._get(pointer, buffer.ctypes.data, 0, buffer.nbytes)
        rotated = np.ascontiguousarray(np.roll(buffer, 1, axis=0))
        self._set(pointer, rotated.ctypes.data, 0, rotated.nbytes)
        self.fired += 1
        return True


class VisionProjector:
    """An mmproj GGUF loaded by libmtmd for a llama.cpp text model: image file -> projected features [tokens, n_embd].

    Supports projectors that put a fixed number of embeddings per image at plain 1-D positions with causal attention
    (LLaVA's "mlp" and kin); others are refused when loading.
    """

    def __init__(self, path: Path, model: Any, n_threads: int, use_gpu: bool) -> None:
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        header_problem = _mmproj_header_problem(path)
        if header_problem:
            raise RuntimeLoadError(header_problem)
        self.path = path
        self._mtmd = mtmd
        self.metadata = _read_mmproj_metadata(path)
        self.preprocessor = self.metadata.get("preprocessor")
        self.n_embd = int(llama_cpp.llama_model_n_embd_inp(model))
        _install_mtmd_log()
        self._fix = _ClassTokenFirst() if self.metadata.get("projector_type") == "mlp" else None
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.print_timings = False
        params.warmup = False
        params.n_threads = n_threads
        if self._fix is not None:
            params.cb_eval = self._fix.callback
        self.context = mtmd.mtmd_init_from_file(str(path).encode(), model, params)
        if not self.context:
            raise RuntimeLoadError(
                f"{path}: llama.cpp could not load this vision projector (mmproj): {_last_mtmd_error()}"
            )
        try:
            if not mtmd.mtmd_support_vision(self.context):
                raise RuntimeLoadError(f"{path}: this mmproj has no vision encoder (audio only?)")
            if mtmd.mtmd_decode_use_mrope(self.context) or mtmd.mtmd_decode_use_non_causal(
                self.context, None
            ):
                raise RuntimeLoadError(
                    f"{path}: projector {self.metadata.get('projector_type')!r} needs M-RoPE or non-causal image "
                    "positions, which this runner does not place; LLaVA-style projectors are supported"
                )
            side = int(self.metadata.get("image_size") or 224)
            self.image_tokens = self._count_tokens(np.zeros((side, side, 3), np.uint8))
        except BaseException:
            self.close()
            raise

    @property
    def class_token_fix_fired(self) -> bool:
        """True once the #25814 work-around has rotated a graph's rows."""
        return bool(self._fix and self._fix.fired)

    def _tokenize(self, pixels: np.ndarray) -> tuple[Any, Any, Any]:
        """(chunks, image chunk, bitmap) for one RGB uint8 image [height, width, 3]; the caller frees them."""
        mtmd = self._mtmd
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(
            pixels.shape[1], pixels.shape[0], pixels.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        )
        chunks = mtmd.mtmd_input_chunks_init()
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(text=marker, text_len=len(marker), add_special=False, parse_special=True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        status = mtmd.mtmd_tokenize(self.context, chunks, ctypes.byref(text), bitmaps, 1)
        if status != 0:
            self._free(chunks, bitmap)
            raise RuntimeError(f"{self.path}: libmtmd could not tokenize the image (status {status})")
        image_chunks = []
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image_chunks.append(chunk)
            elif mtmd.mtmd_input_chunk_get_n_tokens(chunk) > 0:
                self._free(chunks, bitmap)
                raise RuntimeLoadError(
                    f"{self.path}: this projector puts text tokens around an image; LLaVA-style projectors are supported"
                )
        if len(image_chunks) != 1:
            self._free(chunks, bitmap)
            raise RuntimeLoadError(
                f"{self.path}: one image became {len(image_chunks)} image chunks (tiling projectors are not supported)"
            )
        return chunks, image_chunks[0], bitmap

    def _free(self, chunks: Any, bitmap: Any) -> None:
        self._mtmd.mtmd_input_chunks_free(chunks)
        self._mtmd.mtmd_bitmap_free(bitmap)

    def _count_tokens(self, pixels: np.ndarray) -> int:
        chunks, chunk, bitmap = self._tokenize(pixels)
        try:
            tokens = int(self._mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            positions = int(self._mtmd.mtmd_input_chunk_get_n_pos(chunk))
        finally:
            self._free(chunks, bitmap)
        if positions != tokens:
            raise RuntimeLoadError(
                f"{self.path}: an image takes {tokens} embeddings but {positions} positions (unsupported)"
            )
        return tokens

    def pixels(self, image: Path) -> np.ndarray:
        """The RGB uint8 pixels handed to clip.cpp: CLIPImageProcessor's resize + centre crop when the mmproj carries
        the processor config (clip.cpp then only normalises), else the decoded image as it is."""
        rgb = open_rgb(image)  # one-line RuntimeLoadError for a missing or unreadable file
        if not self.preprocessor:
            return np.asarray(rgb, dtype=np.uint8)
        geometry = dict(self.preprocessor, do_rescale=False, do_normalize=False)
        resized = preprocess(rgb, geometry)[0].transpose(1, 2, 0)  # float32 holding the uint8 values
        return np.rint(resized).astype(np.uint8)

    def encode(self, image: Path) -> np.ndarray:
        """Projected features of the image file, float32 [image_tokens, n_embd]."""
        mtmd = self._mtmd
        chunks, chunk, bitmap = self._tokenize(self.pixels(image))
        try:
            tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
            if tokens != self.image_tokens:
                raise RuntimeError(
                    f"{self.path}: the image became {tokens} embeddings, not {self.image_tokens}"
                )
            status = mtmd.mtmd_encode_chunk(self.context, chunk)
            if status != 0:
                raise RuntimeError(f"{self.path}: libmtmd failed to encode the image: {_last_mtmd_error()}")
            output = mtmd.mtmd_get_output_embd(self.context)
            return np.ctypeslib.as_array(output, shape=(tokens, self.n_embd)).copy()
        finally:
            self._free(chunks, bitmap)

    def close(self) -> None:
        """Free the libmtmd context (before the text model it points to)."""
        if getattr(self, "context", None):
            self._mtmd.mtmd_free(self.context)
        self.context = None


def _mmproj_header_problem(path: Path) -> str | None:
    """A one-line reason why `path` cannot be an mmproj (checked before libmtmd, which may abort on bad files)."""
    if not path.is_file():
        return f"vision projector {path} not found: pass the mmproj-*.gguf written by `bedside export`"
    try:
        header = read_gguf_header(path)
    except RuntimeLoadError as error:
        return str(error)
    size = path.stat().st_size
    if header.data_bytes_needed is not None and size < header.data_bytes_needed:
        return f"{path}: truncated GGUF file ({size:,} bytes, its tensors need {header.data_bytes_needed:,})"
    if header.architecture != "clip":
        return f"{path}: not a vision projector (architecture {header.architecture!r}, expected 'clip')"
    return None


def _read_mmproj_metadata(path: Path) -> dict[str, Any]:
    """projector_type, image_size and the bedside processor config of an mmproj (read with gguf-py, no tensors)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = reader.fields
    found: dict[str, Any] = {}
    for key, name in (("clip.projector_type", "projector_type"), ("clip.vision.image_size", "image_size")):
        if key in fields:
            found[name] = fields[key].contents()
    if PREPROCESSOR_KEY in fields:
        try:
            found["preprocessor"] = json.loads(str(fields[PREPROCESSOR_KEY].contents()))
        except ValueError:
            raise RuntimeLoadError(
                f"{path}: {PREPROCESSOR_KEY} is not valid JSON: export the mmproj again"
            ) from None
    return found


@register_runner
class LlamaCppRunner(Runner):
    """A GGUF file on llama.cpp: its own tokenizer, chat template and KV cache (f16 unless told, n_batch 512).

    `extra_buffers` None (default) disables llama.cpp's extra buffer types only when the build
    has AMX (the crash guard); True/False forces them on/off. `mmap` None (default) maps the file
    unless weights may be repacked on the CPU (extra buffers on, no offload), see the module docstring.
    `kv_cache_dtype`, `flash_attn`, `kv_offload`, `gpu_layers`: the KV cache and placement (module docstring).
    `mmproj`: the vision projector for image questions: None (default) loads the `mmproj-*.gguf` beside the model
    when there is one, a path loads that file, False loads none (text only, as before).
    """

    name = "llama.cpp"

    def __init__(
        self,
        batch_size: int | None = None,
        extra_buffers: bool | None = None,
        mmap: bool | None = None,
        kv_cache_dtype: str = "f16",
        flash_attn: bool | None = None,
        kv_offload: bool = True,
        gpu_layers: int | None = None,
        mmproj: str | Path | bool | None = None,
    ) -> None:
        super().__init__(batch_size)
        if kv_cache_dtype not in KV_CACHE_TYPES:
            raise RuntimeLoadError(
                f"unknown KV-cache dtype {kv_cache_dtype!r} (llama.cpp runner: {', '.join(KV_CACHE_TYPES)})"
            )
        if flash_attn is False and kv_cache_dtype in QUANTIZED_KV:
            raise RuntimeLoadError(
                f"a {kv_cache_dtype} KV cache needs flash attention in llama.cpp (quantized V): leave flash_attn on"
            )
        if gpu_layers is not None and gpu_layers < 0:
            raise RuntimeLoadError(f"gpu_layers must be 0 or more (None: every layer), got {gpu_layers}")
        self.extra_buffers = extra_buffers
        self.mmap = mmap
        self.kv_cache_dtype = kv_cache_dtype
        self.flash_attn = flash_attn
        self.kv_offload = kv_offload
        self.gpu_layers = gpu_layers
        self.mmproj = mmproj
        self.vision: VisionProjector | None = None
        self._embd_batch: Any = None
        self.llama: Any = None
        self._batch: Any = None
        self._vocab: Any = None
        self._n_vocab = 0
        self.details: dict[str, Any] = {}

    def _load(self, path: Path, *, n_ctx: int, n_threads: int | None, device: str) -> None:
        require_format(path, "gguf", self.name)
        if path.is_dir():
            path = model_ggufs(path)[0]
        elif path.name.startswith(MMPROJ_PREFIX):
            raise RuntimeLoadError(
                f"{path}: a vision projector (mmproj), not a model: load the model GGUF beside it "
                "(the projector is picked up automatically)"
            )
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise RuntimeLoadError(
                f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})"
            )

        import llama_cpp

        offload = device == "cuda" and bool(llama_cpp.llama_supports_gpu_offload())
        extra_buffers = self.extra_buffers if self.extra_buffers is not None else not build_has_amx()
        n_gpu_layers = (-1 if self.gpu_layers is None else self.gpu_layers) if offload else 0
        # weights of layers left on the CPU may be repacked there: read the file then, as on a CPU-only run
        use_mmap = (
            self.mmap if self.mmap is not None else default_mmap(extra_buffers, offload and n_gpu_layers < 0)
        )
        flash_attn = (
            self.flash_attn
            if self.flash_attn is not None
            else (offload or self.kv_cache_dtype in QUANTIZED_KV)
        )
        kv_type = ggml_type(self.kv_cache_dtype)
        self.batch_size = min(self.batch_size, n_ctx)
        try:
            with _model_params_override(use_extra_bufts=extra_buffers):
                self.llama = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=n_ctx,
                    n_batch=self.batch_size,
                    n_ubatch=self.batch_size,
                    n_threads=n_threads,
                    n_threads_batch=n_threads,
                    n_gpu_layers=n_gpu_layers,
                    use_mmap=use_mmap,
                    logits_all=False,
                    type_k=kv_type,
                    type_v=kv_type,
                    flash_attn=flash_attn,
                    offload_kqv=self.kv_offload,
                    verbose=False,
                )
        except ValueError as error:
            raise RuntimeLoadError(diagnose_gguf(path)) from error
        self.path = path
        self.device = "cuda" if offload else "cpu"
        self._batch = llama_cpp.llama_batch_init(self.batch_size, 0, 1)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        self._n_vocab = int(self.llama.n_vocab())
        self._load_vision(path, offload)
        self.details = {
            "extra_buffers": extra_buffers,
            "mmap": use_mmap,
            "n_gpu_layers": n_gpu_layers,
            "kv_cache_dtype": self.kv_cache_dtype,
            "flash_attn": flash_attn,
            "kv_offload": self.kv_offload,
            "n_batch": self.batch_size,
            "system_info": system_info().strip(),
            "mmproj": self.vision.path.name if self.vision else None,
            "image_tokens": self.image_tokens,
        }

    def _load_vision(self, model: Path, offload: bool) -> None:
        """Load the vision projector the `mmproj` option names (or finds beside `model`); keep None for text only."""
        import llama_cpp

        if self.mmproj is False:
            return
        path = find_mmproj(model) if self.mmproj in (None, True) else Path(str(self.mmproj))
        if path is None:
            if self.mmproj is True:
                raise RuntimeLoadError(
                    f"{model}: no {MMPROJ_PREFIX}*.gguf beside it: export the LLaVA with `bedside export` "
                    "(it writes the projector) or pass mmproj=PATH"
                )
            return
        try:
            self.vision = VisionProjector(
                path, self.llama.model, n_threads=int(self.llama.n_threads), use_gpu=offload
            )
        except BaseException:
            self.close()
            raise
        self._embd_batch = llama_cpp.llama_batch_init(self.batch_size, self.vision.n_embd, 1)

    @property
    def has_vision(self) -> bool:
        """True when a vision projector (mmproj) is loaded with the model."""
        return self.vision is not None

    @property
    def image_tokens(self) -> int:
        """Positions one image takes (what libmtmd makes of an image at the tower's size); 0 without a projector."""
        return self.vision.image_tokens if self.vision else 0

    def _forward_image(self, image: Path) -> np.ndarray:
        """Encode `image` with libmtmd and decode its features at positions n_past.. (module docstring)."""
        import llama_cpp

        if self.vision is None:
            raise ValueError(
                f"{self.path}: no vision tower loaded (no {MMPROJ_PREFIX}*.gguf beside the model): images need "
                "the vision projector `bedside export` writes for a LLaVA, beside the model or passed as mmproj="
            )
        features = self.vision.encode(image)
        self.details["vision_cls_fix"] = self.vision.class_token_fix_fired
        batch = self._embd_batch
        pointer: Any = None
        for start in range(0, len(features), self.batch_size):
            rows = np.ascontiguousarray(features[start : start + self.batch_size], dtype=np.float32)
            count = len(rows)
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            batch.n_tokens = count
            for i in range(count):
                batch.pos[i] = self.n_past + start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = start + i == len(features) - 1
            status = llama_cpp.llama_decode(self.llama.ctx, batch)
            if status != 0:
                raise RuntimeError(
                    f"llama_decode failed with status {status} on image features at position "
                    f"{self.n_past + start} ({self.path})"
                )
            pointer = llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        buffer = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(buffer, shape=(1, self._n_vocab)).copy()

    def close(self) -> None:
        """Free the batch, context and model now rather than at garbage collection."""
        import llama_cpp

        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._embd_batch is not None:
            llama_cpp.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        if self.vision is not None:
            self.vision.close()
            self.vision = None
        if self.llama is not None:
            self.llama.close()
            self.llama = None

    @property
    def vocab_size(self) -> int:
        """llama.cpp's n_vocab (the logit width)."""
        return self._n_vocab

    @property
    def metadata(self) -> dict[str, str]:
        """GGUF metadata as llama.cpp reads it (strings), e.g. the chat template and Bedside records."""
        return dict(self.llama.metadata)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Ids from the GGUF's tokenizer; `add_special` adds BOS where the GGUF says to."""
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""
        return self.llama.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def _token_text(self, token: int) -> str:
        import llama_cpp

        if token < 0:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The GGUF's `tokenizer.chat_template`, rendered with Jinja like transformers does."""
        return render_chat_template(
            self.llama.metadata.get("tokenizer.chat_template"),
            messages,
            bos_token=self._token_text(self.llama.token_bos()),
            eos_token=self._token_text(self.llama.token_eos()),
            add_generation_prompt=add_generation_prompt,
        )

    def is_end_of_generation(self, token: int) -> bool:
        """llama.cpp's end-of-generation set (EOS, EOT, <|im_end|> and kin)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def reset(self) -> None:
        """Clear the context's KV memory."""
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llama.ctx), True)
        self.n_past = 0

    def _forward(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        import llama_cpp

        batch, count = self._batch, len(ids)
        batch.n_tokens = count
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == count - 1
        status = llama_cpp.llama_decode(self.llama.ctx, batch)
        if status != 0:
            raise RuntimeError(
                f"llama_decode failed with status {status} at position {self.n_past} ({self.path})"
            )
        if all_logits:
            pointer = llama_cpp.llama_get_logits(self.llama.ctx)
            rows = count
        else:
            pointer = llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
            rows = 1
        buffer = ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(buffer, shape=(rows, self._n_vocab)).copy()
