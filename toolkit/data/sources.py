"""Loaders for calibration/evaluation data: files a user passes and the named data sets Bedside knows.

Every loader returns a list of `Document`. Formats:
- plain text (.txt, .md, anything not starting with "{" or "["): one document per paragraph, split
  on blank lines;
- JSONL with a text field (name configurable, default "text");
- question/answer JSONL: `question` + `answer`, optional `options`/`choices` (a list, or a dict of
  label -> text) for multiple choice, optional `context`/`contexts`; a `label` (or
  `final_decision`) of yes/no/maybe instead of `answer` makes a yes/no/maybe question (PubMedQA);
- image + question + answer JSONL: `image` is a path relative to the JSONL file (visual QA, LLaVA);
- a .json file holding one array of such objects.
Bad data raises `BedsideError` with one line naming the file, the line and how to fix it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from toolkit.core.errors import BedsideError
from toolkit.core.paths import shared_data_dir
from toolkit.core.records import DEFAULT_DATA
from toolkit.data.documents import YES_NO_MAYBE, Document, question_answer_document
from toolkit.data.radiology import (
    RADIOLOGY_CITATION,
    RADIOLOGY_LICENSE,
    RADIOLOGY_SOURCE,
    load_radiology_reports,
)

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
OPTION_FIELDS = ("options", "choices")
CONTEXT_FIELDS = ("context", "contexts")
YES_NO_MAYBE_FIELDS = ("label", "final_decision")
# Size caps: a data file is read whole, and one document is tokenized whole, so both are bounded
# (one 78 MB line once grew compress to 4.5 GB). The largest record of the bundled data sets is 27 KB.
MAX_DATA_FILE_BYTES = 256 << 20
MAX_RECORD_BYTES = 1 << 20  # one JSONL line, JSON array item or text paragraph

Record = dict[str, Any]


def read_text_file(path: str | Path) -> str:
    """The file's text, refusing what cannot be calibration data: missing, empty or not UTF-8."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BedsideError(f"data file '{path}' not found: check the path")
    if not path.is_file():
        raise BedsideError(f"data path '{path}' is not a file: pass a .txt, .jsonl or .json file")
    size = path.stat().st_size
    if size > MAX_DATA_FILE_BYTES:
        raise BedsideError(
            f"data file '{path}' is {size:,} bytes, more than the {MAX_DATA_FILE_BYTES:,} a data file may "
            "hold: pass a sample of it (calibration uses at most 128 sequences)"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise BedsideError(
            f"data file '{path}' is not UTF-8 (bad byte at line {line}, offset {error.start}): "
            "re-save it as UTF-8"
        ) from None
    if not text.strip():
        raise BedsideError(f"data file '{path}' is empty: give it at least one document")
    return text


def _lines(text: str) -> list[str]:
    """Lines split on "\\n" only: str.splitlines would also split on U+2028 etc. inside JSON strings."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _too_large(path: Path, where: str, size: int) -> BedsideError:
    return BedsideError(
        f"data file '{path}': {where} is {size:,} bytes, more than the {MAX_RECORD_BYTES:,} one record "
        "may hold: split it into smaller documents"
    )


def load_text_documents(path: str | Path) -> list[Document]:
    """Plain text: one document per paragraph (blocks separated by one or more blank lines)."""
    path = Path(path).expanduser()
    documents: list[Document] = []
    paragraph: list[str] = []
    size = first_line = 0
    for number, line in enumerate([*_lines(read_text_file(path)), ""], start=1):
        if line.strip():
            if not paragraph:
                size, first_line = 0, number
            paragraph.append(line.rstrip())
            size += len(line.encode("utf-8")) + 1
            if size > MAX_RECORD_BYTES:
                raise _too_large(path, f"the paragraph from line {first_line}", size)
        elif paragraph:
            documents.append(
                Document(text="\n".join(paragraph), id=f"{path.name}#{len(documents) + 1}", source=path.name)
            )
            paragraph = []
    return documents


def iter_json_records(path: str | Path) -> Iterator[tuple[int, Record]]:
    """(line number, object) for each non-blank line of a JSONL file, or each item of a JSON array."""
    path = Path(path).expanduser()
    text = read_text_file(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise BedsideError(
                f"data file '{path}': invalid JSON on line {error.lineno} ({error.msg}): fix the array"
            ) from None
        if not isinstance(items, list):
            raise BedsideError(f"data file '{path}': not one JSON array of objects")
        for index, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise BedsideError(
                    f"data file '{path}': item {index} of the JSON array is {type(item).__name__}, "
                    'not an object: each item must be {"field": ...}'
                )
            size = len(json.dumps(item, ensure_ascii=False).encode("utf-8"))
            if size > MAX_RECORD_BYTES:
                raise _too_large(path, f"item {index} of the JSON array", size)
            yield index, item
        return
    for number, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_BYTES or len(line.encode("utf-8")) > MAX_RECORD_BYTES:
            raise _too_large(path, f"line {number}", len(line.encode("utf-8")))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BedsideError(
                f"data file '{path}': invalid JSON on line {number} ({error.msg}): "
                "JSONL needs one complete JSON object per line"
            ) from None
        if not isinstance(record, dict):
            raise BedsideError(
                f"data file '{path}': line {number} is a JSON {type(record).__name__}, not an object: "
                'JSONL needs one {"field": ...} object per line'
            )
        yield number, record


def _missing_field(path: Path, number: int, field: str, record: Record, hint: str = "") -> BedsideError:
    found = ", ".join(sorted(record)) or "none"
    return BedsideError(
        f"data file '{path}': line {number} has no field '{field}' (fields found: {found}){hint}"
    )


def _string_field(path: Path, number: int, record: Record, field: str, numbers: bool = False) -> str:
    """A required text field; with `numbers`, a number is accepted as its text (VQA count answers like 2)."""
    if field not in record or record[field] is None:
        raise _missing_field(path, number, field, record)
    value = record[field]
    allowed = (str, int, float) if numbers else (str,)
    if isinstance(value, bool) or not isinstance(value, allowed):
        expected = "text or a number" if numbers else "text (a JSON string)"
        raise BedsideError(
            f"data file '{path}': line {number} field '{field}' is {_json_type(value)}, expected {expected}"
        )
    return str(value).strip()


def _json_type(value: object) -> str:
    """The JSON name of a parsed value's type, with the value when it is short."""
    names = {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    name = names.get(type(value), type(value).__name__)
    shown = json.dumps(value)
    return f"{name} ({shown})" if len(shown) <= 40 else name


def load_text_jsonl(path: str | Path, text_field: str = "text") -> list[Document]:
    """JSONL (or a JSON array) of objects with a text field; empty texts are skipped."""
    path = Path(path).expanduser()
    documents = []
    for number, record in iter_json_records(path):
        if text_field not in record:
            raise _missing_field(
                path, number, text_field, record, hint=": choose the text field with text_field"
            )
        text = _string_field(path, number, record, text_field)
        if text:
            documents.append(Document(text=text, id=_record_id(path, number, record), source=path.name))
    if not documents:
        raise BedsideError(
            f"data file '{path}': every '{text_field}' is empty: give it at least one document"
        )
    return documents


def _record_id(path: Path, number: int, record: Record) -> str:
    return str(record["id"]) if record.get("id") not in (None, "") else f"{path.name}:{number}"


def _options(path: Path, number: int, record: Record) -> tuple[tuple[str, ...], dict[str, str]]:
    """The choices of a multiple-choice record and a label -> text map ("A" -> option text)."""
    field = next((name for name in OPTION_FIELDS if record.get(name) not in (None, [], {})), None)
    if field is None:
        return (), {}
    value = record[field]
    if isinstance(value, dict):
        labels = {str(label).strip(): str(text).strip() for label, text in value.items()}
        return tuple(labels.values()), labels
    if isinstance(value, list) and all(isinstance(item, str | int | float) for item in value):
        options = tuple(str(item).strip() for item in value)
        return options, {chr(ord("A") + i): option for i, option in enumerate(options) if i < 26}
    raise BedsideError(
        f"data file '{path}': line {number} field '{field}' must be a list of texts or a "
        f"{{label: text}} object, not {type(value).__name__}"
    )


def _resolve_answer(
    path: Path, number: int, answer: Any, options: tuple[str, ...], labels: dict[str, str]
) -> str:
    """Map an answer given as option text, label ("B") or index (1) to the option text."""
    if not options:
        return str(answer).strip()
    folded = {option.casefold(): option for option in options}
    text = str(answer).strip()
    if text.casefold() in folded:
        return folded[text.casefold()]
    if text in labels:
        return labels[text]
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        return options[answer]
    raise BedsideError(
        f"data file '{path}': line {number} answer '{text}' is not one of its options "
        f"({', '.join(options)}) nor an option label ({', '.join(labels)})"
    )


def _question_answer(
    path: Path, number: int, record: Record, question_field: str, answer_field: str
) -> Document:
    """One question/answer record -> Document (multiple choice and yes/no/maybe resolved)."""
    if question_field not in record:
        raise _missing_field(path, number, question_field, record)
    question = _string_field(path, number, record, question_field)
    options, labels = _options(path, number, record)
    explanation = None
    if answer_field in record:
        raw_answer = record[answer_field]
        _string_field(path, number, record, answer_field, numbers=True)
    else:
        label_field = next((name for name in YES_NO_MAYBE_FIELDS if name in record), None)
        if label_field is None:
            raise _missing_field(
                path, number, answer_field, record, hint=" (a yes/no/maybe item may give 'label' instead)"
            )
        raw_answer = _string_field(path, number, record, label_field, numbers=True).lower()
        options = options or YES_NO_MAYBE
        explanation = record.get("long_answer")
    answer = _resolve_answer(path, number, raw_answer, options, labels)
    context_field = next((name for name in CONTEXT_FIELDS if record.get(name)), None)
    context = None
    if context_field is not None:
        value = record[context_field]
        parts = value if isinstance(value, list) else [value]
        if not all(isinstance(part, str) for part in parts):
            raise BedsideError(
                f"data file '{path}': line {number} field '{context_field}' is {_json_type(value)}, "
                "expected text (a JSON string) or a list of texts"
            )
        context = "\n".join(part.strip() for part in parts)
    return question_answer_document(
        question,
        answer,
        options=options,
        context=context,
        id=_record_id(path, number, record),
        source=path.name,
        answer_type=record.get("answer_type"),
        explanation=str(explanation) if explanation else None,
    )


def load_question_answer_jsonl(
    path: str | Path, question_field: str = "question", answer_field: str = "answer"
) -> list[Document]:
    """Question/answer JSONL (open, multiple choice or yes/no/maybe); see the module docstring."""
    path = Path(path).expanduser()
    return [
        _question_answer(path, number, record, question_field, answer_field)
        for number, record in iter_json_records(path)
    ]


def load_image_question_answer_jsonl(
    path: str | Path,
    image_field: str = "image",
    question_field: str = "question",
    answer_field: str = "answer",
) -> list[Document]:
    """Visual QA JSONL: image path (relative to the JSONL's folder) + question + answer; images must exist."""
    path = Path(path).expanduser()
    documents = []
    for number, record in iter_json_records(path):
        if image_field not in record:
            raise _missing_field(path, number, image_field, record)
        image = (path.parent / _string_field(path, number, record, image_field)).resolve()
        if not image.is_file():
            raise BedsideError(
                f"data file '{path}': line {number} image '{record[image_field]}' not found at {image}: "
                "image paths are relative to the JSONL file's folder"
            )
        documents.append(
            replace(_question_answer(path, number, record, question_field, answer_field), image=image)
        )
    return documents


def detect_format(path: str | Path, text_field: str = "text") -> str:
    """The file's format: "text", "text-jsonl", "question-answer" or "image-question-answer"."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return "text"
    text = read_text_file(path)
    if suffix not in JSON_SUFFIXES and not text.lstrip().startswith(("{", "[")):
        return "text"
    number, first = next(iter_json_records(path), (0, {}))
    if "question" in first and "image" in first:
        return "image-question-answer"
    if "question" in first:
        return "question-answer"
    if text_field in first:
        return "text-jsonl"
    raise _missing_field(
        path,
        number,
        text_field,
        first,
        hint=": give each line a text field (or question/answer fields), or pass text_field",
    )


def load_path(path: str | Path, text_field: str = "text") -> list[Document]:
    """Load any supported file, choosing the loader with `detect_format`."""
    loaders: dict[str, Callable[[Path], list[Document]]] = {
        "text": load_text_documents,
        "text-jsonl": lambda file: load_text_jsonl(file, text_field=text_field),
        "question-answer": load_question_answer_jsonl,
        "image-question-answer": load_image_question_answer_jsonl,
    }
    path = Path(path).expanduser()
    return loaders[detect_format(path, text_field=text_field)](path)


@dataclass(frozen=True)
class NamedSource:
    """A data set Bedside can load by name, with what a record or document must cite about it."""

    name: str
    description: str
    license: str
    citation: str
    load: Callable[[], list[Document]]


def _shared_file(name: str, relative: str) -> Path:
    """A file of the development data beside the checkout; BedsideError on a fresh clone."""
    root = shared_data_dir()
    if root is None:
        raise BedsideError(
            f"data set '{name}' is development data that lives beside a checkout (../shared/data or "
            "$BEDSIDE_SHARED_DATA), which is absent here: pass a file path, or 'radiology'"
        )
    path = root / relative
    if not path.is_file():
        raise BedsideError(
            f"data set '{name}': expected {path}, which is missing: check $BEDSIDE_SHARED_DATA"
        )
    return path


def _named_loader(
    name: str, relative: str, loader: Callable[[Path], list[Document]]
) -> Callable[[], list[Document]]:
    def load() -> list[Document]:
        return [replace(document, source=name) for document in loader(_shared_file(name, relative))]

    return load


def _named_sources() -> dict[str, NamedSource]:
    return {
        source.name: source
        for source in (
            NamedSource(
                "radiology", RADIOLOGY_SOURCE, RADIOLOGY_LICENSE, RADIOLOGY_CITATION, load_radiology_reports
            ),
            NamedSource(
                "medquad",
                "MedQuAD consumer-health question/answer pairs (NIH websites), shared dev data",
                "CC BY 4.0",
                "Ben Abacha and Demner-Fushman, BMC Bioinformatics 20, 511 (2019)",
                _named_loader("medquad", "medquad/medquad.jsonl", load_question_answer_jsonl),
            ),
            NamedSource(
                "pubmedqa",
                "PubMedQA PQA-L non-test items (yes/no/maybe over abstracts), shared dev data",
                "MIT",
                "Jin et al., PubMedQA, EMNLP-IJCNLP 2019",
                _named_loader("pubmedqa", "pubmedqa/dev.jsonl", load_question_answer_jsonl),
            ),
            NamedSource(
                "vqa-rad",
                "VQA-RAD train split (radiology images + QA), shared dev data",
                "CC0 1.0",
                "Lau et al., Scientific Data 5, 180251 (2018)",
                _named_loader("vqa-rad", "vqa_rad/train.jsonl", load_image_question_answer_jsonl),
            ),
            NamedSource(
                "slake",
                "SLAKE-en train split (radiology images + QA), shared dev data",
                "CC BY 4.0",
                "Liu et al., SLAKE, IEEE ISBI 2021",
                _named_loader("slake", "slake/train.jsonl", load_image_question_answer_jsonl),
            ),
            NamedSource(
                "slake-validate",
                "SLAKE-en validation split (radiology images + QA), shared dev data for evaluation",
                "CC BY 4.0",
                "Liu et al., SLAKE, IEEE ISBI 2021",
                _named_loader("slake-validate", "slake/validate.jsonl", load_image_question_answer_jsonl),
            ),
        )
    }


NAMED_SOURCES: dict[str, NamedSource] = _named_sources()
DEFAULT_SOURCE = DEFAULT_DATA


def load_dataset_spec(spec: str | Path, text_field: str = "text") -> list[Document]:
    """Documents for a `--calib`/`--eval` argument: a named data set (see NAMED_SOURCES) or a file path."""
    name = str(spec).strip()
    if name in NAMED_SOURCES:
        return NAMED_SOURCES[name].load()
    path = Path(name).expanduser()
    if not path.exists() and "/" not in name and "." not in name:
        raise BedsideError(
            f"unknown data set '{name}': pass a file path or one of {', '.join(NAMED_SOURCES)}"
        )
    return load_path(path, text_field=text_field)
