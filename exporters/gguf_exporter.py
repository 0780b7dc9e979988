"""GGUF exporter: Hugging Face checkpoint -> F16 GGUF (llama.cpp's converter) -> llama.cpp's quantizer.

Why llama.cpp's own `convert_hf_to_gguf.py` and not a gguf-py writer of ours: the converter knows every
architecture's tensor names and layout (Llama's q/k row permutation for RoPE, fused QKV splits, Gemma's
norm offsets, tied embeddings), its hyper-parameter keys and, hardest of all, the tokenizer: it hashes
the pre-tokenizer to pick llama.cpp's matching regex ("smollm" for the demo model), writes merges,
token types and special ids, and the chat template. A writer of our own would re-implement all of that
and drift from the runtime that reads it. The converter is taken from the sdist of the installed
llama-cpp-python (same llama.cpp commit as the library that loads and quantizes the file); set-up
extracts `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` into `llama_cpp_dir`.

The converter runs in a child process with its own vendored gguf-py, not the installed gguf 0.19.0
package: with `NO_LOCAL_GGUF=1` it fails on gguf 0.19.0 (`module 'gguf' has no attribute
'LazyChunkedTensor'`, measured), because the converter tracks llama.cpp master, not the PyPI release.
A child process also keeps the converter's memory (it streams tensors lazily) out of the caller.

Bedside metadata is written by the converter itself: a small driver adds `bedside.*` keys to gguf-py's
GGUFWriter just before it writes the header (which counts the KV pairs), so no extra rewrite of a multi-GB file is needed
(`llama_model_quantize_params.kv_overrides` cannot carry it: its strings are limited to 127 bytes, and a
plan is longer). llama.cpp's quantizer copies every KV pair of its input, so the keys survive
quantization; the exporter reads them back from the final file and fails if they are missing.
Keys (all strings unless noted; GGUF arrays cannot be empty, so lists are JSON text):

  bedside.schema_version (u32)  bedside.source_sha256   bedside.layers_removed (JSON list of ints)
  bedside.plan (JSON)           bedside.quant           bedside.<other metadata key> (str/int/float/bool,
                                                          JSON text for lists and dicts)

Model keys that the converter leaves to llama.cpp's defaults though config.json says otherwise are added the same
way (`architecture_entries`): Gemma 2/3's per-layer sliding-window layout, `<arch>.attention.sliding_window_pattern`
(bools, true = sliding) from `layer_types`, without which llama.cpp assumes a fixed period and mislabels layers of a
pruned checkpoint; export.json lists them under `model_keys`.

Quantization goes through `llama_cpp.llama_model_quantize` (the library has no llama-quantize binary),
whose refusal of a low-bit type without an importance matrix becomes a one-line ExportError naming the fix
(`imatrix_refusal`); `export.json` lists the tensor types the file really holds (`tensor_types`, read back with
gguf-py), fallbacks included. It runs in a child process: llama.cpp aborts the whole process on some errors
(GGML_ABORT), which must fail the export, not kill the toolkit. An importance matrix (see exporters/gguf_imatrix.py) is handed over as
llama.cpp 0.3.36 expects it: a C array of `llama_model_imatrix_data {name, data, size}` closed by a
NULL name, values in_sum2 / counts, plus the `quantize.imatrix.*` KV keys llama-quantize writes.

Files are written to a scratch folder inside `out_dir` and renamed into place when complete; the F16
intermediate is deleted unless F16 is what was asked for (or `keep_f16`).

A LLaVA checkpoint (LlavaForConditionalGeneration) gives two files: the converter writes the language model (its
text part, in the scheme asked for), and exporters/gguf_mmproj.py writes the vision tower + projector beside it as
`mmproj-<model stem>-<vision dtype>.gguf` (f16 by default, q8_0 on request), the file llama.cpp's libmtmd loads with
the model; export.json records it under `mmproj` (file, bytes, sha256, type, tensor types). The vision part is
checked before the minutes of conversion start, and both files are renamed into place only when both are complete.

Measured figures (conversion and quantization time, file size and perplexity per scheme, with and without an
importance matrix, on the demo model): docs/RUNTIMES.md, section "GGUF schemes on the demo model". A constant
(all-ones) importance matrix is accepted too (the weighted search alone).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from exporters.base import ExportError, ExportResult, check_checkpoint, normalise_metadata, write_record
from exporters.gguf_imatrix import read_imatrix, to_gguf_names
from exporters.gguf_mmproj import (
    VISION_DTYPES,
    is_llava,
    mmproj_file_name,
    read_processor,
    vision_layout,
    write_mmproj,
)
from toolkit.core.atomic import staging_dir
from toolkit.core.formats import GGUF_FTYPES
from toolkit.core.gguf_header import GGUFHeader, GgufHeaderError, read_gguf_header
from toolkit.core.hashing import checkpoint_sha256, file_sha256

METADATA_SCHEMA_VERSION = 1
METADATA_PREFIX = "bedside."
REPO_ROOT = Path(__file__).resolve().parents[1]


# Runs in the converter's child process: registers the bedside.* keys on gguf-py's writer, then runs
# convert_hf_to_gguf.py exactly as its command line would.
_CONVERTER_DRIVER = r"""
import json, runpy, sys
converter_dir, metadata_path = sys.argv[1], sys.argv[2]
sys.path[:0] = [converter_dir, converter_dir + "/gguf-py"]
import gguf
with open(metadata_path, encoding="utf-8") as handle:
    entries = json.load(handle)
adders = {"str": "add_string", "u32": "add_uint32", "i64": "add_int64", "f64": "add_float64", "bool": "add_bool",
          "bool_array": "add_array"}
original = gguf.GGUFWriter.write_header_to_file
def write_header_with_bedside_keys(self, *args, **kwargs):
    for key, (kind, value) in entries.items():
        getattr(self, adders[kind])(key, value)
    return original(self, *args, **kwargs)
gguf.GGUFWriter.write_header_to_file = write_header_with_bedside_keys
sys.argv = [converter_dir + "/convert_hf_to_gguf.py"] + sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_QUANTIZE_DRIVER = r"""
import json, sys
from exporters.gguf_exporter import quantize_in_this_process
print(json.dumps(quantize_in_this_process(**json.loads(sys.argv[1]))))
"""


def default_llama_cpp_dir() -> Path:
    """Where set-up keeps llama.cpp's converter for the installed llama-cpp-python.

    $BEDSIDE_LLAMA_CPP_DIR, else $BEDSIDE_CACHE (default ~/.cache/bedside)/llama.cpp-<llama_cpp version>,
    the folder toolkit.core.paths.llama_cpp_source_dir() names.
    """
    if os.environ.get("BEDSIDE_LLAMA_CPP_DIR"):
        return Path(os.environ["BEDSIDE_LLAMA_CPP_DIR"])
    import llama_cpp

    cache = Path(os.environ.get("BEDSIDE_CACHE", Path.home() / ".cache" / "bedside"))
    return cache / f"llama.cpp-{llama_cpp.__version__}"


def check_converter(llama_cpp_dir: Path) -> Path:
    """Return the converter script, or raise ExportError naming what set-up must extract."""
    needed = ["convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"]
    missing = [name for name in needed if not (llama_cpp_dir / name).is_file()]
    if missing:
        raise ExportError(
            f"llama.cpp converter incomplete in {llama_cpp_dir} (missing {', '.join(missing)}): run "
            "`make setup`, which extracts vendor/llama.cpp/{convert_hf_to_gguf.py,conversion,gguf-py} "
            "from the llama-cpp-python sdist"
        )
    return llama_cpp_dir / "convert_hf_to_gguf.py"


def gguf_metadata_entries(metadata: dict[str, Any], source_sha256: str, quant: str) -> dict[str, list[Any]]:
    """The bedside.* KV pairs as {key: [gguf kind, value]} (kinds: str, u32, i64, f64, bool)."""
    entries: dict[str, list[Any]] = {
        f"{METADATA_PREFIX}schema_version": ["u32", METADATA_SCHEMA_VERSION],
        f"{METADATA_PREFIX}source_sha256": ["str", source_sha256],
        f"{METADATA_PREFIX}quant": ["str", quant],
        f"{METADATA_PREFIX}layers_removed": ["str", json.dumps(sorted(metadata.get("layers_removed") or []))],
    }
    for key, value in metadata.items():
        if key in ("layers_removed", "source_sha256"):
            continue
        name = f"{METADATA_PREFIX}{key}"
        if isinstance(value, bool):
            entries[name] = ["bool", value]
        elif isinstance(value, int):
            entries[name] = ["i64", value]
        elif isinstance(value, float):
            entries[name] = ["f64", value]
        elif isinstance(value, str):
            entries[name] = ["str", value]
        elif value is not None:
            entries[name] = ["str", json.dumps(value, sort_keys=True, separators=(",", ":"))]
    return entries


# llama.cpp architectures whose loader reads the per-layer sliding-window layout from
# `<arch>.attention.sliding_window_pattern` (an array of bools, true = sliding; llama_model_base::load_swa_pattern)
# and otherwise assumes a fixed period (Gemma 2: every second layer global, Gemma 3: every sixth), while the
# converter writes no pattern: config.json model_type -> GGUF architecture.
SLIDING_WINDOW_PATTERN_ARCHITECTURES = {"gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
SLIDING_ATTENTION = "sliding_attention"


def architecture_entries(config: dict[str, Any]) -> dict[str, list[Any]]:
    """Model KV pairs the converter leaves to llama.cpp's defaults though config.json says otherwise.

    Gemma 2/3 alternate sliding-window and global layers (`layer_types`); llama.cpp derives the layout from a
    fixed period unless `<arch>.attention.sliding_window_pattern` lists it, which mislabels layers once
    some are removed. The pattern is written from `layer_types` (true = sliding) whenever the config has them.
    """
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    architecture = SLIDING_WINDOW_PATTERN_ARCHITECTURES.get(str(text.get("model_type")))
    layer_types = text.get("layer_types")
    if architecture is None or not layer_types or not text.get("sliding_window"):
        return {}
    layers = text.get("num_hidden_layers")
    if len(layer_types) != layers or not set(layer_types) <= {SLIDING_ATTENTION, "full_attention"}:
        raise ExportError(
            f"config.json lists {len(layer_types)} layer_types ({', '.join(sorted(set(layer_types)))}) for "
            f"{layers} layers: expected one sliding_attention or full_attention per layer"
        )
    pattern = [kind == SLIDING_ATTENTION for kind in layer_types]
    return {f"{architecture}.attention.sliding_window_pattern": ["bool_array", pattern]}


def convert_to_f16(
    model_dir: Path,
    outfile: Path,
    metadata_entries: dict[str, list[Any]],
    llama_cpp_dir: Path,
    outtype: str = "f16",
) -> None:
    """Run llama.cpp's converter (child process) on `model_dir`, writing `outfile` with the extra KV pairs
    `metadata_entries` ({key: [kind, value]}: the bedside keys and `architecture_entries`)."""
    check_converter(llama_cpp_dir)
    keys_file = outfile.with_suffix(".bedside-keys.json")
    keys_file.write_text(json.dumps(metadata_entries), encoding="utf-8")
    command = [
        sys.executable, "-c", _CONVERTER_DRIVER, str(llama_cpp_dir), str(keys_file),
        str(model_dir), "--outfile", str(outfile), "--outtype", outtype,
    ]  # fmt: skip
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    environment.pop("NO_LOCAL_GGUF", None)
    completed = subprocess.run(command, capture_output=True, text=True, env=environment)
    keys_file.unlink(missing_ok=True)
    if completed.returncode != 0 or not outfile.is_file():
        raise ExportError(
            f"llama.cpp's converter failed on {model_dir}: {_last_error_line(completed.stderr)}"
        )


def _last_error_line(output: str) -> str:
    """The most telling line of a child's output: the last exception or error line, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith("Writing:")]
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error", "Exception", "failed", "not supported")):
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def quantize(
    source: Path,
    target: Path,
    quant: str,
    *,
    imatrix: Path | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Quantize a GGUF with llama.cpp (child process); return what the child reports (imatrix use, time)."""
    arguments = {
        "source": str(source),
        "target": str(target),
        "ftype": GGUF_FTYPES[quant],
        "threads": threads,
        "imatrix": str(imatrix) if imatrix else None,
    }
    environment = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    )
    completed = subprocess.run(
        [sys.executable, "-c", _QUANTIZE_DRIVER, json.dumps(arguments)],
        capture_output=True, text=True, env=environment, cwd=REPO_ROOT,
    )  # fmt: skip
    report_line = completed.stdout.strip().splitlines()[-1] if completed.stdout.strip() else ""
    refusal = imatrix_refusal(completed.stderr, quant, imatrix is not None)
    if refusal:
        raise ExportError(refusal)
    if completed.returncode == 0 and report_line.startswith("{"):
        report = json.loads(report_line)
        if report.get("error"):
            detail = _last_error_line(completed.stderr) if report.get("from_llama_cpp") else ""
            raise ExportError(report["error"] + (f": {detail}" if detail else ""))
        return report
    reason = _last_error_line(completed.stderr + "\n" + completed.stdout)
    if completed.returncode < 0:
        reason = f"killed by signal {-completed.returncode} ({reason})"
    raise ExportError(f"llama.cpp quantization to {quant} failed: {reason}")


# llama-quant.cpp refuses, before writing anything, a tensor whose type needs an importance matrix
# (tensor_requires_imatrix: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS) when none is given, or when the
# given matrix has no entry for it.
_NO_IMATRIX = re.compile(r"offending tensor:\s*(\S+)\s+- target type:\s*(\S+)")
_IMATRIX_ENTRY_MISSING = re.compile(r"Missing importance matrix for tensor (\S+)")


def imatrix_refusal(log: str, quant: str, imatrix_given: bool) -> str | None:
    """The one-line error for llama.cpp's refusal to quantize without an importance matrix, or None."""
    found = _NO_IMATRIX.search(log)
    if found:
        tensor, type_name = found.group(1), found.group(2).upper()
        return (
            f"GGUF {quant} needs an importance matrix here: llama.cpp writes {tensor} as {type_name} only with one; "
            "pass --imatrix FILE (a llama-imatrix GGUF), export a `bedside compress` folder made with AWQ (it "
            "writes imatrix.gguf), or choose a scheme without IQ2/IQ3_XXS types (IQ4_XS, IQ3_M, Q2_K)"
        )
    found = _IMATRIX_ENTRY_MISSING.search(log)
    if found and imatrix_given:
        return (
            f"the importance matrix has no entry for {found.group(1)}, which GGUF {quant} writes at a type "
            "llama.cpp stores only with one: gather the matrix on this checkpoint (`bedside compress` with AWQ)"
        )
    return None


def quantize_in_this_process(
    source: str, target: str, ftype: int, threads: int, imatrix: str | None
) -> dict[str, Any]:
    """llama_model_quantize with an optional importance matrix, in the calling process (the child).

    Returns {"seconds", "imatrix_entries"} or {"error": message} for problems found before calling C.
    """

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    keep_alive: list[Any] = []
    overrides: list[tuple[str, int, Any]] = []
    entries = 0
    if imatrix:
        try:
            matrix = read_imatrix(imatrix)
            architecture, block_count, widths = _gguf_tensor_widths(Path(source))
            matrix = to_gguf_names(matrix, architecture, block_count, widths)
        except ExportError as error:
            return {"error": str(error)}
        names = sorted(matrix.values)
        array = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
        for index, name in enumerate(names):
            vector = matrix.values[name]
            encoded = name.encode()
            keep_alive.extend([vector, encoded])
            array[index].name = encoded
            array[index].data = vector.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[index].size = vector.size
        array[len(names)].name = None  # terminator, as tools/quantize writes it
        params.imatrix = ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep_alive.append(array)
        entries = len(names)
        overrides += [
            ("quantize.imatrix.file", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, Path(imatrix).name),
            ("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, entries),
        ]
        if matrix.datasets:
            overrides.append(
                ("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, matrix.datasets[0])
            )
        if matrix.chunk_count > 0:
            overrides.append(
                ("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, matrix.chunk_count)
            )
    if overrides:
        kv_array = (llama_cpp.llama_model_kv_override * (len(overrides) + 1))()
        for index, (key, tag, value) in enumerate(overrides):
            kv_array[index].key = key.encode()[:127]
            kv_array[index].tag = tag
            if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
                kv_array[index].value.val_str = str(value).encode()[:127]
            else:
                kv_array[index].value.val_i64 = int(value)
        kv_array[len(overrides)].key = b""  # terminator: empty key
        params.kv_overrides = ctypes.cast(kv_array, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep_alive.append(kv_array)
    start = time.perf_counter()
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    seconds = time.perf_counter() - start
    if status != 0:
        return {
            "error": f"llama_model_quantize returned {status} for {Path(source).name}",
            "from_llama_cpp": True,
        }
    return {"seconds": round(seconds, 2), "imatrix_entries": entries}


def _gguf_tensor_widths(path: Path) -> tuple[str, int, dict[str, int]]:
    """(architecture, block_count, {tensor name: input width x experts}) of a GGUF, for imatrix checks."""
    header = _header(path)
    architecture = str(header.values.get("general.architecture"))
    block_count = header.values.get(f"{architecture}.block_count")
    if not isinstance(block_count, int):
        raise ExportError(f"{path}: the GGUF metadata has no {architecture}.block_count")
    widths = {}
    for tensor in header.tensors:
        shape = tensor.shape  # ggml order: ne0 (input width) first
        if len(shape) >= 2:
            widths[tensor.name] = shape[0] * (shape[2] if len(shape) > 2 else 1)
    return architecture, block_count, widths


def _header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF (toolkit.core.gguf_header), ExportError for an unreadable file."""
    try:
        return read_gguf_header(path)
    except GgufHeaderError as error:
        raise ExportError(str(error)) from None


def read_gguf_summary(path: Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """bedside.* keys, the values of `keys` (None when absent or a long array), file type and tensor-type counts
    of a GGUF (its header only: toolkit.core.gguf_header)."""
    header = _header(path)
    values = header.values
    file_type = values.get("general.file_type")
    entries = values.get("quantize.imatrix.entries_count")
    return {
        "bedside": {name: value for name, value in values.items() if name.startswith(METADATA_PREFIX)},
        "keys": {key: values.get(key) for key in keys},
        "file_type": int(file_type) if file_type is not None else None,
        "imatrix_entries": int(entries) if entries is not None else None,
        "tensor_types": dict(Counter(tensor.type_name for tensor in header.tensors)),
        "tensor_count": len(header.tensors),
    }


def export_gguf(
    model_dir: str | os.PathLike[str],
    quant: str,
    out_dir: str | os.PathLike[str],
    *,
    imatrix: str | os.PathLike[str] | None = None,
    metadata: dict[str, Any] | None = None,
    llama_cpp_dir: str | os.PathLike[str] | None = None,
    threads: int = 2,
    file_name: str | None = None,
    keep_f16: bool = False,
    vision_dtype: str | None = None,
) -> ExportResult:
    """Export a Hugging Face checkpoint to one GGUF file of scheme `quant`.

    Args:
        model_dir: checkpoint folder (config.json, safetensors, tokenizer).
        quant: a scheme of toolkit.core.formats.GGUF_FTYPES (F16 ... Q3_K_M, IQ4_XS, IQ3_M, IQ3_XXS, Q2_K,
            IQ2_M). IQ3_XXS and IQ2_M need `imatrix` wherever llama.cpp writes an IQ2/IQ3_XXS tensor (on rows
            that are not a multiple of 256 it falls back to IQ4_NL, which does not): ExportError otherwise.
        out_dir: folder for `model-<quant>.gguf` (or `file_name`) and export.json.
        imatrix: llama-imatrix GGUF file (see exporters/gguf_imatrix.py); used for every scheme but F16.
        metadata: written as bedside.* keys; recognised: `plan` (dict, JSON text), `layers_removed`
            (list of original layer indices), `source_sha256` (computed from the folder when absent).
        llama_cpp_dir: converter folder; default `default_llama_cpp_dir()`.
        threads: quantization threads.
        file_name: name of the GGUF in `out_dir` (default `model-<quant>.gguf`).
        keep_f16: also keep the F16 intermediate as `model-F16.gguf` (a reference for evaluation, or a
            source for more schemes through `quantize()` without converting again).
        vision_dtype: a LLaVA's vision tower + projector ("f16", the default, or "q8_0"), written as
            `mmproj-<model stem>-<vision_dtype>.gguf` beside the model (exporters/gguf_mmproj.py); ignored for a
            text-only checkpoint (export.json then has `"mmproj": null`).
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if quant not in GGUF_FTYPES:
        raise ExportError(f"unknown GGUF scheme {quant!r}; choose one of {', '.join(GGUF_FTYPES)}")
    config = check_checkpoint(model_dir)
    vision = is_llava(config)
    if vision:  # refuse what the projector cannot take before converting the language model
        vision_dtype = vision_dtype or "f16"
        if vision_dtype not in VISION_DTYPES:
            raise ExportError(
                f"unknown vision dtype {vision_dtype!r} for the GGUF mmproj; choose one of {', '.join(VISION_DTYPES)}"
            )
        vision_layout(config)
        read_processor(model_dir)
    imatrix_path = Path(imatrix) if imatrix else None
    if imatrix_path is not None and not imatrix_path.is_file():
        raise ExportError(f"importance matrix {imatrix_path} does not exist")
    converter_dir = Path(llama_cpp_dir) if llama_cpp_dir else default_llama_cpp_dir()
    check_converter(converter_dir)
    meta = normalise_metadata(metadata)
    source_sha256 = str(meta.get("source_sha256") or checkpoint_sha256(model_dir))
    entries = gguf_metadata_entries(meta, source_sha256, quant)
    model_entries = architecture_entries(config)
    target = out_dir / (file_name or f"model-{quant}.gguf")
    mmproj_target = out_dir / mmproj_file_name(target, vision_dtype) if vision and vision_dtype else None

    timings: dict[str, float] = {}
    quantize_report: dict[str, Any] = {}
    mmproj_summary: dict[str, Any] = {}
    with staging_dir(out_dir) as scratch:
        f16_path = scratch / "model-F16.gguf"
        start = time.perf_counter()
        convert_to_f16(model_dir, f16_path, {**entries, **model_entries}, converter_dir)
        timings["convert_s"] = round(time.perf_counter() - start, 2)
        if quant == "F16":
            finished = f16_path
        else:
            finished = scratch / target.name
            start = time.perf_counter()
            quantize_report = quantize(f16_path, finished, quant, imatrix=imatrix_path, threads=threads)
            timings["quantize_s"] = round(time.perf_counter() - start, 2)
        summary = read_gguf_summary(finished, tuple(model_entries))
        missing = sorted(set(entries) - set(summary["bedside"]))
        missing += sorted(key for key, (_, value) in model_entries.items() if summary["keys"][key] != value)
        if missing:
            raise ExportError(f"bedside metadata did not reach {target.name} (missing {', '.join(missing)})")
        if mmproj_target is not None and vision_dtype is not None:
            start = time.perf_counter()
            mmproj_scratch = scratch / mmproj_target.name
            mmproj_keys = {
                f"{METADATA_PREFIX}schema_version": ["u32", METADATA_SCHEMA_VERSION],
                f"{METADATA_PREFIX}source_sha256": ["str", source_sha256],
                f"{METADATA_PREFIX}vision_dtype": ["str", vision_dtype],
                f"{METADATA_PREFIX}model_file": ["str", target.name],
            }
            mmproj_summary = write_mmproj(model_dir, config, mmproj_scratch, vision_dtype, mmproj_keys)
            timings["mmproj_s"] = round(time.perf_counter() - start, 2)
            os.replace(mmproj_scratch, mmproj_target)
        os.replace(finished, target)
        kept_f16 = out_dir / "model-F16.gguf"
        if keep_f16 and quant != "F16":
            os.replace(f16_path, kept_f16)

    size = target.stat().st_size
    record: dict[str, Any] = {
        "schema_version": 1,
        "format": "gguf",
        "quant": quant,
        "file": target.name,
        "bytes": size,
        "sha256": file_sha256(target),
        "source": {
            "path": str(model_dir.resolve()),
            "sha256": source_sha256,
            "model_type": config.get("model_type"),
        },
        "metadata": meta,
        "metadata_keys": sorted(entries),
        "model_keys": {key: value for key, (_, value) in model_entries.items()},
        "layers_removed": json.loads(entries[f"{METADATA_PREFIX}layers_removed"][1]),
        "imatrix": (
            {
                "path": str(imatrix_path.resolve()),
                "sha256": file_sha256(imatrix_path),
                "entries": quantize_report.get("imatrix_entries", 0),
            }
            if imatrix_path is not None and quant != "F16"
            else None
        ),
        "tensor_types": summary["tensor_types"],
        "mmproj": (
            {
                "file": mmproj_target.name,
                "bytes": mmproj_target.stat().st_size,
                "sha256": file_sha256(mmproj_target),
                "type": vision_dtype,
                **{key: value for key, value in mmproj_summary.items() if key != "vision_dtype"},
                "writer": "exporters/gguf_mmproj.py",
            }
            if mmproj_target is not None
            else None
        ),
        "tool": {
            "converter": str(converter_dir / "convert_hf_to_gguf.py"),
            "llama_cpp_python": _llama_cpp_version(),
        },
        "timings": timings,
    }
    files = [target]
    if mmproj_target is not None:
        files.append(mmproj_target)
    if keep_f16 and quant != "F16":
        files.append(kept_f16)
        record["f16_file"] = kept_f16.name
    record_path = write_record(out_dir, record)
    files.append(record_path)
    return ExportResult(
        files=files,
        format="gguf",
        quant=quant,
        sizes={path.name: path.stat().st_size for path in files},
        record=record,
    )


def _llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)
