"""A LLaVA's vision tower + projector (the mmproj GGUF) on llama.cpp, through libmtmd.

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

import ctypes
import json
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.gguf_header import read_gguf_header
from runtimes.image import open_rgb, preprocess
from runtimes.results import RuntimeLoadError
from toolkit.core.gguf_header import truncated_data
from toolkit.core.vision import MMPROJ_PREFIX

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
    truncated = truncated_data(path, header)
    if truncated is not None:
        return truncated
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
