"""ONNX exporter: Hugging Face checkpoint -> decoder with KV cache (optimum-onnx) -> weight-only int8/int4.

Pipeline:
  1. optimum-onnx `main_export(task="text-generation-with-past")` in a child process (its torch model and
     tracing memory end with it): one `model.onnx` taking input_ids, attention_mask, position_ids and
     past_key_values.*, returning logits and present.*. Tensors go to `model.onnx_data` when the model
     passes protobuf's 2 GB limit (optimum does so on export; `save_model` does so on re-save).
  2. fp16 (FP16 below): the fp32 graph converted by onnxruntime.transformers.float16 (default), or
     optimum's own fp16 export.
  3. int8 / int4: onnxruntime's `MatMulNBitsQuantizer` (RTN, QOperator: MatMul -> com.microsoft.MatMulNBits)
     on the fp32 graph, blocks along the input dimension, with zero points unless `symmetric`. Defaults
     follow toolkit/core/formats.py ONNX_SCHEMES (asymmetric; int8 block 32; int4 block 32 or 128).
     The lm_head and the embedding get 8 bits (LM_HEAD below).
     MatMulNBits nodes get accuracy_level 4 (ACCURACY_LEVEL below).
  4. Tokenizer files and chat template beside model.onnx; Bedside metadata in the model's
     metadata_props (bedside.*); export.json.

LLaVA checkpoints (config model_type "llava") take another first step: exporters/onnx_llava.py exports three
graphs with torch.onnx.export in a child process (vision_encoder.onnx, embed_tokens.onnx, and model.onnx, the
decoder taking inputs_embeds with the same past / present names); fp16 converts all three, int8 / int4
quantize the decoder as in step 3 and the embedding graph as the embedding treatment says, the vision graph
stays float; the processor files go beside them and export.json lists each graph (`graphs`). Why not
optimum, and the measured choices: the docstring of exporters/onnx_llava.py.

Measured figures (file size, perplexity, export time and decode speed per scheme on the demo model):
docs/RUNTIMES.md, section "ONNX schemes on the demo model". int4's large perplexity cost on the demo model
comes from its weights lying on a Q4_1 grid that ORT's integer zero points cannot reproduce
(docs/ENVIRONMENT.md, section "The demo model's weights are already 4-bit").

LM_HEAD. optimum exports a tied lm_head as MatMul(hidden, Transpose(embedding)); MatMulNBitsQuantizer skips
it ("MatMul doesn't have const weight"), so it stays fp32, and ORT constant-folds the Transpose at load:
RAM then holds the fp32 embedding twice. Measured figures (file size, perplexity and peak RSS of every
lm_head / embedding treatment on the demo model): docs/RUNTIMES.md, section "ONNX lm_head and embedding
treatments".

  So: a 4-bit lm_head costs clearly measurable perplexity; an 8-bit one costs nothing measurable (the demo's
  embedding came from Q8_0, but llama.cpp keeps token_embd/output at 6-8 bits for the same reason);
  an int4 embedding costs a little, an int8 one nothing. Default: untie, lm_head MatMulNBits int8
  block 32, embedding GatherBlockQuantized int8 block 32 (written here: ORT's quantizer only does
  4-bit Gathers, the contrib op takes uint8 data with bits=8): a smaller file and less RAM than the
  tied fp32 head, at the same perplexity. Options `lm_head` and `embedding` select the
  others. (Asymmetric int4 here means ORT's grid: range widened to include 0, integer zero point; it
  does not reproduce the demo's Q4_1 grid, which is why symmetric b32 scores better on this model.)

ACCURACY_LEVEL. MatMulNBits' accuracy_level 0/1 computes in fp32; on CPU that path is slow for 8-bit
weights (the whole weight is dequantized per call). Level 4 quantizes activations to int8 per block and
uses MLAS' integer kernels (AVX2 here; NEON/VNNI elsewhere): much faster decode at a small perplexity change.
Default 4; `accuracy_level=None` leaves ORT's. Measured figures: docs/RUNTIMES.md, section "ONNX MatMulNBits
accuracy_level".

FP16. optimum's fp16 export on CPU works (dtype="fp16"), but folding leaves the 30 o_proj weights fp32;
converting the fp32 graph with onnxruntime.transformers.float16 takes a little longer after the fp32 export
and writes every weight fp16, as the planner's byte table counts. Default "convert"; "optimum" halves
the export's peak memory, for a model whose fp32 graph does not fit in RAM. Measured figures:
docs/RUNTIMES.md, section "ONNX fp16: converted graph vs optimum's fp16 export".

Imports of optimum/onnx/onnxruntime happen inside functions: `import exporters` stays light.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.base import (
    TOKENIZER_FILES,
    ExportError,
    ExportResult,
    check_checkpoint,
    normalise_metadata,
    write_record,
)
from exporters.onnx_llava import GRAPH_FILES
from toolkit.core.atomic import staging_dir
from toolkit.core.formats import ONNX_SCHEMES, OnnxScheme, vision_dtypes_for
from toolkit.core.hashing import checkpoint_sha256, file_sha256
from toolkit.core.vision import PROCESSOR_FILE

if TYPE_CHECKING:
    import onnx

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
# Protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# onnxruntime 1.31 reads IR <= 13 (onnx 1.23's make_model writes 14); MatMulNBitsQuantizer raises to 10.
MAX_IR_VERSION = 10
METADATA_PREFIX = "bedside."


# lm_head and embedding treatments for weight-only schemes (LM_HEAD in the module docstring).
#   lm_head "int8": own weight (untied from the embedding if tied), MatMulNBits int8 block 32;
#           "body": own weight, quantized like the body; "float": own weight, not quantized;
#           "tied": the graph as optimum writes it (a tied head stays Transpose(float embedding)).
#   embedding "int8": GatherBlockQuantized uint8 block 32; "int4": onnxruntime's 4-bit Gather
#           quantization with the body's block; "float": a plain Gather.
LM_HEAD_TREATMENTS = ("int8", "body", "float", "tied")
EMBEDDING_TREATMENTS = ("int8", "int4", "float")
HEAD_AND_EMBEDDING_BLOCK = 32

# LLaVA exports: the processor files copied beside the graphs, and the record's task name.
PROCESSOR_FILES = (PROCESSOR_FILE, "processor_config.json")
LLAVA_TASK = "image-text-to-text-with-past"

_LLAVA_DRIVER = r"""
import sys
from exporters.onnx_llava import main
sys.exit(main(sys.argv[1:]))
"""

_OPTIMUM_DRIVER = r"""
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", dtype=sys.argv[3],
            device="cpu", do_validation=False, local_files_only=True, trust_remote_code=False)
"""


def export_onnx(
    model_dir: str | os.PathLike[str],
    quant: str,
    out_dir: str | os.PathLike[str],
    *,
    imatrix: str | os.PathLike[str] | None = None,
    metadata: dict[str, Any] | None = None,
    symmetric: bool = False,
    block_size: int | None = None,
    lm_head: str = "int8",
    embedding: str = "int8",
    fp16_method: str = "convert",
    accuracy_level: int | None = 4,
    vision_dtype: str | None = None,
) -> ExportResult:
    """Export a Hugging Face causal LM to ONNX (decoder with KV cache) in scheme `quant`.

    Args:
        model_dir: checkpoint folder.
        quant: fp32, fp16, int8, int4_b32 or int4_b128.
        out_dir: folder for model.onnx (+ model.onnx_data when large), tokenizer files, export.json.
        imatrix: not used by ONNX (an importance matrix guides llama.cpp's rounding only); must be None.
        metadata: recorded in export.json and as bedside.* metadata_props of the ONNX model.
        symmetric: MatMulNBits without zero points (default False: the planner's byte table assumes them).
        block_size: override the scheme's block size.
        lm_head: "int8", "body", "float" or "tied" (LM_HEAD_TREATMENTS); weight-only schemes only.
        embedding: "int8", "int4" or "float" (EMBEDDING_TREATMENTS); weight-only schemes only.
        accuracy_level: MatMulNBits compute precision (4: int8 activations, the fast CPU kernels; None:
            leave unset, ORT's fp32 default). See ACCURACY_LEVEL.
        fp16_method: "convert" (export fp32, then onnxruntime.transformers.float16 conversion: every
            weight fp16) or "optimum" (optimum's fp16 export: half the export memory, but constant
            folding leaves o_proj weights fp32). See FP16_NOTE.
        vision_dtype: a LLaVA's vision graph float; only the scheme's own (fp16 for fp16, else f32) can be
            written (toolkit.core.formats.vision_dtypes_for), anything else is refused. Ignored for text models.
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if quant not in ONNX_SCHEMES:
        raise ExportError(f"unknown ONNX scheme {quant!r}; choose one of {', '.join(ONNX_SCHEMES)}")
    if imatrix is not None:
        raise ExportError("an importance matrix applies to GGUF exports only (llama.cpp quantizer)")
    if vision_dtype is not None and vision_dtype not in vision_dtypes_for("onnx", quant):
        raise ExportError(
            f"the ONNX vision graph is written in {vision_dtypes_for('onnx', quant)[0]} for scheme {quant}, "
            f"not {vision_dtype}: a quantized vision tower needs --format gguf"
        )
    if lm_head not in LM_HEAD_TREATMENTS:
        raise ExportError(
            f"unknown lm_head treatment {lm_head!r}; choose one of {', '.join(LM_HEAD_TREATMENTS)}"
        )
    scheme = ONNX_SCHEMES[quant]
    if block_size is not None:
        if scheme.bits is None:
            raise ExportError(f"block_size applies to int8/int4 schemes, not {quant}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ExportError(f"block_size must be a power of two >= 16 (MatMulNBits), got {block_size}")
        scheme = OnnxScheme(scheme.float_dtype, scheme.bits, block_size)
    if fp16_method not in ("convert", "optimum"):
        raise ExportError(f"unknown fp16_method {fp16_method!r}; choose convert or optimum")
    if embedding not in EMBEDDING_TREATMENTS:
        raise ExportError(
            f"unknown embedding treatment {embedding!r}; choose one of {', '.join(EMBEDDING_TREATMENTS)}"
        )
    config = check_checkpoint(model_dir)
    meta = normalise_metadata(metadata)
    source_sha256 = str(meta.get("source_sha256") or checkpoint_sha256(model_dir))
    if is_llava(config):
        return export_llava_onnx(
            model_dir,
            quant,
            out_dir,
            scheme=scheme,
            config=config,
            metadata=meta,
            source_sha256=source_sha256,
            symmetric=symmetric,
            lm_head=lm_head,
            embedding=embedding,
            fp16_method=fp16_method,
            accuracy_level=accuracy_level,
        )

    timings: dict[str, float] = {}
    with staging_dir(out_dir) as scratch:
        exported = scratch / "optimum"
        start = time.perf_counter()
        optimum_dtype = "fp16" if scheme.float_dtype == "fp16" and fp16_method == "optimum" else "fp32"
        run_optimum_export(model_dir, exported, optimum_dtype)
        timings["optimum_export_s"] = round(time.perf_counter() - start, 2)

        import onnx

        start = time.perf_counter()
        treatment: dict[str, Any] = {"lm_head": "tied (Transpose of the embedding)", "embedding": "float"}
        rewrite_weights = scheme.bits is not None or optimum_dtype != scheme.float_dtype
        # A float export only needs its metadata set: load the graph without the tensors.
        model = onnx.load(str(exported / MODEL_FILE), load_external_data=rewrite_weights)
        if scheme.bits is not None:
            treatment = quantize_weights(
                model,
                bits=scheme.bits,
                block_size=scheme.block_size or 32,
                symmetric=symmetric,
                lm_head=lm_head,
                embedding=embedding,
                accuracy_level=accuracy_level,
            )
        elif scheme.float_dtype == "fp16" and optimum_dtype == "fp32":
            convert_to_fp16(model)
            treatment["fp16_method"] = "convert"
        elif scheme.float_dtype == "fp16":
            treatment["fp16_method"] = "optimum"
        set_metadata_props(model, meta, source_sha256, quant)
        if rewrite_weights:
            for stale in (exported / MODEL_FILE, exported / EXTERNAL_DATA_FILE):
                stale.unlink(missing_ok=True)
            save_model(model, exported / MODEL_FILE)
        else:
            onnx.save_model(model, str(exported / MODEL_FILE))  # tensors stay in model.onnx_data, if any
        del model
        timings["postprocess_s"] = round(time.perf_counter() - start, 2)

        copy_tokenizer_files(model_dir, exported)
        written = sorted(p for p in exported.iterdir() if p.is_file())
        out_dir.mkdir(parents=True, exist_ok=True)
        # A LLaVA export's graphs left in the folder would make this text export look like an image one.
        for graph in GRAPH_FILES.values():
            for stale in (out_dir / graph, out_dir / data_file(graph)):
                stale.unlink(missing_ok=True)
        # Data file first, graph last: a reader never sees a model.onnx whose data is not in place yet.
        for path in sorted(written, key=lambda p: p.name == MODEL_FILE):
            os.replace(path, out_dir / path.name)

    files = [out_dir / MODEL_FILE] + [out_dir / p.name for p in written if p.name != MODEL_FILE]
    sizes = {p.name: p.stat().st_size for p in files}
    model_bytes = sizes[MODEL_FILE] + sizes.get(EXTERNAL_DATA_FILE, 0)
    record: dict[str, Any] = {
        "schema_version": 1,
        "format": "onnx",
        "quant": quant,
        "file": MODEL_FILE,
        "external_data": EXTERNAL_DATA_FILE if EXTERNAL_DATA_FILE in sizes else None,
        "bytes": model_bytes,
        "sha256": file_sha256(out_dir / MODEL_FILE),
        "scheme": {**asdict(scheme), "symmetric": symmetric if scheme.bits else None, **treatment},
        "source": {
            "path": str(model_dir.resolve()),
            "sha256": source_sha256,
            "model_type": config.get("model_type"),
        },
        "metadata": meta,
        "layers_removed": sorted(meta.get("layers_removed") or []),
        "task": "text-generation-with-past",
        "files": sorted(sizes),
        "tool": _tool_versions(),
        "timings": timings,
    }
    record_path = write_record(out_dir, record)
    files.append(record_path)
    sizes[record_path.name] = record_path.stat().st_size
    return ExportResult(files=files, format="onnx", quant=quant, sizes=sizes, record=record)


def run_optimum_export(model_dir: Path, output: Path, dtype: str) -> None:
    """optimum-onnx text-generation-with-past export in a child process; ExportError with its last error."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    completed = subprocess.run(
        [sys.executable, "-c", _OPTIMUM_DRIVER, str(model_dir), str(output), dtype],
        capture_output=True, text=True, env=environment,
    )  # fmt: skip
    if completed.returncode != 0 or not (output / MODEL_FILE).is_file():
        raise ExportError(f"optimum-onnx export of {model_dir} failed: {_last_error_line(completed.stderr)}")


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if any(word in line for word in ("Error", "error", "Exception", "not supported")):
            return line[:400]
    return lines[-1][:400] if lines else "no output"


# ----------------------------------------------------------------------------------------------
# LLaVA: vision, embedding and decoder graphs (exporters/onnx_llava.py builds them in a child process)


def is_llava(config: dict[str, Any]) -> bool:
    """True when a checkpoint's config.json describes a LlavaForConditionalGeneration."""
    return config.get("model_type") == "llava" or "LlavaForConditionalGeneration" in (
        config.get("architectures") or []
    )


def data_file(graph_file: str) -> str:
    """The external-data file of a graph, when its tensors pass protobuf's 2 GB: model.onnx_data for the decoder."""
    return EXTERNAL_DATA_FILE if graph_file == MODEL_FILE else graph_file + "_data"


def image_token_count(config: dict[str, Any]) -> int:
    """Positions one image takes: (image_size / patch_size)^2, +1 with strategy "full" (LlavaProcessor's count)."""
    vision = config.get("vision_config") or {}
    side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
    return side * side + (1 if config.get("vision_feature_select_strategy", "default") == "full" else 0)


def export_llava_onnx(
    model_dir: Path,
    quant: str,
    out_dir: Path,
    *,
    scheme: OnnxScheme,
    config: dict[str, Any],
    metadata: dict[str, Any],
    source_sha256: str,
    symmetric: bool,
    lm_head: str,
    embedding: str,
    fp16_method: str,
    accuracy_level: int | None,
) -> ExportResult:
    """Export a LLaVA checkpoint folder to the three ONNX graphs in scheme `quant` (called by export_onnx).

    Arguments as `exporters.onnx_exporter.export_onnx` checked them. Files are built in a scratch folder
    inside `out_dir` and moved in by rename, graph data first and model.onnx last, so a reader never sees a
    half-written export.
    """
    if fp16_method != "convert":
        raise ExportError(
            "fp16_method 'optimum' applies to text models (optimum has no LLaVA export); LLaVA fp16 exports "
            "convert the fp32 graphs"
        )
    if not (model_dir / PROCESSOR_FILE).is_file():
        raise ExportError(
            f"LLaVA folder {model_dir} has no {PROCESSOR_FILE} (the image processor): copy it from the "
            "original checkpoint; the runtime needs it to prepare images"
        )
    timings: dict[str, float] = {}
    with staging_dir(out_dir) as scratch:
        exported = scratch / "graphs"
        start = time.perf_counter()
        run_llava_export(model_dir, exported)
        timings["torch_export_s"] = round(time.perf_counter() - start, 2)

        start = time.perf_counter()
        treatment = postprocess_llava_graphs(
            exported,
            scheme=scheme,
            metadata=metadata,
            source_sha256=source_sha256,
            quant=quant,
            symmetric=symmetric,
            lm_head=lm_head,
            embedding=embedding,
            accuracy_level=accuracy_level,
        )
        timings["postprocess_s"] = round(time.perf_counter() - start, 2)

        copy_tokenizer_files(model_dir, exported)
        for name in PROCESSOR_FILES:
            if (model_dir / name).is_file():
                shutil.copy2(model_dir / name, exported / name)
        written = sorted(p for p in exported.iterdir() if p.is_file())
        graph_names = set(GRAPH_FILES.values())
        for graph in GRAPH_FILES.values():
            for stale in (out_dir / graph, out_dir / data_file(graph)):
                stale.unlink(missing_ok=True)
        order = {name: index for index, name in enumerate(GRAPH_FILES.values())}
        for path in sorted(written, key=lambda p: (p.name in graph_names, order.get(p.name, -1))):
            os.replace(path, out_dir / path.name)

    names = [p.name for p in written]
    files = [out_dir / MODEL_FILE] + [out_dir / name for name in names if name != MODEL_FILE]
    sizes = {p.name: p.stat().st_size for p in files}
    graphs: dict[str, dict[str, Any]] = {}
    for role, graph in GRAPH_FILES.items():
        data = data_file(graph)
        graphs[role] = {
            "file": graph,
            "external_data": data if data in sizes else None,
            "bytes": sizes[graph] + sizes.get(data, 0),
            "sha256": file_sha256(out_dir / graph),
            **treatment[role],
        }
    record: dict[str, Any] = {
        "schema_version": 1,
        "format": "onnx",
        "quant": quant,
        "file": MODEL_FILE,
        "external_data": graphs["decoder"]["external_data"],
        "bytes": sum(graph["bytes"] for graph in graphs.values()),  # everything a runtime loads
        "sha256": graphs["decoder"]["sha256"],
        "scheme": {
            **asdict(scheme),
            "symmetric": symmetric if scheme.bits else None,
            **treatment["decoder"],
            "embedding": treatment["embedding"].get("embedding", "float"),
            "vision": treatment["vision"]["weights"],
        },
        "graphs": graphs,
        "vision": {
            "image_tokens": image_token_count(config),
            "vision_feature_layer": config.get("vision_feature_layer", -2),
            "vision_feature_select_strategy": config.get("vision_feature_select_strategy", "default"),
            "processor": PROCESSOR_FILE,
        },
        "source": {
            "path": str(model_dir.resolve()),
            "sha256": source_sha256,
            "model_type": config.get("model_type"),
        },
        "metadata": metadata,
        "layers_removed": sorted(metadata.get("layers_removed") or []),
        "task": LLAVA_TASK,
        "files": sorted(sizes),
        "tool": _tool_versions(),
        "timings": timings,
    }
    record_path = write_record(out_dir, record)
    files.append(record_path)
    sizes[record_path.name] = record_path.stat().st_size
    return ExportResult(files=files, format="onnx", quant=quant, sizes=sizes, record=record)


def run_llava_export(model_dir: Path, output: Path) -> None:
    """onnx_llava.export_float_graphs in a child process (its torch memory ends with it); ExportError with its
    last error line. Tests replace it to export the float graphs once for several schemes."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[1])  # the project, importable without an installed package
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (root, environment.get("PYTHONPATH")) if p)
    completed = subprocess.run(
        [sys.executable, "-c", _LLAVA_DRIVER, str(model_dir), str(output)],
        capture_output=True, text=True, env=environment,
    )  # fmt: skip
    if completed.returncode != 0 or not all((output / name).is_file() for name in GRAPH_FILES.values()):
        raise ExportError(
            f"ONNX export of the LLaVA {model_dir} failed: {_last_error_line(completed.stderr)}"
        )


def postprocess_llava_graphs(
    folder: Path,
    *,
    scheme: OnnxScheme,
    metadata: dict[str, Any],
    source_sha256: str,
    quant: str,
    symmetric: bool,
    lm_head: str,
    embedding: str,
    accuracy_level: int | None,
) -> dict[str, dict[str, Any]]:
    """Apply scheme `quant` to the float graphs in `folder` in place and set Bedside's metadata on each.

    Returns per graph role what was done (recorded in export.json): "dtype" (the float type) and "weights"
    ("float", or how the weights are quantized) for every graph, and the lm_head / embedding treatments
    where a weight-only scheme applies. The vision graph's weights stay float in every scheme.
    """
    import onnx

    done: dict[str, dict[str, Any]] = {}
    for role, graph in GRAPH_FILES.items():
        path = folder / graph
        model = onnx.load(str(path))  # external data, if any, is read too
        info: dict[str, Any] = {"dtype": scheme.float_dtype, "weights": "float"}
        if scheme.float_dtype == "fp16":
            convert_to_fp16(model)
        if scheme.bits is not None and role == "decoder":
            info.update(
                quantize_weights(
                    model,
                    bits=scheme.bits,
                    block_size=scheme.block_size or 32,
                    symmetric=symmetric,
                    lm_head=lm_head,
                    embedding="float",  # the decoder reads embeddings; the table is in the embedding graph
                    accuracy_level=accuracy_level,
                )
            )
            info.pop("embedding")
            info["weights"] = f"int{scheme.bits}_b{scheme.block_size or 32} (MatMulNBits)"
        elif scheme.bits is not None and role == "embedding":
            info["weights"] = info["embedding"] = quantize_embedding_graph(
                model, embedding=embedding, block_size=scheme.block_size or 32, symmetric=symmetric
            )
        graph_metadata = dict(metadata, graph=role)
        set_metadata_props(model, graph_metadata, source_sha256, quant)
        if model.ir_version > MAX_IR_VERSION:
            model.ir_version = MAX_IR_VERSION
        for stale in (path, path.parent / data_file(graph), path.parent / (graph + ".data")):
            stale.unlink(missing_ok=True)
        save_graph(model, path)
        done[role] = info
    return done


def quantize_embedding_graph(
    model: onnx.ModelProto, *, embedding: str, block_size: int, symmetric: bool
) -> str:
    """The text exports' embedding treatment on the embedding graph; returns its record entry."""
    if embedding == "int8" and quantize_embedding_int8(
        model, block_size=HEAD_AND_EMBEDDING_BLOCK, symmetric=symmetric
    ):
        drop_unused_initializers(model)
        return f"int8_b{HEAD_AND_EMBEDDING_BLOCK}"
    if embedding == "int4":
        _run_matmul_nbits(
            model, bits=4, block_size=block_size, symmetric=symmetric, exclude=[], op_types=("Gather",)
        )
        drop_unused_initializers(model)
        return f"int4_b{block_size}"
    return "float"


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Save one graph; tensors go to `data_file(path.name)` beside it when they pass protobuf's 2 GB."""
    if path.name == MODEL_FILE:
        save_model(model, path)
    else:
        save_model(model, path, location=data_file(path.name))


def find_lm_head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The MatMul that produces the `logits` output (through shape-only ops), or None."""
    producers = {output: node for node in model.graph.node for output in node.output}
    name = "logits"
    for _ in range(8):
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type in ("MatMul", "MatMulNBits"):
            return node
        if node.op_type not in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Add"):
            return None
        name = node.input[0]
    return None


def untie_lm_head(model: onnx.ModelProto, head: onnx.NodeProto) -> bool:
    """Give a tied lm_head its own weight: MatMul(x, Transpose(E)) -> MatMul(x, E^T as a constant).

    Returns True when it untied something (False: the head already reads a constant weight). The
    Transpose is removed when nothing else reads it; the embedding stays for the Gather.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    transpose = producers.get(head.input[1])
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
        return False
    weight = numpy_helper.to_array(initializers[transpose.input[0]])
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    name = f"{transpose.input[0]}.untied_transposed"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
    head.input[1] = name
    if not any(transpose.output[0] in other.input for other in graph.node):
        graph.node.remove(transpose)
    return True


def quantize_weights(
    model: onnx.ModelProto,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    lm_head: str = "int8",
    embedding: str = "int8",
    accuracy_level: int | None = 4,
) -> dict[str, Any]:
    """Weight-only quantization in place: MatMulNBits for every constant-weight MatMul, plus the
    lm_head and embedding treatments. Returns what was done to the lm_head and embedding (for the record).
    """
    head = find_lm_head(model)
    untied = head is not None and lm_head != "tied" and untie_lm_head(model, head)
    head_name = head.name if head is not None else None
    head_reads_constant = head is not None and _has_constant_weight(model, head)
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    if head_name is None or lm_head == "tied":
        _run_matmul_nbits(model, bits=bits, block_size=block_size, symmetric=symmetric, exclude=[])
        head_desc = (
            "tied fp32 (Transpose of the embedding)"
            if not head_reads_constant
            else f"int{bits}_b{block_size}"
        )
    else:
        _run_matmul_nbits(model, bits=bits, block_size=block_size, symmetric=symmetric, exclude=[head_name])
        head_desc = "float"
        if lm_head == "int8":
            others = [name for name in matmuls if name != head_name]
            _run_matmul_nbits(
                model, bits=8, block_size=HEAD_AND_EMBEDDING_BLOCK, symmetric=symmetric, exclude=others
            )
            head_desc = f"int8_b{HEAD_AND_EMBEDDING_BLOCK}"
        elif lm_head == "body":
            others = [name for name in matmuls if name != head_name]
            _run_matmul_nbits(model, bits=bits, block_size=block_size, symmetric=symmetric, exclude=others)
            head_desc = f"int{bits}_b{block_size}"
        if untied:
            head_desc += " (untied from the embedding)"
    embedding_desc = "float"
    if embedding == "int8":
        if quantize_embedding_int8(model, block_size=HEAD_AND_EMBEDDING_BLOCK, symmetric=symmetric):
            embedding_desc = f"int8_b{HEAD_AND_EMBEDDING_BLOCK}"
    elif embedding == "int4":
        _run_matmul_nbits(
            model, bits=4, block_size=block_size, symmetric=symmetric, exclude=[], op_types=("Gather",)
        )
        embedding_desc = f"int4_b{block_size}"
    if accuracy_level is not None:
        set_accuracy_level(model, accuracy_level)
    drop_unused_initializers(model)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
    return {"lm_head": head_desc, "embedding": embedding_desc, "accuracy_level": accuracy_level}


def set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    """Set MatMulNBits' accuracy_level (minimum compute precision: 1 fp32, 2 fp16, 3 bf16, 4 int8).

    Level 4 lets MLAS quantize activations to int8 per block and use its integer kernels: measured 2x
    faster decode for int4 and 11x for int8 weights (whose fp32 path dequantizes the whole weight per
    call) at a perplexity change within 0.6 % (docs/RUNTIMES.md, section "ONNX MatMulNBits accuracy_level").
    """
    from onnx import helper

    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attribute in [a for a in node.attribute if a.name == "accuracy_level"]:
            node.attribute.remove(attribute)
        node.attribute.append(helper.make_attribute("accuracy_level", level))


def _has_constant_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    initializers = {tensor.name for tensor in model.graph.initializer}
    return len(node.input) > 1 and node.input[1] in initializers


def quantize_embedding_int8(model: onnx.ModelProto, *, block_size: int, symmetric: bool) -> bool:
    """Replace the token-embedding Gather by com.microsoft.GatherBlockQuantized with uint8 data, in place.

    Blocks of `block_size` along the hidden dimension; codes, scales and zero points come from
    onnxruntime's own MatMulNBits 8-bit quantizer (MLAS) applied to E^T, so the embedding lies on
    exactly the grid an int8 MatMulNBits lm_head uses. GatherBlockQuantized dequantizes
    (q - zero_point) * scale, with zero point 128 when none is given (symmetric), as MatMulNBits does.
    Returns False when no Gather reads a 2-D float initializer.
    """
    from onnx import helper, numpy_helper
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for index, node in enumerate(graph.node):
        if node.op_type != "Gather" or node.input[0] not in initializers:
            continue
        table = numpy_helper.to_array(initializers[node.input[0]])
        if table.ndim != 2 or table.dtype != np.float32:
            continue
        if any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        rows, width = table.shape
        blocks = -(-width // block_size)
        packed = np.zeros((rows, blocks, block_size), dtype=np.uint8)
        scales = np.zeros(rows * blocks, dtype=np.float32)
        zero_points = np.zeros(rows * blocks, dtype=np.uint8)
        quantize_matmul_8bits(
            packed, np.ascontiguousarray(table.T), scales, zero_points, block_size, rows, width, symmetric
        )
        base = node.input[0]
        new_tensors = [
            numpy_helper.from_array(
                packed.reshape(rows, blocks * block_size)[:, :width].copy(), base + "_Q8"
            ),
            numpy_helper.from_array(scales.reshape(rows, blocks), base + "_scales"),
        ]
        inputs = [base + "_Q8", node.input[1], base + "_scales"]
        if not symmetric:
            new_tensors.append(
                numpy_helper.from_array(zero_points.reshape(rows, blocks), base + "_zero_points")
            )
            inputs.append(base + "_zero_points")
        quantized = helper.make_node(
            "GatherBlockQuantized",
            inputs,
            list(node.output),
            name=(node.name or base) + "_Q8",
            domain="com.microsoft",
            bits=8,
            block_size=block_size,
            gather_axis=0,
            quantize_axis=1,
        )
        graph.node.remove(node)
        graph.node.insert(index, quantized)
        graph.initializer.extend(new_tensors)
        if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return True
    return False


def _run_matmul_nbits(
    model: onnx.ModelProto,
    *,
    bits: int,
    block_size: int,
    symmetric: bool,
    exclude: list[str],
    op_types: tuple[str, ...] = ("MatMul",),
) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer_logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    previous = quantizer_logger.level
    quantizer_logger.setLevel(logging.ERROR)  # one INFO line per node otherwise
    try:
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            nodes_to_exclude=exclude,
            op_types_to_quantize=op_types,
        )
        quantizer.process()
    finally:
        quantizer_logger.setLevel(previous)
    quantized = quantizer.model.model
    if quantized is not model:
        model.CopyFrom(quantized)


def convert_to_fp16(model: onnx.ModelProto) -> None:
    """Convert a float32 graph to float16 in place (weights, activations, inputs and outputs).

    onnxruntime.transformers.float16 keeps its default op block list (ops without fp16 kernels run in
    fp32 behind Casts); inputs/outputs become fp16 too, as in optimum's own fp16 export, so a runner
    feeds fp16 past_key_values either way.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=False, disable_shape_infer=True)
    if converted is not model:
        model.CopyFrom(converted)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node reads (MatMulNBitsQuantizer leaves a quantized Gather's float source)."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {output.name for output in model.graph.output}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)


def set_metadata_props(
    model: onnx.ModelProto, metadata: dict[str, Any], source_sha256: str, quant: str
) -> None:
    """Record Bedside's metadata in the ONNX model's metadata_props (strings; lists/dicts as JSON)."""
    values = {
        "schema_version": "1",
        "source_sha256": source_sha256,
        "quant": quant,
        "layers_removed": json.dumps(sorted(metadata.get("layers_removed") or [])),
    }
    for key, value in metadata.items():
        if key not in values and value is not None:
            values[key] = (
                value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
            )
    existing = {prop.key: prop for prop in model.metadata_props}
    for key, value in values.items():
        prop = existing.get(METADATA_PREFIX + key) or model.metadata_props.add()
        prop.key = METADATA_PREFIX + key
        prop.value = value


def save_model(model: onnx.ModelProto, path: Path, location: str = EXTERNAL_DATA_FILE) -> None:
    """Save `model`; tensors go to `location` beside it (model.onnx_data) when the total would pass protobuf's 2 GB."""
    import onnx

    tensor_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if tensor_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))


def copy_tokenizer_files(model_dir: Path, target: Path) -> list[str]:
    """Copy the tokenizer, its config and the chat template beside model.onnx (those optimum did not)."""
    copied = []
    for name in TOKENIZER_FILES:
        source = model_dir / name
        if source.is_file() and not (target / name).is_file():
            shutil.copy2(source, target / name)
            copied.append(name)
    if not (target / "config.json").is_file():
        shutil.copy2(model_dir / "config.json", target / "config.json")
    return copied


def _tool_versions() -> dict[str, str]:
    versions = {}
    for package in (
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "transformers",
        "torch",
    ):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions
