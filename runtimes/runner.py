"""The Runner interface every runtime implements, and the numerics all runtimes share.

A Runner answers the three questions validation asks of an exported model, the same way on every
runtime so that results compare like with like:

- score: per-position log-probabilities of a token sequence (perplexity, KL divergence, option
  scoring), computed chunk by chunk through the runtime's own KV cache;
- generate: greedy or sampled text from a prompt or chat messages, rendered with the artifact's
  own chat template and tokenized with the artifact's own tokenizer;
- cost: load time, prefill and decode speed (peak memory is measured in a child process, see
  `runtimes.measure`).

Each runtime supplies only the primitives (`_load`, `tokenize`, `detokenize`, `_forward`,
`reset`, ...); the token loop, sampling and log-softmax live here once, so a difference between
runtimes is a difference in the model, never in the harness.

This package imports only `toolkit.core` (imports flow toolkit -> runtimes). Heavy libraries (torch,
llama_cpp, onnxruntime) are imported inside `load`, so `import runtimes` is cheap and a
measurement child pays only for the runtime it runs.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtimes.results import GenerationResult
from toolkit.core.vision import IMAGE_MARKER
from toolkit.core.windows import window_bos

Message = dict[str, str]
StreamCallback = Callable[[str], None]
PromptPart = list[int] | Path  # token ids, or an image file whose projected features take the positions


# ----------------------------------------------------------------------------------------------
# Numerics shared by all runtimes


def first_line(error: BaseException) -> str:
    """First line of an exception's message (native libraries write long multi-line ones)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (max-shifted, so large logits do not overflow)."""
    logits = np.asarray(logits, dtype=np.float32)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def sample_token(
    logits: np.ndarray,
    *,
    greedy: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    rng: np.random.Generator,
) -> int:
    """Pick the next token from one row of logits: argmax, or temperature + top-k + top-p sampling."""
    if greedy or temperature <= 0:
        return int(np.argmax(logits))
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-scaled)
    if top_k > 0:
        order = order[:top_k]
    candidates = scaled[order]
    probs = np.exp(candidates - candidates.max())
    probs /= probs.sum()
    if 0 < top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


def render_chat_template(
    template: str | None,
    messages: Sequence[Message],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render HF-style Jinja chat `template` for `messages`, the way transformers does.

    Used by the runtimes whose tokenizer is not a transformers object (GGUF metadata, ONNX folder
    read with `tokenizers`). Without a template, a plain "role: content" transcript is returned,
    so base models still answer something (their output is then only a smoke test).
    """
    if not template:
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        if add_generation_prompt:
            lines.append("assistant:")
        return "\n".join(lines)

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **_: Any) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return environment.from_string(template).render(
        messages=list(messages),
        bos_token=bos_token,
        eos_token=eos_token,
        add_generation_prompt=add_generation_prompt,
    )


def nvidia_gpu_count() -> int:
    """Number of NVIDIA GPUs NVML sees; 0 without a driver or without nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def resolve_device(device: str) -> str:
    """Map "auto" to "cuda" when an NVIDIA GPU is present, else "cpu"; pass "cpu"/"cuda" through."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    if device == "auto":
        return "cuda" if nvidia_gpu_count() > 0 else "cpu"
    return device


# ----------------------------------------------------------------------------------------------
# The Runner interface


class Runner(ABC):
    """A loaded model on one runtime: tokenizer, chat template, KV-cache forward, scoring, generation.

    Subclasses implement the primitives marked abstract; the sequence logic (chunked scoring,
    prefill, sampling loop, streaming) is shared. A Runner holds one sequence in its KV cache:
    `forward` appends to it, `reset` empties it.
    """

    name: ClassVar[str]
    default_batch_size: ClassVar[int] = 512

    def __init__(self, batch_size: int | None = None) -> None:
        self.path: Path | None = None
        self.n_ctx: int = 0
        self.n_threads: int | None = None
        self.device: str = "cpu"
        self.load_seconds: float | None = None
        self.batch_size: int = batch_size or self.default_batch_size  # tokens per runtime call
        self.n_past: int = 0

    # -- life cycle ---------------------------------------------------------------------------

    def load(
        self, path: str | Path, n_ctx: int = 2048, n_threads: int | None = None, device: str = "auto"
    ) -> Runner:
        """Load the artifact at `path` with a KV cache of `n_ctx` tokens; returns self.

        `n_threads` None lets the runtime choose; `device` is "auto", "cpu" or "cuda".
        Raises RuntimeLoadError with a one-line message naming the file when it cannot be loaded.
        """
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be positive, not {n_ctx}")
        self.n_ctx, self.n_threads = n_ctx, n_threads
        self.device = resolve_device(device)
        start = time.perf_counter()
        self._load(Path(path), n_ctx=n_ctx, n_threads=n_threads, device=self.device)
        self.load_seconds = time.perf_counter() - start
        self.n_past = 0
        return self

    @abstractmethod
    def _load(self, path: Path, *, n_ctx: int, n_threads: int | None, device: str) -> None:
        """Runtime-specific loading; sets `self.path` to the model file or folder actually loaded."""

    def close(self) -> None:  # noqa: B027 - optional hook, most runtimes free on garbage collection
        """Free the runtime's native resources early (optional)."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- tokenizer ----------------------------------------------------------------------------

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Width of the logit rows (may exceed the tokenizer's count of real tokens)."""

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        """Token ids of `text` with the artifact's own tokenizer.

        Special-token text (e.g. "<|im_start|>") is parsed as the special token, as transformers
        does. `add_special` adds BOS/EOS where the tokenizer is configured to add them.
        """

    @property
    def window_bos(self) -> int | None:
        """The BOS id this tokenizer adds before a text (every scoring window starts with it), None when none.

        What `tokenize(..., add_special=True)` does decides: llama.cpp follows the GGUF's
        `tokenizer.ggml.add_bos_token`, transformers and tokenizer.json their post-processor.
        """
        return window_bos(self.tokenize)

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""

    @abstractmethod
    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Prompt text for chat `messages` rendered with the artifact's chat template."""

    @abstractmethod
    def is_end_of_generation(self, token: int) -> bool:
        """True for end-of-turn / end-of-sequence tokens that stop generation."""

    # -- KV-cache forward ---------------------------------------------------------------------

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache (next `forward` starts a new sequence at position 0)."""

    @abstractmethod
    def _forward(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        """Run `ids` (at most `batch_size`) at positions n_past.., append them to the KV cache.

        Returns float32 logits [len(ids), vocab] when `all_logits`, else [1, vocab] for the last
        token. Must not change `self.n_past` (the caller does).
        """

    def forward(self, ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the sequence in the KV cache, in batches; returns their logits.

        All rows [len(ids), vocab] when `all_logits`, else only the last row [1, vocab].
        Raises ValueError when the sequence would outgrow the context `n_ctx`.
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("forward needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(
                f"{self.n_past + len(ids)} tokens exceed the context of {self.n_ctx} tokens: "
                "load with a larger n_ctx or score shorter windows"
            )
        rows: list[np.ndarray] = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            last_chunk = start + self.batch_size >= len(ids)
            logits = self._forward(chunk, all_logits=all_logits)
            self.n_past += len(chunk)
            if all_logits or last_chunk:
                rows.append(logits)
        return rows[0] if len(rows) == 1 else np.concatenate(rows, axis=0)

    def rewind(self, n_past: int) -> None:
        """Drop the cached positions from `n_past` on; the next `forward` continues there.

        Scores several continuations of one prompt (an image question's options, its answer and a greedy
        reply) after a single prefill of the prompt and its image, instead of one prefill each.
        """
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot rewind to position {n_past}: the cache holds {self.n_past}")
        if n_past == self.n_past:
            return
        if n_past == 0:
            self.reset()
            return
        self._rewind(n_past)
        self.n_past = n_past

    def _rewind(self, n_past: int) -> None:
        """Runtime-specific: keep positions 0..n_past-1 of the KV cache, drop the rest."""
        raise NotImplementedError(f"the {self.name} runner cannot drop cached positions")

    # -- images (vision-language artifacts) ---------------------------------------------------

    @property
    def has_vision(self) -> bool:
        """True when the loaded artifact carries a vision tower and projector (it answers about images)."""
        return False

    @property
    def image_tokens(self) -> int:
        """Positions one image takes in the sequence (0 for a text-only artifact)."""
        return 0

    def _forward_image(self, image: Path) -> np.ndarray:
        """Encode `image`, append its `image_tokens` projected features at positions n_past..; last logits [1, vocab].

        Must not change `self.n_past` (the caller does). Runtimes with a vision part override it.
        """
        raise ValueError(
            f"{self.path}: this artifact has no vision tower: images need a LLaVA checkpoint "
            "or its export with the vision part"
        )

    def forward_image(self, image: str | Path) -> np.ndarray:
        """Append an image to the sequence in the KV cache; returns the logits of its last position [1, vocab]."""
        if not self.has_vision:
            return self._forward_image(Path(image))
        if self.n_past + self.image_tokens > self.n_ctx:
            raise ValueError(
                f"{self.n_past + self.image_tokens} positions exceed the context of {self.n_ctx} tokens "
                f"(an image takes {self.image_tokens}): load with a larger n_ctx"
            )
        logits = self._forward_image(Path(image))
        self.n_past += self.image_tokens
        return logits

    def prompt_parts(
        self, prompt: str | Sequence[Message], image: str | Path | None = None
    ) -> list[PromptPart]:
        """The prompt as token-id runs and the image: the rendered text split at IMAGE_MARKER.

        Without an image this is `[prompt_ids(prompt)]`. With one, the prompt (raw text, or chat
        messages rendered with the chat template) must hold IMAGE_MARKER once, where the image goes;
        raw text gets the tokenizer's BOS as in `prompt_ids`.
        """
        if image is None:
            return [self.prompt_ids(prompt)]
        text = prompt if isinstance(prompt, str) else self.apply_chat_template(prompt)
        if text.count(IMAGE_MARKER) != 1:
            raise ValueError(
                f"an image prompt must hold {IMAGE_MARKER} exactly once (found {text.count(IMAGE_MARKER)})"
            )
        before, after = text.split(IMAGE_MARKER)
        parts: list[PromptPart] = [self.tokenize(before, add_special=isinstance(prompt, str)), Path(image)]
        parts.append(self.tokenize(after, add_special=False))
        return [part for part in parts if not isinstance(part, list) or part]

    def parts_length(self, parts: Sequence[PromptPart]) -> int:
        """Sequence positions `parts` take (image_tokens per image)."""
        return sum(len(part) if isinstance(part, list) else self.image_tokens for part in parts)

    def forward_parts(self, parts: Sequence[PromptPart]) -> np.ndarray:
        """Append token runs and images in order; returns the logits of the last position [1, vocab]."""
        if not parts:
            raise ValueError("forward needs at least one token or image")
        logits = np.zeros((1, 0), np.float32)
        for part in parts:
            logits = self.forward(part)[-1:] if isinstance(part, list) else self.forward_image(part)
        return logits

    def continuation_rows(self, parts: Sequence[PromptPart], continuation: Sequence[int]) -> np.ndarray:
        """Log-probability rows over the vocabulary at each continuation position, float32 [len, vocab].

        Row t is log p(. | prompt parts, continuation[:t]): the image-aware form of scoring an answer after
        its prompt. The prompt (text and images) is prefilled once from a fresh cache, then the
        continuation is run with all logits kept; the cache is left empty.
        """
        continuation = [int(i) for i in continuation]
        _check_fits(self.parts_length(parts), continuation, self.n_ctx)
        try:
            return PrefilledPrompt(self, parts).rows(continuation)
        finally:
            self.reset()

    def continuation_logprobs(self, parts: Sequence[PromptPart], continuation: Sequence[int]) -> np.ndarray:
        """log p(continuation[t] | prompt parts, continuation[:t]) per token, float32 [len(continuation)]."""
        continuation = [int(i) for i in continuation]
        rows = self.continuation_rows(parts, continuation)
        return rows[np.arange(len(continuation)), continuation].astype(np.float32)

    # -- scoring ------------------------------------------------------------------------------

    def iter_logprobs(self, ids: Sequence[int], chunk_size: int | None = None) -> Iterator[np.ndarray]:
        """Log-probability rows of `ids` from a fresh cache, one chunk [n, vocab] at a time.

        Row t (counting over all chunks) is log p(. | ids[:t+1]). Chunking keeps scoring memory at
        `chunk_size` x vocab, so a caller computing KL divergence never holds [len, vocab] at once.
        """
        ids = [int(i) for i in ids]
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx} tokens")
        chunk_size = chunk_size or self.batch_size
        self.reset()
        try:
            for start in range(0, len(ids), chunk_size):
                yield log_softmax(self.forward(ids[start : start + chunk_size], all_logits=True))
        finally:
            self.reset()

    def logprobs_full(self, ids: Sequence[int]) -> np.ndarray:
        """Per-position log-probabilities over the vocabulary, float32 [len(ids), vocab]."""
        return np.concatenate(list(self.iter_logprobs(ids)), axis=0)

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Same as `logprobs_full`: row t is the log-distribution of the token after ids[:t+1]."""
        return self.logprobs_full(ids)

    def token_logprobs(self, ids: Sequence[int]) -> np.ndarray:
        """log p(ids[t+1] | ids[:t+1]) for t = 0..len(ids)-2, float32 [len(ids) - 1] (cheap memory)."""
        ids = [int(i) for i in ids]
        out: list[np.ndarray] = []
        position = 0
        for rows in self.iter_logprobs(ids):
            targets = ids[position + 1 : position + 1 + len(rows)]
            out.append(rows[np.arange(len(targets)), targets])
            position += len(rows)
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def option_logprobs(self, prompt_ids: Sequence[int], options: Sequence[Sequence[int]]) -> list[float]:
        """Total log-probability of each option's tokens after `prompt_ids` (multiple-choice scoring).

        Sums log p(option tokens | prompt, earlier option tokens); divide by the option's length for
        a length-normalised score.
        """
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("option scoring needs at least one prompt token")
        totals = []
        for option in options:
            option = [int(i) for i in option]
            if not option:
                raise ValueError("an option tokenized to nothing")
            logprobs = self.token_logprobs(prompt + option)
            totals.append(float(logprobs[len(prompt) - 1 :].sum()))
        return totals

    # -- generation ---------------------------------------------------------------------------

    def prompt_ids(self, prompt: str | Sequence[Message]) -> list[int]:
        """Token ids for a raw prompt string, or for chat messages through the chat template.

        A chat prompt is rendered with `apply_chat_template` and then tokenized without adding
        specials, because templates write their own BOS where the model expects one.
        """
        if isinstance(prompt, str):
            return self.tokenize(prompt, add_special=True)
        return self.tokenize(self.apply_chat_template(prompt), add_special=False)

    def generate(
        self,
        prompt: str | Sequence[Message],
        max_new_tokens: int = 256,
        greedy: bool = True,
        temperature: float = 0.7,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stream: StreamCallback | None = None,
        image: str | Path | None = None,
    ) -> GenerationResult:
        """Generate an answer to a raw prompt or chat messages (rendered with the chat template).

        With `image`, the prompt holds IMAGE_MARKER where the image goes (see `prompt_parts`).

        Greedy by default; with `greedy=False` samples with temperature, top-k and top-p from a
        numpy generator seeded with `seed`, so a seeded run repeats. `stream` receives text pieces
        as soon as they decode to whole characters. Stops at an end-of-generation token, after
        `max_new_tokens`, or when the context is full.
        """
        parts = self.prompt_parts(prompt, image)
        prompt_length = self.parts_length(parts)
        if prompt_length >= self.n_ctx:
            raise ValueError(f"prompt of {prompt_length} positions does not fit the context of {self.n_ctx}")
        rng = np.random.default_rng(seed)
        self.reset()
        start = time.perf_counter()
        try:
            logits = self.forward_parts(parts)[-1]
        except Exception:
            self.reset()  # an image that fails half-way must not leave the prompt's first part in the cache
            raise
        prefill_seconds = time.perf_counter() - start

        generated: list[int] = []
        emitted = ""
        finish_reason = "length"
        start = time.perf_counter()
        while len(generated) < max_new_tokens:
            token = sample_token(
                logits, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, rng=rng
            )
            if self.is_end_of_generation(token):
                finish_reason = "eos"
                break
            generated.append(token)
            if stream is not None:
                text = self.detokenize(generated)
                if not text.endswith("\ufffd") and text.startswith(emitted) and len(text) > len(emitted):
                    stream(text[len(emitted) :])
                    emitted = text
            if len(generated) >= max_new_tokens:
                break
            if self.n_past >= self.n_ctx:
                finish_reason = "context"
                break
            logits = self.forward([token])[-1]
        decode_seconds = time.perf_counter() - start
        self.reset()

        text = self.detokenize(generated)
        if stream is not None and text.startswith(emitted) and len(text) > len(emitted):
            stream(text[len(emitted) :])
        return GenerationResult(
            text=text,
            token_ids=generated,
            prompt_tokens=prompt_length,
            finish_reason=finish_reason,
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
        )


def _check_fits(prompt_length: int, continuation: Sequence[int], n_ctx: int) -> None:
    """Refuse an empty answer, or one that does not fit the context after its prompt."""
    if not continuation:
        raise ValueError("an answer tokenized to nothing")
    if prompt_length + len(continuation) > n_ctx:
        raise ValueError(f"{prompt_length + len(continuation)} positions exceed the context of {n_ctx} tokens")


class PrefilledPrompt:
    """A prompt (text and image) prefilled once; continuations scored or generated after it, then rewound."""

    def __init__(self, runner: Runner, parts: Sequence[PromptPart]) -> None:
        self.runner = runner
        runner.reset()
        self.last = runner.forward_parts(parts)[-1]
        self.end = runner.n_past

    def rows(self, continuation: list[int]) -> np.ndarray:
        """log p(. | prompt, continuation[:t]) for each t, float32 [len(continuation), vocab]."""
        _check_fits(self.end, continuation, self.runner.n_ctx)
        rows = [log_softmax(self.last[None, :])]
        if len(continuation) > 1:
            rows.append(log_softmax(self.runner.forward(continuation[:-1], all_logits=True)))
            self.runner.rewind(self.end)
        return np.concatenate(rows, axis=0)

    def greedy(self, max_new_tokens: int) -> str:
        """The greedy reply after the prompt (as `Runner.generate` with greedy=True), as text."""
        runner, logits, tokens = self.runner, self.last, []
        while len(tokens) < max_new_tokens:
            token = int(np.argmax(logits))
            if runner.is_end_of_generation(token):
                break
            tokens.append(token)
            if len(tokens) >= max_new_tokens or runner.n_past >= runner.n_ctx:
                break
            logits = runner.forward([token])[-1]
        runner.rewind(self.end)
        return runner.detokenize(tokens)
