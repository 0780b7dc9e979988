"""Calibration token blocks and the calibration/evaluation split, with a record that cites the data.

`split_calibration_eval` splits at the document level and then drops from evaluation any document
whose normalised text also appears in calibration, so a quality number can never be measured on
text the compression saw. `make_blocks` turns documents into the fixed-length token blocks that
layer scoring, AWQ and the importance matrix consume. Records hold counts and hashes, never texts
(patient privacy, and the NoDerivatives license of the default corpus).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from toolkit.core.errors import BedsideError
from toolkit.core.hashing import token_ids_sha256
from toolkit.core.records import SCHEMA_VERSION
from toolkit.core.windows import hf_tokenize, window_bos, window_ids
from toolkit.data.documents import NORMALISATION, Document, data_sha256
from toolkit.data.sources import NAMED_SOURCES

if TYPE_CHECKING:
    import torch

TOKENIZE_BATCH = 64  # documents per tokenizer call: fast tokenizers batch in Rust
# characters per tokenizer call: about 70 MB of tokenizer memory per MiB of text (SmolLM2's BPE, measured)
TOKENIZE_BATCH_CHARS = 4 << 20


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BedsideError(
            "the tokenizer has no end-of-sequence token: set eos_token in tokenizer_config.json"
        )
    return int(eos)


def _token_ids(tokenizer: Any, documents: Sequence[Document]) -> list[list[int]]:
    """Token ids of each rendered document, without special tokens added by the tokenizer."""
    texts = [document.render(tokenizer) for document in documents]
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def count_tokens(documents: Sequence[Document], tokenizer: Any) -> int:
    """Tokens of the rendered documents, counting one end-of-sequence separator per document."""
    return sum(len(ids) + 1 for batch in _batches(documents) for ids in _token_ids(tokenizer, batch))


def _batches(documents: Sequence[Document]) -> Iterator[list[Document]]:
    """Consecutive batches of at most TOKENIZE_BATCH documents and TOKENIZE_BATCH_CHARS characters
    (one longer document alone): a tokenizer call's memory grows with the text it is given."""
    batch: list[Document] = []
    characters = 0
    for document in documents:
        size = len(document.text)
        if batch and (len(batch) == TOKENIZE_BATCH or characters + size > TOKENIZE_BATCH_CHARS):
            yield batch
            batch, characters = [], 0
        batch.append(document)
        characters += size
    if batch:
        yield batch


def data_label(source: str | None) -> str:
    """How errors name the data: "data 'notes.txt'" (or just "the data" when the caller gave no name)."""
    return f"data '{source}'" if source else "the data"


@dataclass(frozen=True)
class TokenBlocks:
    """Non-overlapping calibration blocks, shape (n_blocks, block_len), plus how they were made.

    `n_blocks` can be below `requested_blocks` when the data ran out: callers should say so.
    """

    input_ids: torch.Tensor
    block_len: int
    requested_blocks: int
    seed: int
    documents_used: int
    tokens_read: int

    @property
    def n_blocks(self) -> int:
        """Blocks actually made."""
        return int(self.input_ids.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Counts and a hash of the token ids for records (no text, no ids)."""
        return {
            "n_blocks": self.n_blocks,
            "requested_blocks": self.requested_blocks,
            "block_len": self.block_len,
            "tokens": self.n_blocks * self.block_len,
            "seed": self.seed,
            "documents_used": self.documents_used,
            "tokens_read": self.tokens_read,
            "input_ids_sha256": token_ids_sha256(self.input_ids.cpu()),
        }


# (document, its token ids) -> the ids the model is fed (e.g. an image token expanded to image positions)
ExpandIds = Callable[[Document, list[int]], list[int]]


def make_blocks(
    documents: Sequence[Document],
    tokenizer: Any,
    block_len: int,
    n_blocks: int,
    seed: int,
    *,
    source: str | None = None,
    expand: ExpandIds | None = None,
) -> TokenBlocks:
    """`n_blocks` blocks of `block_len` tokens, chosen deterministically by `seed`.

    The documents are shuffled with the seed, rendered (chat template for question/answer
    documents), tokenized and concatenated with an end-of-sequence token after each one; the
    stream is cut into consecutive non-overlapping blocks, each opened by the tokenizer's BOS when
    it adds one (`toolkit.core.windows`: the BOS counts in `block_len`). Tokenization stops once enough
    tokens are read, so the cost grows with the blocks asked for, not with the corpus. Same documents +
    tokenizer + seed give the same blocks; when there are fewer tokens than asked, all whole blocks
    are returned (see TokenBlocks.n_blocks). `source` names the data in errors. `expand` rewrites
    each document's ids before packing (a LLaVA's image positions, `toolkit.compress.vision`).
    """
    import torch

    if block_len < 1 or n_blocks < 1:
        raise BedsideError(f"block length ({block_len}) and number of blocks ({n_blocks}) must be at least 1")
    eos = _eos_id(tokenizer)
    bos = window_bos(hf_tokenize(tokenizer))
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    needed = block_len * n_blocks  # stream tokens that fill n_blocks blocks even without a BOS in each
    stream: list[int] = []
    used = 0
    for batch in _batches([documents[index] for index in order]):
        for document, ids in zip(batch, _token_ids(tokenizer, batch), strict=True):
            stream.extend(expand(document, ids) if expand is not None else ids)
            stream.append(eos)
            used += 1
            if len(stream) >= needed:
                break
        if len(stream) >= needed:
            break
    blocks = [window for window in window_ids(stream, block_len, bos) if len(window) == block_len][:n_blocks]
    if not blocks:
        raise BedsideError(
            f"{data_label(source)} has {len(stream)} tokens in {len(documents)} documents, fewer than one "
            f"block of {block_len}: add documents or lower the block length (--seq-len)"
        )
    input_ids = torch.tensor(blocks, dtype=torch.long)
    return TokenBlocks(
        input_ids=input_ids,
        block_len=block_len,
        requested_blocks=n_blocks,
        seed=seed,
        documents_used=used,
        tokens_read=len(stream),
    )


class DataRecord(BaseModel):
    """What data a run used, for compression.json and reports: counts, tokens and hashes, no text.

    `sha256` covers the input documents in order; `calibration_sha256`/`eval_sha256` the two sides
    after the split. All hashes are over normalised text (see `normalisation`).
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    source: str | None = None
    license: str | None = None
    seed: int
    eval_fraction: float
    documents: int
    calibration_documents: int
    eval_documents: int
    eval_duplicates_removed: int
    calibration_tokens: int | None = None
    eval_tokens: int | None = None
    sha256: str
    calibration_sha256: str
    eval_sha256: str
    normalisation: str = NORMALISATION

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return self.model_dump(mode="json")


def split_calibration_eval(
    documents: Sequence[Document],
    eval_fraction: float,
    seed: int,
    *,
    tokenizer: Any | None = None,
    source: str | None = None,
) -> tuple[list[Document], list[Document], DataRecord]:
    """Split documents into calibration and evaluation sets that share no document.

    A seeded shuffle picks round(eval_fraction * n) documents (at least one) for evaluation; both
    sides keep the input order. Evaluation documents whose normalised text (and image name) also
    occurs in calibration are then removed and counted in `eval_duplicates_removed`. With a
    tokenizer the record also counts tokens (rendered, one separator per document). `source`
    names the data; a named source's license is filled in from the registry.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise BedsideError(
            f"eval fraction {eval_fraction} must be in [0, 1): e.g. 0.1 keeps 10% for evaluation"
        )
    if not documents:
        raise BedsideError(f"no documents to split: {data_label(source)} is empty")
    n_eval = 0
    if eval_fraction > 0:
        if len(documents) < 2:
            raise BedsideError(
                f"{data_label(source)} holds one document, which cannot be split into calibration and "
                "evaluation: add documents"
            )
        n_eval = min(len(documents) - 1, max(1, round(eval_fraction * len(documents))))
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[:n_eval])
    calibration = [document for index, document in enumerate(documents) if index not in eval_indices]
    calibration_keys = {document.content_key() for document in calibration}
    drawn = [document for index, document in enumerate(documents) if index in eval_indices]
    evaluation = [document for document in drawn if document.content_key() not in calibration_keys]
    if n_eval and not evaluation:
        raise BedsideError(
            f"all {n_eval} evaluation documents of {data_label(source)} also occur in its calibration part "
            "(duplicates): pass separate evaluation data with --eval"
        )
    named = NAMED_SOURCES.get(source) if source else None
    record = DataRecord(
        source=source,
        license=named.license if named else None,
        seed=seed,
        eval_fraction=eval_fraction,
        documents=len(documents),
        calibration_documents=len(calibration),
        eval_documents=len(evaluation),
        eval_duplicates_removed=len(drawn) - len(evaluation),
        calibration_tokens=count_tokens(calibration, tokenizer) if tokenizer is not None else None,
        eval_tokens=count_tokens(evaluation, tokenizer) if tokenizer is not None else None,
        sha256=data_sha256(documents),
        calibration_sha256=data_sha256(calibration),
        eval_sha256=data_sha256(evaluation),
    )
    return calibration, evaluation, record
