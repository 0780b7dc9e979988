"""toolkit.core.tokenizer_loading: no false Mistral-regex alarm for other models, Mistral's own check kept."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from toolkit.core.tokenizer_loading import load_auto_tokenizer, model_types

WARNING = "incorrect regex pattern"


def _large_vocab_checkpoint(folder: Path, model_type: str) -> Path:
    """A tokenizer of 100,001 words (above transformers' 100,000 check) with a pre-tokenizer, beside a config
    saved by transformers 4.57.6, as Bedside's checkpoints are."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{index}": index + 1 for index in range(100_000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    config = {"model_type": model_type, "transformers_version": "4.57.6"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def take(self) -> str:
        text, self.messages = "\n".join(self.messages), []
        return text


@pytest.fixture
def transformers_warnings() -> Iterator[_Records]:
    """What transformers logs at WARNING and above, whatever verbosity and stream earlier tests left it with."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    yield records
    logger.removeHandler(records)
    hf_logging.set_verbosity(verbosity)


def test_a_gemma_tokenizer_loads_without_the_false_alarm(tmp_path: Path, transformers_warnings: _Records) -> None:
    from transformers import AutoTokenizer

    folder = _large_vocab_checkpoint(tmp_path, "gemma3_text")
    AutoTokenizer.from_pretrained(folder)
    assert WARNING in transformers_warnings.take()  # what users saw before
    tokenizer = load_auto_tokenizer(folder)
    assert WARNING not in transformers_warnings.take()
    assert tokenizer("w5 w99999 nope").input_ids == [6, 100_000, 0]
    tokenizer.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "fix_mistral_regex" not in saved


def test_a_mistral_tokenizer_keeps_transformers_check(tmp_path: Path, transformers_warnings: _Records) -> None:
    load_auto_tokenizer(_large_vocab_checkpoint(tmp_path, "mistral"))
    assert WARNING in transformers_warnings.take()


def test_model_types_reads_the_text_model_too(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "mistral"}}))
    assert model_types(tmp_path) == {"llava", "mistral"}
    assert model_types(tmp_path / "absent") == set()
