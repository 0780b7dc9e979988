"""Decoder-only ONNX exports (optimum `text-generation-with-past`) on ONNX Runtime.

The runner drives `onnxruntime.InferenceSession` directly with its own KV-cache loop instead of
optimum's ORTModel: the export's interface is small and stable (inputs `input_ids`,
`attention_mask`, `position_ids`, `past_key_values.N.key/value` [batch, kv_heads, past, head_dim];
outputs `logits`, `present.N.key/value`), and a loop of our own keeps torch and transformers out
of the process, so the measured memory is ONNX Runtime's (transformers' AutoTokenizer alone
imports torch, ~300 MB). The tokenizer is read from `tokenizer.json` with the `tokenizers`
library; the chat template from `chat_template.jinja` or `tokenizer_config.json`.

Present tensors are kept as OrtValues on the session's device through IO binding and fed back as
the next step's past, so on the CUDA provider the cache never travels through host memory.
Exports without past inputs still work (the whole sequence is recomputed each step).

LLaVA exports (exporters/onnx_llava.py) hold two more graphs beside model.onnx: `vision_encoder.onnx`
(pixel_values -> projected image features) and `embed_tokens.onnx` (input_ids -> inputs_embeds), and their
model.onnx takes `inputs_embeds` instead of input_ids, with the same attention_mask / position_ids / past /
present interface. The runner then embeds token runs through embed_tokens.onnx and images through the
vision graph (pixels prepared by runtimes/image.py from the export's preprocessor_config.json, as
CLIPImageProcessor prepares them), and feeds both to the one KV loop (`_decode`), so prompt_parts,
continuation_logprobs and generate(image=...) work as on the torch reference. A folder with only one of the
two extra graphs is refused (a half-copied export); text-only exports run exactly as before.

Memory: the load peaks above what stays resident because ORT holds the parsed protobuf and the
initializers at once; saved with external data (model.onnx + model.onnx_data) the same model loads
lower. Measured figures: docs/RUNTIMES.md, section "ONNX Runtime: memory of the fp32 export".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.image import load_pixels, read_processor_config
from runtimes.registry import register_runner, require_format
from runtimes.results import RuntimeLoadError
from runtimes.runner import Message, Runner, first_line, render_chat_template
from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.vision import ONNX_EMBEDDING_FILE, ONNX_VISION_FILE

_PAST_NAME = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": np.float32}
# The extra graphs of a LLaVA export (exporters/onnx_llava.py writes them under these names; runtimes may not
# import exporters, so the names are repeated here and tests/test_vlm_onnx.py checks that both agree).
VISION_FILE = ONNX_VISION_FILE
EMBEDDING_FILE = ONNX_EMBEDDING_FILE


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config.json: `text_config` of a LLaVA, the config itself otherwise."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise RuntimeLoadError(f"{path}: unreadable JSON ({first_line(error)})") from error


class FolderTokenizer:
    """The tokenizer saved beside an export, without transformers when tokenizer.json is there.

    Falls back to transformers' AutoTokenizer (which imports torch) only for folders that hold a
    slow tokenizer alone (tokenizer.model / vocab.json).
    """

    def __init__(self, folder: Path) -> None:
        config = _read_json(folder / "tokenizer_config.json")
        template_file = folder / "chat_template.jinja"
        self.chat_template: str | None = (
            template_file.read_text(encoding="utf-8")
            if template_file.is_file()
            else config.get("chat_template")
        )
        if isinstance(self.chat_template, list):  # several named templates: take the default one
            named = {item.get("name"): item.get("template") for item in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_content(config.get("bos_token")) or ""
        self.eos_token = _token_content(config.get("eos_token")) or ""
        self._fast: Any = None
        self._slow: Any = None
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            try:
                self._fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as error:
                raise RuntimeLoadError(
                    f"{folder / 'tokenizer.json'}: cannot be read ({first_line(error)})"
                ) from error
        elif any((folder / name).is_file() for name in ("tokenizer.model", "vocab.json")):
            from toolkit.core.tokenizer_loading import load_auto_tokenizer

            try:
                refuse_custom_code(folder)  # a tokenizer_config.json auto_map would import the folder's code
                self._slow = load_auto_tokenizer(folder)
            except Exception as error:
                raise RuntimeLoadError(
                    f"{folder}: tokenizer cannot be loaded ({first_line(error)})"
                ) from error
            self.chat_template = self.chat_template or getattr(self._slow, "chat_template", None)
        else:
            raise RuntimeLoadError(
                f"{folder}: no tokenizer beside the ONNX model (expected tokenizer.json or tokenizer.model)"
            )

    def encode(self, text: str, add_special: bool) -> list[int]:
        """Token ids; special-token text becomes the special token."""
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=add_special).ids)
        return list(self._slow(text, add_special_tokens=add_special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        """Text without special tokens."""
        if self._fast is not None:
            return self._fast.decode(list(ids), skip_special_tokens=True)
        return self._slow.decode(list(ids), skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        """Id of a token string, None when unknown."""
        if not token:
            return None
        if self._fast is not None:
            return self._fast.token_to_id(token)
        return self._slow.convert_tokens_to_ids(token)


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc `malloc_trim`); a no-op elsewhere.

    Building a session parses the whole model protobuf and then frees it, but glibc keeps most of
    those pages, so resident memory after loading varied from 730 to 1,010 MiB for the same
    539 MB demo export; after trimming it is a steady 704 MiB. A deployment can do the same, and
    the memory estimate can then be checked against a figure that does not depend on malloc luck.
    """

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def _open_session(ort: Any, model_file: Path, options: Any, providers: list[str]) -> Any:
    """An InferenceSession for `model_file`; RuntimeLoadError with one line naming the file and the reason."""
    try:
        return ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
    except Exception as error:
        message = first_line(error)
        hint = ""
        if "IR version" in message:  # drop the C++ source location ORT puts before the reason
            message = (
                message[message.index("Unsupported model IR version") :]
                if ("Unsupported model IR version" in message)
                else message
            )
            hint = " (re-export with an ONNX IR version this onnxruntime reads)"
        elif "Protobuf parsing failed" in message or "INVALID_PROTOBUF" in message:
            hint = " (truncated or corrupted ONNX file?)"
        raise RuntimeLoadError(f"{model_file}: onnxruntime cannot load it: {message}{hint}") from error


def _image_token_count(config: dict[str, Any]) -> int:
    """Positions one image takes, from a LLaVA config.json: (image_size / patch_size)^2, +1 with strategy "full"."""
    vision = config.get("vision_config") or {}
    side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
    return side * side + (1 if config.get("vision_feature_select_strategy", "default") == "full" else 0)


@register_runner
class OnnxRunner(Runner):
    """A folder with model.onnx (+ tokenizer) on ONNX Runtime: CPU provider, CUDA when present."""

    name = "onnxruntime"
    # 128 tokens per call: as fast as 512 on the demo export (130 tok/s prefill either way) but
    # 280 MiB less resident at context 2048 (1,086 vs 1,362 MiB), because ORT's arena keeps the
    # largest per-call buffers (attention scores, [batch, vocab] logits) for the session's life.
    default_batch_size = 128

    def __init__(
        self, batch_size: int | None = None, memory_pattern: bool = True, cpu_arena: bool = True
    ) -> None:
        super().__init__(batch_size)
        self.memory_pattern = memory_pattern
        self.cpu_arena = cpu_arena
        self.session: Any = None
        self.tokenizer: FolderTokenizer | None = None
        self.details: dict[str, Any] = {}
        self._eos_ids: set[int] = set()
        self._past_names: list[str] = []
        self._past: dict[str, Any] = {}
        self._history: list[int] = []
        self._kv_shape: tuple[int, int] = (0, 0)
        self._kv_dtype: Any = np.float32
        self._input_names: set[str] = set()
        self._vocab = 0
        self._ort_device = "cpu"
        self._vision: Any = None  # vision_encoder.onnx session of a LLaVA export
        self._embed: Any = None  # embed_tokens.onnx session of a LLaVA export
        self._processor: dict[str, Any] = {}
        self._image_tokens = 0
        self._embeds_dtype: Any = np.float32

    def _load(self, path: Path, *, n_ctx: int, n_threads: int | None, device: str) -> None:
        require_format(path, "onnx", self.name)
        model_file = path / "model.onnx" if path.is_dir() else path
        folder = model_file.parent
        self.tokenizer = FolderTokenizer(folder)

        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_mem_pattern = self.memory_pattern
        options.enable_cpu_mem_arena = self.cpu_arena
        if n_threads:
            options.intra_op_num_threads = n_threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = _open_session(ort, model_file, options, providers)
        vision_file, embed_file = folder / VISION_FILE, folder / EMBEDDING_FILE
        if vision_file.is_file() != embed_file.is_file():
            present, missing = (
                (vision_file, embed_file) if vision_file.is_file() else (embed_file, vision_file)
            )
            raise RuntimeLoadError(
                f"{folder}: {present.name} without {missing.name}: an incomplete LLaVA export; export it again"
            )
        if vision_file.is_file():
            self._processor = read_processor_config(folder)
            self._vision = _open_session(ort, vision_file, options, providers)
            self._embed = _open_session(ort, embed_file, options, providers)
        release_freed_memory()
        self.path = model_file
        self._ort_device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.device = self._ort_device
        inputs = {item.name: item for item in self.session.get_inputs()}
        outputs = {item.name for item in self.session.get_outputs()}
        self._input_names = set(inputs)
        token_input = "inputs_embeds" if self._embed is not None else "input_ids"
        if token_input not in inputs or "logits" not in outputs:
            raise RuntimeLoadError(
                f"{model_file}: not a causal language model export (needs {token_input} and logits; "
                f"has inputs {sorted(inputs)[:4]})"
            )
        self._past_names = sorted(
            (name for name in inputs if _PAST_NAME.match(name)),
            key=lambda name: (int(_PAST_NAME.match(name).group(1)), name),
        )
        config = _read_json(folder / "config.json")
        text_config = _text_config(config)
        if self._embed is not None and not self._past_names:
            raise RuntimeLoadError(f"{model_file}: a LLaVA decoder export without past_key_values inputs")
        if self._past_names:
            first = inputs[self._past_names[0]]
            self._kv_dtype = _ORT_TYPES.get(first.type, np.float32)
            heads, head_dim = first.shape[1], first.shape[3]
            if not isinstance(heads, int):
                heads = text_config.get("num_key_value_heads") or text_config.get("num_attention_heads")
            if not isinstance(head_dim, int):
                head_dim = (
                    text_config.get("head_dim")
                    or text_config["hidden_size"] // text_config["num_attention_heads"]
                )
            self._kv_shape = (int(heads), int(head_dim))
        logits_shape = next(item.shape for item in self.session.get_outputs() if item.name == "logits")
        self._vocab = (
            logits_shape[-1] if isinstance(logits_shape[-1], int) else int(text_config.get("vocab_size", 0))
        )
        if self._vision is not None:
            self._embeds_dtype = _ORT_TYPES.get(inputs["inputs_embeds"].type, np.float32)
            features_shape = self._vision.get_outputs()[0].shape
            self._image_tokens = (
                features_shape[1] if isinstance(features_shape[1], int) else _image_token_count(config)
            )

        generation = _read_json(folder / "generation_config.json")
        eos: set[int] = set()
        for source in (generation.get("eos_token_id"), config.get("eos_token_id")):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list):
                eos.update(int(i) for i in source)
        token = self.tokenizer.token_id(self.tokenizer.eos_token)
        if token is not None:
            eos.add(token)
        self._eos_ids = eos
        self.details = {
            "providers": self.session.get_providers(),
            "kv_cache": bool(self._past_names),
            "vision": self._vision is not None,
        }
        self.reset()

    @property
    def vocab_size(self) -> int:
        """Width of the exported logits."""
        return self._vocab

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Ids from the folder's tokenizer.json."""
        return self.tokenizer.encode(text, add_special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids` without special tokens."""
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The folder's chat template rendered as transformers renders it."""
        return render_chat_template(
            self.tokenizer.chat_template,
            messages,
            bos_token=self.tokenizer.bos_token,
            eos_token=self.tokenizer.eos_token,
            add_generation_prompt=add_generation_prompt,
        )

    def is_end_of_generation(self, token: int) -> bool:
        """EOS ids of generation_config.json, config.json and the tokenizer."""
        return token in self._eos_ids

    def reset(self) -> None:
        """Start a new sequence: empty past tensors on the session's device."""
        import onnxruntime as ort

        self.n_past = 0
        self._history = []
        heads, head_dim = self._kv_shape
        empty = np.zeros((1, heads, 0, head_dim), dtype=self._kv_dtype)
        self._past = {
            name: ort.OrtValue.ortvalue_from_numpy(empty, self._ort_device, 0) for name in self._past_names
        }

    def _rewind(self, n_past: int) -> None:
        """Keep the first n_past positions of every past tensor [batch, heads, positions, head_dim]."""
        import onnxruntime as ort

        if not self._past_names:  # no KV cache in the export: the history is the state
            self._history = self._history[:n_past]
            return
        self._past = {
            name: ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value.numpy()[:, :, :n_past, :]), self._ort_device, 0
            )
            for name, value in self._past.items()
        }

    @property
    def has_vision(self) -> bool:
        """True for a LLaVA export (vision_encoder.onnx and embed_tokens.onnx beside model.onnx)."""
        return self._vision is not None

    @property
    def image_tokens(self) -> int:
        """Positions per image: the vision graph's image_features length."""
        return self._image_tokens

    def _forward_image(self, image: Path) -> np.ndarray:
        if not self.has_vision:
            return super()._forward_image(image)
        vision_input = self._vision.get_inputs()[0]
        pixels = load_pixels(image, self._processor).astype(_ORT_TYPES.get(vision_input.type, np.float32))
        features = self._vision.run(None, {vision_input.name: pixels})[0]
        return self._decode("inputs_embeds", features.astype(self._embeds_dtype), self.n_past, 1, False)

    def _forward(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        new = [int(i) for i in ids]
        if self._embed is not None:  # LLaVA export: token ids -> embeddings -> the decoder
            embeds = self._embed.run(None, {"input_ids": np.asarray([new], dtype=np.int64)})[0]
            return self._decode(
                "inputs_embeds", embeds.astype(self._embeds_dtype), self.n_past, len(new), all_logits
            )
        if self._past_names:
            run_ids, start = new, self.n_past
        else:  # no KV cache in the export: recompute the whole sequence
            self._history.extend(new)
            run_ids, start = self._history, 0
        return self._decode("input_ids", np.asarray([run_ids], dtype=np.int64), start, len(new), all_logits)

    def _decode(self, name: str, values: np.ndarray, start: int, new: int, all_logits: bool) -> np.ndarray:
        """One decoder call: `values` (input_ids [1, n] or inputs_embeds [1, n, hidden]) at positions start..;
        the past is bound from and the present kept on the session's device. Returns the logits of the last
        `new` positions when `all_logits`, else of the last one."""
        total = start + values.shape[1]
        binding = self.session.io_binding()
        binding.bind_cpu_input(name, np.ascontiguousarray(values))
        if "attention_mask" in self._input_names:
            binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if "position_ids" in self._input_names:
            binding.bind_cpu_input("position_ids", np.arange(start, total, dtype=np.int64)[None, :])
        if "use_cache_branch" in self._input_names:
            binding.bind_cpu_input("use_cache_branch", np.asarray([start > 0]))
        for past_name, value in self._past.items():
            binding.bind_ortvalue_input(past_name, value)
        binding.bind_output("logits", "cpu")
        present_names = [past_name.replace("past_key_values", "present") for past_name in self._past_names]
        for present_name in present_names:
            binding.bind_output(present_name, self._ort_device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[0]
        self._past = dict(zip(self._past_names, outputs[1:], strict=True))
        logits = logits[-new:] if all_logits else logits[-1:]
        return np.ascontiguousarray(logits, dtype=np.float32)

    def close(self) -> None:
        """Drop the sessions and the cache."""
        self._past = {}
        self.session = self._vision = self._embed = None
