"""`Document`: one unit of calibration or evaluation data, and how it becomes model text.

A document is the unit the calibration/evaluation split works on, so that no text can sit on both
sides. Plain documents carry only `text`; question/answer documents also keep their parts
(question, context, options, answer, image) so evaluation can prompt with the question alone and
calibration can render the whole exchange with the model's own chat template.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.vision import IMAGE_MARKER

YES_NO_MAYBE: tuple[str, ...] = ("yes", "no", "maybe")
NORMALISATION = "unicode NFKC, casefold, whitespace runs collapsed to one space, stripped"
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_WHITESPACE = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Canonical form used to detect duplicates and to hash data (see NORMALISATION).

    Case and spacing differences must not let the same report slip into both calibration and
    evaluation, so they are folded away before comparing.
    """
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


@dataclass(frozen=True)
class Document:
    """One record of calibration/evaluation data.

    `text` is always set: for plain documents it is the document, for question/answer documents a
    plain rendering (prompt, newline, answer) used when the tokenizer has no chat template and for
    duplicate detection. `options`, when present, always contain `answer` (the loaders check it).
    """

    text: str
    id: str | None = None
    source: str | None = None
    question: str | None = None
    answer: str | None = None
    options: tuple[str, ...] = ()
    context: str | None = None
    image: Path | None = None
    answer_type: str | None = None
    explanation: str | None = None  # e.g. PubMedQA long_answer: gives the answer away, never prompted

    @property
    def is_question_answer(self) -> bool:
        """True when the document is a question with its answer (rendered as a chat exchange)."""
        return self.question is not None and self.answer is not None

    @property
    def answer_index(self) -> int | None:
        """Position of the answer among `options` (None for open questions)."""
        if not self.options or self.answer is None:
            return None
        return [option.casefold() for option in self.options].index(self.answer.casefold())

    def prompt(self) -> str:
        """The user turn: the image marker (image questions), context (if any), the question, the options.

        Yes/no/maybe questions ask for one of the words; other multiple choice lists lettered options.
        An image question starts with IMAGE_MARKER on its own line, where a LLaVA puts the image
        (LLaVA-1.5's order: image, then text).
        """
        if self.question is None:
            raise ValueError("prompt() is only defined for question/answer documents")
        parts = [self.context] if self.context else []
        if self.image is not None:
            parts.insert(0, IMAGE_MARKER)
        parts.append(self.question)
        if self.options:
            if is_yes_no_maybe(self.options):
                parts.append("Answer " + ", ".join(self.options[:-1]) + " or " + self.options[-1] + ".")
            else:
                parts.append("\n".join(f"{_LETTERS[i]}. {option}" for i, option in enumerate(self.options)))
        text = "\n\n".join(parts)
        return text.replace(f"{IMAGE_MARKER}\n\n", f"{IMAGE_MARKER}\n", 1)

    def response(self) -> str:
        """The assistant turn: the answer, prefixed by its letter for lettered multiple choice."""
        if self.answer is None:
            raise ValueError("response() is only defined for question/answer documents")
        index = self.answer_index
        if index is not None and not is_yes_no_maybe(self.options):
            return f"{_LETTERS[index]}. {self.options[index]}"
        return self.answer

    def messages(self) -> list[dict[str, str]]:
        """The exchange as chat messages: user = prompt (question), assistant = answer."""
        return [{"role": "user", "content": self.prompt()}, {"role": "assistant", "content": self.response()}]

    def render(self, tokenizer: Any | None = None) -> str:
        """The text the model is fed: the chat-templated exchange for question/answer documents.

        Uses the tokenizer's own chat template so calibration activations look like the ones the
        model sees when deployed; falls back to the plain `text` for plain documents, without a
        tokenizer, or when the tokenizer has no chat template (base models).
        """
        if not self.is_question_answer:
            return self.text
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            return f"{self.prompt()}\n{self.response()}" if self.image is not None else self.text
        return tokenizer.apply_chat_template(self.messages(), tokenize=False)

    def content_key(self) -> str:
        """Normalised identity of the document: its text plus the image file name, if any.

        The image name matters for visual QA: "Is this an MRI? No" about two different images are
        two different documents.
        """
        key = normalise_text(self.text)
        return f"{key}\x00image:{self.image.name}" if self.image is not None else key


def is_yes_no_maybe(options: Sequence[str]) -> bool:
    """True for the yes/no(/maybe) option sets of PubMedQA-style questions."""
    folded = [option.casefold() for option in options]
    return len(folded) >= 2 and set(folded) <= set(YES_NO_MAYBE) and len(set(folded)) == len(folded)


def question_answer_document(
    question: str,
    answer: str,
    *,
    options: Sequence[str] = (),
    context: str | None = None,
    **fields: Any,
) -> Document:
    """Build a question/answer document with its plain `text` rendering filled in."""
    draft = Document(
        text="", question=question, answer=answer, options=tuple(options), context=context, **fields
    )
    plain = f"{draft.prompt()}\n{draft.response()}"
    return Document(
        text=plain, question=question, answer=answer, options=tuple(options), context=context, **fields
    )


def data_sha256(documents: Iterable[Document]) -> str:
    """sha256 over the documents' normalised content, in order (identifies data without storing it)."""
    digest = hashlib.sha256()
    for document in documents:
        encoded = document.content_key().encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()
