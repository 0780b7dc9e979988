"""compression.json as a typed record: the options round-trip, and a foreign or damaged file is refused."""

import dataclasses
import json

import pytest

from toolkit.compress.record import CompressionRecord, CompressOptions, read_compression_record
from toolkit.core.errors import BedsideError
from toolkit.core.records import COMPRESSION_RECORD


def test_options_are_checked_and_round_trip_through_json(tmp_path, minimal_compression_record):
    options = CompressOptions(prune_layers=2, layers=[12, 13], quant="Q4_0")
    assert options.layers == (12, 13)  # a list from JSON becomes the hashable tuple
    assert dataclasses.replace(options, seed=3).seed == 3
    with pytest.raises(ValueError, match="prune_layers"):
        CompressOptions(prune_layers="many")
    written = CompressionRecord.model_validate(minimal_compression_record()).model_dump(mode="json")
    assert written["schema_version"] == 1 and written["options"]["layers"] == [12, 13]
    (tmp_path / COMPRESSION_RECORD).write_text(json.dumps(written))
    record = read_compression_record(tmp_path)
    assert record.options == options and record.checkpoint.sha256 == "cd" * 32


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda r: r.update(schema_version=2), "schema_version"),
        (lambda r: r.update(extra_field=1), "extra_field"),
        (lambda r: r["options"].update(prune_layers="x"), "options.prune_layers"),
        (lambda r: r.pop("checkpoint"), "checkpoint"),
    ],
)
def test_a_foreign_record_is_one_line_error(tmp_path, mutate, needle, minimal_compression_record):
    record = minimal_compression_record()
    mutate(record)
    (tmp_path / COMPRESSION_RECORD).write_text(json.dumps(record))
    with pytest.raises(BedsideError, match="not a compression record") as error:
        read_compression_record(tmp_path)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_unreadable_record_is_one_line_error(tmp_path):
    (tmp_path / COMPRESSION_RECORD).write_text("{not json")
    with pytest.raises(BedsideError, match="unreadable compression record"):
        read_compression_record(tmp_path)
