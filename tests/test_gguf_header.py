"""toolkit.core.gguf_header against gguf-py's GGUFReader: the same metadata values and tensor table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from toolkit.core.errors import BedsideError
from toolkit.core.gguf_header import SMALL_ARRAY_ITEMS, GgufHeaderError, read_gguf_header


def write_varied_gguf(path: Path) -> Path:
    """A GGUF with every scalar type, strings, short and long arrays, and float and quantized tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.block_count", 2)
    writer.add_int32("test.int32", -7)
    writer.add_uint8("test.uint8", 200)
    writer.add_int8("test.int8", -100)
    writer.add_uint16("test.uint16", 60000)
    writer.add_int16("test.int16", -30000)
    writer.add_uint64("test.uint64", 2**40 + 3)
    writer.add_int64("test.int64", -(2**40))
    writer.add_float32("test.float32", 0.1)
    writer.add_float64("test.float64", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_string("bedside.plan", '{"layers": [1, 2]}')
    writer.add_array("test.short_ints", [1, 2, 3])
    writer.add_array("test.short_bools", [True, False, True])
    writer.add_array("test.long_floats", [float(i) for i in range(SMALL_ARRAY_ITEMS + 1)])
    writer.add_array("tokenizer.ggml.tokens", ["a", "bé", "<s>"])
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.standard_normal((8, 64)).astype(np.float16))
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((4, 64)).astype(np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((3, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.1.ffn_down.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reader_view(source: Path | Any) -> tuple[dict, list]:
    """GGUFReader's fields (scalars, strings, arrays of at most SMALL_ARRAY_ITEMS scalars) and tensor table, of a
    file or of a GGUFReader already made."""
    import gguf

    reader = gguf.GGUFReader(str(source)) if isinstance(source, Path) else source
    values = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):  # the reader's pseudo-fields (version, counts)
            continue
        array = field.types[0] == gguf.GGUFValueType.ARRAY
        if array and (len(field.types) > 1 and field.types[1] == gguf.GGUFValueType.STRING):
            continue  # string arrays: skipped by the header reader
        if array and len(field.data) > SMALL_ARRAY_ITEMS:
            continue
        values[name] = field.contents()
    tensors = [
        (t.name, tuple(int(x) for x in t.shape), t.tensor_type.name, int(t.data_offset - reader.data_offset), int(t.n_bytes))
        for t in reader.tensors
    ]
    return values, tensors


def header_view(path: Path) -> tuple[dict, list]:
    header = read_gguf_header(path)
    tensors = [(t.name, t.shape, t.type_name, t.offset, t.n_bytes) for t in header.tensors]
    return header.values, tensors


def test_the_header_reads_what_gguf_py_reads(tmp_path):
    path = write_varied_gguf(tmp_path / "varied.gguf")
    values, tensors = header_view(path)
    assert (values, tensors) == reader_view(path)
    assert values["test.float32"] == pytest.approx(0.1, rel=1e-7) and values["test.float32"] != 0.1  # float32's value
    assert values["test.short_bools"] == [True, False, True]
    header = read_gguf_header(path)
    assert {"test.long_floats", "tokenizer.ggml.tokens"} <= header.keys  # present, values skipped
    assert "test.long_floats" not in values and "tokenizer.ggml.tokens" not in values
    # Q8_0's 3 rows of 2 blocks of 34 bytes end the data; the writer pads the file to the alignment after them
    q8 = header.tensors[2]
    assert (q8.type_name, q8.shape, q8.n_bytes) == ("Q8_0", (64, 3), 3 * 2 * 34)
    assert header.data_bytes_needed == header.data_offset + q8.offset + q8.n_bytes
    assert 0 <= path.stat().st_size - header.data_bytes_needed < header.alignment


def test_a_bad_file_is_a_one_line_bedside_error(tmp_path):
    path = tmp_path / "cut.gguf"
    full = write_varied_gguf(tmp_path / "full.gguf").read_bytes()
    path.write_bytes(full[:100])
    with pytest.raises(GgufHeaderError, match=r"cut.gguf: truncated inside the GGUF header \(100 bytes; ") as error:
        read_gguf_header(path)
    assert isinstance(error.value, BedsideError) and "\n" not in str(error.value)
    path.write_bytes(b"PK\x03\x04" + full[4:])
    with pytest.raises(GgufHeaderError, match=r"not a GGUF file \(starts with b'PK\\x03\\x04'"):
        read_gguf_header(path)
