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

Images: a LLaVA's mmproj runs in libmtmd (runtimes/llamacpp_vision.py).
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.gguf_header import GGUF_MAGIC, diagnose_gguf
from runtimes.llamacpp_vision import VisionProjector, find_mmproj
from runtimes.registry import model_ggufs, register_runner, require_format
from runtimes.results import RuntimeLoadError
from runtimes.runner import Message, Runner, render_chat_template
from toolkit.core.formats import KV_CACHE_DTYPES, QUANTIZED_KV_CACHE_DTYPES
from toolkit.core.vision import MMPROJ_PREFIX


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

    def _rewind(self, n_past: int) -> None:
        """Remove positions n_past.. of sequence 0 from the context's KV memory."""
        import llama_cpp

        if not llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.llama.ctx), 0, n_past, -1):
            raise RuntimeError(f"llama.cpp could not drop cached positions {n_past}.. ({self.path})")

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
