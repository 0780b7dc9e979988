"""Token windows: a token stream cut into fixed-length windows, each opened by the tokenizer's BOS.

Why: models such as Gemma are trained with `<bos>` at the start of every sequence and score far worse
without it (Gemma 3 270M on held-apart medical text: perplexity 94.7 without, 22.1 with). Calibration
blocks (`toolkit.data.make_blocks`), healing blocks and the evaluation windows every runtime scores
(`runtimes.measure`) are all cut here, so torch, llama.cpp and ONNX Runtime see the same ids.

Whether a tokenizer has a BOS to add is what it does itself: the token that encoding with special tokens
puts before the text that encoding without them gives (`window_bos`); transformers decides that by
`add_bos_token` / its post-processor, llama.cpp by the GGUF key `tokenizer.ggml.add_bos_token`. Tokenizers
that add none (SmolLM2, the demo model) get windows that are plain slices of the stream, as before. The
BOS counts inside the window length; a window whose first stream token already is the BOS (a chat template
that writes `<bos>` itself) gets no second one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from toolkit.core.errors import BedsideError

# Text encoded with and without special tokens to see what the tokenizer adds before a text.
BOS_PROBE = "Hello"

# (text, add special tokens) -> token ids: a runner's `tokenize`, or a transformers tokenizer wrapped.
Tokenize = Callable[[str, bool], Sequence[int]]


def leading_bos(with_special: Sequence[int], without_special: Sequence[int]) -> int | None:
    """The token encoding with special tokens puts before the plain encoding, or None when it adds none."""
    added, plain = [int(i) for i in with_special], [int(i) for i in without_special]
    if len(added) > len(plain) and added[1 : len(plain) + 1] == plain:
        return added[0]
    return None


def window_bos(tokenize: Tokenize) -> int | None:
    """The BOS id the tokenizer adds at the start of a text (what every window must start with), or None."""
    return leading_bos(tokenize(BOS_PROBE, True), tokenize(BOS_PROBE, False))


def hf_tokenize(tokenizer: Any) -> Tokenize:
    """`Tokenize` for a transformers tokenizer (its `__call__` with `add_special_tokens`)."""

    def tokenize(text: str, add_special: bool) -> list[int]:
        return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])

    return tokenize


def window_spans(stream: Sequence[int], length: int, bos: int | None) -> Iterator[tuple[int, int, bool]]:
    """(start, end, prepend BOS) of each consecutive window over `stream`.

    A window takes `length` stream tokens, or `length - 1` after a prepended `bos`; a window whose first
    stream token already is `bos` takes no second one. The last window may be short.
    """
    if length < (2 if bos is not None else 1):
        raise BedsideError(
            f"window length {length} is too short: at least {2 if bos is not None else 1} tokens"
            + (" (the BOS and one text token)" if bos is not None else "")
        )
    start = 0
    while start < len(stream):
        prepend = bos is not None and int(stream[start]) != bos
        end = min(len(stream), start + length - int(prepend))
        yield start, end, prepend
        start = end


def window_ids(stream: Sequence[int], length: int, bos: int | None) -> list[list[int]]:
    """The stream cut into consecutive windows of at most `length` ids, each opened by `bos` when one is given."""
    return [
        ([bos] if prepend and bos is not None else []) + [int(i) for i in stream[start:end]]
        for start, end, prepend in window_spans(stream, length, bos)
    ]
