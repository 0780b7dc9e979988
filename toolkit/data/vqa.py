"""Image question answering (SLAKE, VQA-RAD): how answers are normalised, options chosen and scored.

These rules are shared by the demo VLM's benchmark (bench/demo_vlm.py) and `bedside eval`, so a
figure means the same thing wherever it is printed:

- answers are compared after `normalise_answer`;
- a CLOSED question is scored as a choice: the model's log-likelihood of each option of
  `closed_options` as the assistant's answer, the highest wins;
- an OPEN question is scored on a generated answer: exact match after normalisation, and token
  recall (the share of the reference's tokens found in the prediction);
- `TextOnlyBaseline` is the floor a model must clear to show it reads the image: the most frequent
  training answer to the same question, without looking at any image;
- `held_apart_vqa_rad` fixes the part of VQA-RAD train (by image) that the demo VLM never trains on,
  since VQA-RAD has no validation split of its own here.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data.documents import Document

YES, NO = "yes", "no"
ARTICLES = frozenset({"a", "an", "the"})
NORMALISATION = (
    "unicode NFKC, casefold, every character that is not a letter, digit or whitespace replaced by a "
    "space (a '.' between two digits is kept), the words a / an / the dropped, whitespace runs "
    "collapsed to one space, stripped"
)
# Held-apart slice of VQA-RAD train: images whose name hashes into the first 15 of 100 buckets.
HELD_APART_SALT = "bedside-vqa-rad-held-apart-v1"
HELD_APART_PERCENT = 15

_PUNCTUATION = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")
_WHITESPACE = re.compile(r"\s+")
_OR = re.compile(r"\s+or\s+", re.IGNORECASE)


def normalise_answer(text: str) -> str:
    """The canonical form answers and questions are compared in (see NORMALISATION).

    "The X-Ray." -> "x ray"; "Non-contrast CT" -> "non contrast ct"; "3.5 cm" -> "3.5 cm". Case,
    punctuation and articles carry no meaning in these data sets' short answers, so they must not
    decide whether a prediction is right.
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = _PUNCTUATION.sub(" ", folded)
    words = [word for word in _WHITESPACE.split(spaced) if word and word not in ARTICLES]
    return " ".join(words)


def is_closed(document: Document) -> bool:
    """True for a CLOSED question (answer type as the data set labels it, any case)."""
    return (document.answer_type or "").upper() == "CLOSED"


def is_yes_no(answer: str) -> bool:
    """True when the answer normalises to "yes" or "no"."""
    return normalise_answer(answer) in (YES, NO)


def _cased_like(answer: str, word: str) -> str:
    """`word` written in the casing of `answer` ("Yes" -> "No", "yes" -> "no", "YES" -> "NO")."""
    if answer.isupper() and len(answer) > 1:
        return word.upper()
    return word.capitalize() if answer[:1].isupper() else word


def _drop_leading_article(item: str) -> str:
    """"a contrast CT" -> "contrast CT": an option is a noun phrase, the article belongs to the question."""
    first, _, rest = item.strip().partition(" ")
    return rest.strip() if first.casefold() in ARTICLES and rest.strip() else item.strip()


def _shared_suffix(left_words: Sequence[str], after: Sequence[str], longest: int = 3) -> int:
    """How many words that end `left_words` also follow the right-hand item ("T1 weighted or T2 weighted")."""
    for size in range(min(longest, len(left_words) - 1, len(after)), 0, -1):
        if [w.casefold() for w in left_words[-size:]] == [w.casefold() for w in after[:size]]:
            return size
    return 0


def named_alternatives(question: str, answer: str) -> tuple[str, ...] | None:
    """The alternatives a question names ("..., X or Y?", "... X, Y or Z?"), or None when none are found.

    The text is split at its last " or ": when the part before it holds a comma, the items are the
    comma-separated pieces after the first comma, plus the piece after " or " up to the next comma
    ("Which is the biggest in this image, lung, liver or heart?" -> lung, liver, heart). Without a
    comma the span length is taken from the answer: n = its number of normalised words, X = the last
    n words before " or " (skipping words the two items share at their end, "T1 weighted or T2
    weighted") and Y = the first n words after it, or the whole rest after it when that is the answer ("Is this a contrast CT or a non-contrast CT?" with answer "non-contrast CT").
    The answer's own spelling replaces the item it matches; None when no item matches the answer,
    so a parse that went wrong falls back to the training answers (`closed_options`).
    """
    text = question.strip().rstrip("?").strip()
    matches = list(_OR.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    left, right = text[: last.start()], text[last.end() :]
    right = right.split(",")[0].strip()
    target = normalise_answer(answer)
    candidates: list[tuple[str, ...]] = []
    if "," in left:
        items = [piece.strip() for piece in left.split(",")[1:]]
        candidates.append((*items, right))
    else:
        left_words, right_words = left.split(), right.split()
        width = max(1, len(target.split()))
        shared = _shared_suffix(left_words, right_words[width:])
        end = len(left_words) - shared
        candidates.append((" ".join(left_words[max(0, end - width) : end]), " ".join(right_words[:width])))
        if normalise_answer(right) == target:
            candidates.append((" ".join(left_words[-len(right_words) :]), right))
    for raw in candidates:
        items = tuple(_drop_leading_article(item) for item in raw)
        normalised = [normalise_answer(item) for item in items]
        if target in normalised and all(normalised) and len(set(normalised)) == len(normalised):
            return tuple(answer if norm == target else item for item, norm in zip(items, normalised, strict=True))
    return None


def closed_answer_sets(training: Iterable[Document]) -> dict[str, tuple[str, ...]]:
    """Normalised question -> the distinct answers (first spelling seen) of training's CLOSED questions.

    Input of `closed_options`' last fallback: the answers a templated question ("Which organ is
    abnormal?") took in training are the plausible choices for it.
    """
    answers: dict[str, dict[str, str]] = {}
    for document in training:
        if not is_closed(document) or document.question is None or document.answer is None:
            continue
        seen = answers.setdefault(normalise_answer(document.question), {})
        seen.setdefault(normalise_answer(document.answer), document.answer)
    return {question: tuple(spellings.values()) for question, spellings in answers.items()}


def closed_options(document: Document, training_answers: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """The options a CLOSED question is scored over, the true answer always among them.

    In order of precedence:
    1. {yes, no} (in the answer's casing) when the answer is yes or no;
    2. the alternatives the question names (`named_alternatives`);
    3. the answers seen for CLOSED questions with the same normalised question in training
       (`training_answers`, from `closed_answer_sets`), with the true answer added when missing.
    The true answer keeps its own spelling; options are distinct after normalisation. A question
    with no alternative anywhere ends up with the answer alone (every scorer gets it right).
    """
    if document.question is None or document.answer is None:
        raise ValueError("closed_options needs a question/answer document")
    answer = document.answer
    if is_yes_no(answer):
        return (_cased_like(answer, YES), _cased_like(answer, NO))
    named = named_alternatives(document.question, answer)
    if named is not None:
        return named
    target = normalise_answer(answer)
    options = [answer]
    seen = {target}
    for option in training_answers.get(normalise_answer(document.question), ()):
        norm = normalise_answer(option)
        if norm not in seen:
            seen.add(norm)
            options.append(option)
    return tuple(options)


def exact_match(prediction: str, reference: str) -> bool:
    """True when prediction and reference are equal after `normalise_answer`."""
    return normalise_answer(prediction) == normalise_answer(reference)


def token_recall(prediction: str, reference: str) -> float:
    """recall = |R ∩ P| / |R|, R and P the sets of words of the normalised reference and prediction.

    Credits a generated answer that contains the reference ("the left lung" for "Left Lung") without
    rewarding length beyond that; 1.0 for an empty reference (nothing to recall).
    """
    reference_words = set(normalise_answer(reference).split())
    if not reference_words:
        return 1.0
    return len(reference_words & set(normalise_answer(prediction).split())) / len(reference_words)


@dataclass
class TextOnlyBaseline:
    """Answers from the question alone: the most frequent training answer to the same normalised question.

    A question never seen in training gets `default` ("yes", the most common closed answer). Ties
    between equally frequent answers go to `default` when it is among them, else to the one seen
    first in training order. A vision-language model has to beat this to show it uses the image.
    """

    default: str = YES
    answers: dict[str, str] = field(default_factory=dict)

    def fit(self, training: Iterable[Document], closed_only: bool = True) -> TextOnlyBaseline:
        """Count the training answers per normalised question (CLOSED questions only by default)."""
        counts: dict[str, Counter[str]] = {}
        spelling: dict[str, str] = {}
        for document in training:
            if document.question is None or document.answer is None:
                continue
            if closed_only and not is_closed(document):
                continue
            norm = normalise_answer(document.answer)
            spelling.setdefault(norm, document.answer)
            counts.setdefault(normalise_answer(document.question), Counter())[norm] += 1
        default = normalise_answer(self.default)
        self.answers = {}
        for question, counter in counts.items():
            top = max(counter.values())
            tied = [answer for answer, count in counter.items() if count == top]  # training order
            self.answers[question] = spelling.get(default, self.default) if default in tied else spelling[tied[0]]
        return self

    def predict(self, question: str) -> str:
        """The most frequent training answer to this question, or `default` for an unseen question."""
        return self.answers.get(normalise_answer(question), self.default)

    def accuracy(self, documents: Sequence[Document]) -> float:
        """Share of the documents whose prediction equals the answer after normalisation."""
        if not documents:
            raise ValueError("accuracy of an empty set of documents")
        right = sum(exact_match(self.predict(d.question or ""), d.answer or "") for d in documents)
        return right / len(documents)


def held_apart_bucket(image: Path | str) -> int:
    """Bucket 0-99 of an image: int(sha256(SALT + ":" + file name)[:8 hex], 16) % 100.

    Only the file name counts (not the folder), so the slice is the same wherever the data lies.
    """
    name = Path(image).name
    digest = hashlib.sha256(f"{HELD_APART_SALT}:{name}".encode()).hexdigest()
    return int(digest[:8], 16) % 100


def is_held_apart(image: Path | str) -> bool:
    """True for an image of the held-apart slice (bucket < HELD_APART_PERCENT, about 15 % of images)."""
    return held_apart_bucket(image) < HELD_APART_PERCENT


def held_apart_vqa_rad(documents: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    """Split VQA-RAD train into (training part, held-apart part) by image (`is_held_apart`).

    Every question about a held-apart image is held apart, so no image is seen on both sides; the
    demo VLM trains on the first part only and is measured on the second.
    """
    kept: list[Document] = []
    apart: list[Document] = []
    for document in documents:
        if document.image is None:
            raise ValueError(f"document {document.id} has no image: the slice is defined by image")
        (apart if is_held_apart(document.image) else kept).append(document)
    return kept, apart
