"""Calibration and evaluation data: loaders, the default radiology corpus, token blocks and the split.

Use `load_dataset_spec("radiology" | "medquad" | ... | path)` to get documents,
`split_calibration_eval` to hold out evaluation documents, `make_blocks` for calibration tokens.
"""

from toolkit.data.blocks import DataRecord, TokenBlocks, count_tokens, make_blocks, split_calibration_eval
from toolkit.data.documents import Document, data_sha256, normalise_text, question_answer_document
from toolkit.data.radiology import (
    RADIOLOGY_CITATION,
    RADIOLOGY_LICENSE,
    RADIOLOGY_LICENSE_URL,
    RADIOLOGY_SOURCE,
    load_radiology_reports,
)
from toolkit.data.sources import (
    DEFAULT_SOURCE,
    NAMED_SOURCES,
    NamedSource,
    detect_format,
    load_dataset_spec,
    load_image_question_answer_jsonl,
    load_path,
    load_question_answer_jsonl,
    load_text_documents,
    load_text_jsonl,
)

__all__ = [
    "DEFAULT_SOURCE",
    "NAMED_SOURCES",
    "RADIOLOGY_CITATION",
    "RADIOLOGY_LICENSE",
    "RADIOLOGY_LICENSE_URL",
    "RADIOLOGY_SOURCE",
    "DataRecord",
    "Document",
    "NamedSource",
    "TokenBlocks",
    "count_tokens",
    "data_sha256",
    "detect_format",
    "load_dataset_spec",
    "load_image_question_answer_jsonl",
    "load_path",
    "load_question_answer_jsonl",
    "load_radiology_reports",
    "load_text_documents",
    "load_text_jsonl",
    "make_blocks",
    "normalise_text",
    "question_answer_document",
    "split_calibration_eval",
]
