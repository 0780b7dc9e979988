"""Importance matrices for llama.cpp quantization: Bedside's on-disk format, and its hand-over to the quantizer.

Format: llama.cpp's own GGUF imatrix, the file `llama-imatrix` writes (tools/imatrix/imatrix.cpp of the
llama.cpp vendored by llama-cpp-python 0.3.36), so a matrix gathered by `llama-imatrix` and one written
by Bedside's compression stage are interchangeable:

  * KV `general.type` = "imatrix", `imatrix.datasets` (array of strings), `imatrix.chunk_count` (u32),
    `imatrix.chunk_size` (u32, tokens per chunk);
  * per weight `W` two F32 tensors: `W.in_sum2`, ggml shape [n_in, n_mat] (numpy [n_mat, n_in]): the sum
    over calibration tokens of the squared input activation of each input column, and `W.counts`,
    ggml shape [1, n_mat]: how many tokens were summed (n_mat > 1 only for stacked MoE experts).

The quantizer wants the mean, in_sum2 / counts per matrix (1 where a count is 0), exactly as
tools/quantize/quantize.cpp `load_imatrix` computes it; counts are rounded to integers first, as
common/imatrix-loader.cpp does. Names are GGUF tensor names (`blk.0.attn_q.weight`); Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`) are accepted too and mapped with gguf-py's TensorNameMap for
the model's architecture, so the compression stage may gather statistics on the torch model directly.
The matrix must be gathered on the model as exported (after pruning, with AWQ scales folded): names
and input widths are checked against the GGUF and a mismatch is an error, never a silent skip.

The legacy `.dat` imatrix format is not read; convert it with `llama-imatrix --in-file old.dat -o new.gguf`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporters.base import ExportError

IN_SUM2_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
GGUF_TENSOR_PREFIXES = ("blk.", "token_embd", "output", "rope_", "per_layer_", "altup_", "laurel_")


@dataclass
class ImportanceMatrix:
    """The per-weight importance the quantizer receives: mean squared input activation per input column.

    Attributes:
        values: name -> float32 vector of n_in * n_mat values (in_sum2 / counts).
        datasets: names of the calibration sets it was gathered on.
        chunk_count: chunks of calibration text processed.
        chunk_size: tokens per chunk.
    """

    values: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def write_imatrix(
    path: str | Path,
    in_sum2: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray | int | float],
    *,
    datasets: Sequence[str],
    chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write an importance matrix in llama-imatrix's GGUF format.

    Args:
        in_sum2: weight name -> summed squared activations, shape [n_in] or [n_mat, n_in].
        counts: weight name -> tokens summed (a number, or one per matrix).
        datasets: calibration set names recorded in the file.
        chunk_count, chunk_size: how the calibration tokens were cut (llama.cpp records them; the
            quantizer refuses a GGUF imatrix without them).
    """
    import gguf

    path = Path(path)
    if set(in_sum2) != set(counts):
        raise ExportError("imatrix in_sum2 and counts name different weights")
    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    # llama-imatrix writes no general.architecture; the writer adds one unconditionally.
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(datasets) or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", int(chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name in sorted(in_sum2):
        sums = np.asarray(in_sum2[name], dtype=np.float32)
        sums = sums.reshape(1, -1) if sums.ndim == 1 else sums
        n_mat = sums.shape[0]
        count = np.asarray(counts[name], dtype=np.float32).reshape(-1)
        if count.size == 1 and n_mat > 1:
            count = np.repeat(count, n_mat)
        if count.size != n_mat:
            raise ExportError(f"imatrix {name}: {count.size} counts for {n_mat} matrices")
        writer.add_tensor(name + IN_SUM2_SUFFIX, np.ascontiguousarray(sums))
        writer.add_tensor(name + COUNTS_SUFFIX, count.reshape(n_mat, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class ImatrixSums:
    """A GGUF imatrix as stored: per weight the summed squared inputs and the tokens summed (one per matrix).

    Attributes:
        in_sum2: name -> float32 vector of n_mat * n_in sums.
        counts: name -> float32 vector of n_mat token counts.
        datasets, chunk_count, chunk_size: the file's imatrix.* metadata.
    """

    in_sum2: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str]
    chunk_count: int
    chunk_size: int


def read_imatrix_sums(path: str | Path) -> ImatrixSums:
    """Read a GGUF imatrix's raw in_sum2 and counts tensors (what `llama-imatrix` accumulated), checked."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"importance matrix {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:  # gguf-py raises ValueError, struct.error, IndexError... on bad files
        raise ExportError(
            f"{path} is not a GGUF importance matrix ({type(error).__name__}: {error}); "
            "legacy .dat files: convert with `llama-imatrix --in-file old.dat -o new.gguf`"
        ) from None
    fields = reader.fields
    missing = [
        key for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if key not in fields
    ]
    if missing:
        # tools/quantize refuses such a file too ("missing imatrix metadata").
        raise ExportError(f"{path} lacks imatrix metadata ({', '.join(missing)}): not an llama-imatrix GGUF")
    datasets = [str(value) for value in fields["imatrix.datasets"].contents()]
    chunk_count = int(fields["imatrix.chunk_count"].contents())
    chunk_size = int(fields["imatrix.chunk_size"].contents())

    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ExportError(
                f"{path}: imatrix tensor {tensor.name} is {tensor.tensor_type.name}, must be F32"
            )
        if tensor.name.endswith(IN_SUM2_SUFFIX):
            sums[tensor.name[: -len(IN_SUM2_SUFFIX)]] = np.array(tensor.data, dtype=np.float32).reshape(-1)
        elif tensor.name.endswith(COUNTS_SUFFIX):
            counts[tensor.name[: -len(COUNTS_SUFFIX)]] = np.array(tensor.data, dtype=np.float32).reshape(-1)
    if not sums:
        raise ExportError(f"{path} holds no imatrix entries (*.in_sum2 tensors)")
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise ExportError(f"{path}: mismatched sums and counts for {unpaired[0]}")
    for name, total in sums.items():
        if total.size % counts[name].size:
            raise ExportError(f"{path}: {name} has {total.size} sums for {counts[name].size} matrices")
    return ImatrixSums(sums, counts, datasets, chunk_count, chunk_size)


def read_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read a GGUF imatrix and return per-weight means (in_sum2 / counts), as llama-quantize does."""
    raw = read_imatrix_sums(path)
    values: dict[str, np.ndarray] = {}
    for name, total in raw.in_sum2.items():
        count = np.rint(raw.counts[name]).astype(np.float32)  # common_imatrix_load: std::lround
        per_matrix = total.reshape(count.size, -1)
        safe = np.where(count > 0, count, 1.0).astype(np.float32)
        mean = np.where(count[:, None] > 0, per_matrix / safe[:, None], np.float32(1.0))
        values[name] = np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)
    return ImportanceMatrix(
        values=values, datasets=raw.datasets, chunk_count=raw.chunk_count, chunk_size=raw.chunk_size
    )


LLAVA_TEXT_PREFIX = re.compile(r"^(?:model\.language_model\.|language_model\.model\.)")


def gguf_tensor_names(names: Iterable[str], architecture: str, block_count: int) -> dict[str, str | None]:
    """GGUF tensor name of each weight name (None where none matches), with gguf-py's TensorNameMap.

    GGUF names (`blk.0.attn_q.weight`) map to themselves; Hugging Face names (`model.layers.0.self_attn.q_proj.weight`,
    a LLaVA's `model.language_model.layers...` too) map through the map of `architecture` (the GGUF's
    general.architecture, e.g. "llama"), built with enough blocks for every layer index named, so an entry of a
    removed layer maps to a name the model lacks rather than to None.
    """
    import gguf

    names = list(names)
    arch_by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    indices = [int(match) for name in names for match in re.findall(r"\.(\d+)\.", name)]
    block_count = max([block_count, *(index + 1 for index in indices)])
    name_map = (
        gguf.get_tensor_name_map(arch_by_name[architecture], block_count)
        if architecture in arch_by_name
        else None
    )
    mapped: dict[str, str | None] = {}
    for name in names:
        if name.startswith(GGUF_TENSOR_PREFIXES):
            mapped[name] = name
            continue
        # a LLaVA's language model (model.language_model.layers...) is the GGUF's text model (model.layers...)
        text_name = LLAVA_TEXT_PREFIX.sub("model.", name)
        mapped[name] = (
            name_map.get_name(text_name, try_suffixes=(".weight", ".bias")) if name_map is not None else None
        )
    return mapped


def to_gguf_names(
    matrix: ImportanceMatrix, architecture: str, block_count: int, tensor_widths: Mapping[str, int]
) -> ImportanceMatrix:
    """Map Hugging Face weight names to GGUF tensor names and check every entry against the GGUF.

    Args:
        architecture: the GGUF's general.architecture (e.g. "llama").
        block_count: its {arch}.block_count.
        tensor_widths: GGUF tensor name -> input width (ggml ne[0]) times experts, of the model being
            quantized; the imatrix length must equal it, as llama-quantize requires.
    """
    targets = gguf_tensor_names(matrix.values, architecture, block_count)
    values: dict[str, np.ndarray] = {}
    for name, vector in matrix.values.items():
        target = targets[name]
        if target is None:
            raise ExportError(f"imatrix entry {name!r} matches no {architecture} tensor")
        if target == "output.weight" and target not in tensor_widths and "token_embd.weight" in tensor_widths:
            target = "token_embd.weight"  # tied lm_head: llama.cpp multiplies by token_embd itself
        if target not in tensor_widths:
            raise ExportError(
                f"imatrix entry {name!r} has no tensor {target!r} in the model (gathered on another model, "
                "or before layers were removed?)"
            )
        if vector.size != tensor_widths[target]:
            raise ExportError(
                f"imatrix entry {name!r} has {vector.size} values, tensor {target} has {tensor_widths[target]} inputs"
            )
        if not np.all(np.isfinite(vector)):
            raise ExportError(f"imatrix entry {name!r} holds non-finite values")
        values[target] = vector
    return ImportanceMatrix(values, matrix.datasets, matrix.chunk_count, matrix.chunk_size)


def constant_imatrix(
    tensor_widths: Mapping[str, int], value: float = 1.0
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """in_sum2 and counts of a flat importance (every column equally important): a neutral baseline."""
    in_sum2 = {name: np.full(width, value, dtype=np.float32) for name, width in tensor_widths.items()}
    counts = {name: 1 for name in tensor_widths}
    return in_sum2, counts
