"""Issue 17: Bedside's importance matrix (`--quant-method imatrix`) against llama.cpp's own `llama-imatrix`.

Run from the repository root (builds the tools on first use, bench/llama_tools.py):

    .venv/bin/python -m bench.imatrix_parity --threads 2    # docs/benchmarks/imatrix_parity.json + BENCHMARKS.md

Same model, same tokens. The demo model (SmolLM2-135M-Instruct) is exported to an F16 GGUF by Bedside's exporter.
Calibration: the blocks `bedside compress` gathers on by default (`toolkit.data.make_blocks` over the calibration
side of the default data set, seed 0), here 16 x 512 tokens. They are decoded into one text file; llama-imatrix
tokenizes it itself (`--parse-special`, as the blocks hold chat-template tokens) and cuts chunks of `-c 512`
tokens (a BOS opening each chunk where the vocabulary adds one). The script tokenizes the file with the very same
call (`llama_tokenize(add_special=True, parse_special=True)` of the same GGUF, through llama-cpp-python), checks
the ids equal the blocks, and gathers Bedside's matrix (`toolkit.compress.quant.imatrix.gather_imatrix`, the
unscaled float32 torch model, one 512-token sequence at a time) on exactly the ids of llama-imatrix's chunks.

Compared per weight W (GGUF names; Bedside's Hugging Face names mapped with `exporters.gguf_imatrix.gguf_tensor_names`):

    counts equal:  counts_bedside(W) == counts_llama(W)  (tokens summed)
    max_rel(W)   = max_j |b_j - r_j| / max(r_j, 1e-6 * max_k r_k)     b, r: in_sum2 of Bedside / llama-imatrix
    rel_l2(W)    = ||b - r||_2 / ||r||_2

and overall the largest and the median over weights. Expected: ~1e-3, from llama.cpp running F16 weights (and an
F16 KV cache) where the torch model runs float32; the same gather on the torch model with its matrices rounded to
float16 (`f16_weights`) shows how much of that is the weights' rounding.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS_DIR,
    bench_cache_dir,
    command_line,
    load_average,
    markdown_table,
    short_command,
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from bench.llama_tools import build_tools
from exporters.gguf_imatrix import gguf_tensor_names, read_imatrix_sums
from toolkit.core.errors import BedsideError

RESULTS = RESULTS_DIR / "imatrix_parity.json"
SEQUENCES, SEQ_LEN, SEED = 16, 512, 0
MARKER = "imatrix-parity"


def relative_errors(bedside: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """max_rel = max_j |b_j - r_j| / max(r_j, 1e-6 max_k r_k);  rel_l2 = ||b - r|| / ||r|| (module docstring).

    Also where max_rel is: the reference value of that column and the reference's median (a small column's
    sum carries the largest relative error).
    """
    b = np.asarray(bedside, dtype=np.float64).reshape(-1)
    r = np.asarray(reference, dtype=np.float64).reshape(-1)
    if b.shape != r.shape:
        raise BedsideError(f"imatrix lengths differ: {b.size} values against {r.size}")
    floor = 1e-6 * float(np.max(np.abs(r))) if r.size else 0.0
    denominator = np.maximum(np.abs(r), max(floor, np.finfo(np.float64).tiny))
    norm = float(np.linalg.norm(r))
    if not r.size:
        return {"max_rel": 0.0, "rel_l2": 0.0, "worst_reference": 0.0, "median_reference": 0.0}
    relative = np.abs(b - r) / denominator
    worst = int(np.argmax(relative))
    return {
        "max_rel": float(relative[worst]),
        "rel_l2": float(np.linalg.norm(b - r) / norm) if norm > 0 else float(np.linalg.norm(b - r)),
        "worst_reference": float(r[worst]),
        "median_reference": float(np.median(r)),
    }


def compare_imatrix(
    bedside_sums: Mapping[str, np.ndarray],
    bedside_counts: Mapping[str, float],
    reference_sums: Mapping[str, np.ndarray],
    reference_counts: Mapping[str, np.ndarray],
    architecture: str,
    block_count: int,
) -> dict[str, Any]:
    """Per GGUF weight name: both counts and the relative errors of Bedside's in_sum2; overall max and median.

    Bedside's names (Hugging Face) are mapped to GGUF names; a weight on one side only is listed, never skipped
    silently. Counts are compared per weight (llama-imatrix stores one per matrix).
    """
    mapping = gguf_tensor_names(bedside_sums, architecture, block_count)
    unmapped = sorted(name for name, target in mapping.items() if target is None)
    if unmapped:
        raise BedsideError(f"Bedside imatrix entry {unmapped[0]!r} matches no {architecture} tensor")
    by_gguf = {target: name for name, target in mapping.items() if target is not None}
    tensors: dict[str, dict[str, Any]] = {}
    for target in sorted(set(by_gguf) & set(reference_sums)):
        name = by_gguf[target]
        counts = [float(c) for c in np.asarray(reference_counts[target]).reshape(-1)]
        tensors[target] = {
            "bedside_name": name,
            "count_bedside": float(bedside_counts[name]),
            "count_llama": counts[0] if len(counts) == 1 else counts,
            "counts_equal": all(float(bedside_counts[name]) == c for c in counts),
            **{
                key: value
                for key, value in relative_errors(bedside_sums[name], reference_sums[target]).items()
            },
        }
    max_rel = [entry["max_rel"] for entry in tensors.values()]
    rel_l2 = [entry["rel_l2"] for entry in tensors.values()]
    return {
        "tensors": tensors,
        "only_bedside": sorted(set(by_gguf) - set(reference_sums)),
        "only_llama": sorted(set(reference_sums) - set(by_gguf)),
        "compared": len(tensors),
        "counts_equal": all(entry["counts_equal"] for entry in tensors.values()),
        "max_rel": max(max_rel) if max_rel else None,
        "median_max_rel": float(np.median(max_rel)) if max_rel else None,
        "max_rel_l2": max(rel_l2) if rel_l2 else None,
        "median_rel_l2": float(np.median(rel_l2)) if rel_l2 else None,
        "worst_tensor": max(tensors, key=lambda key: tensors[key]["max_rel"]) if tensors else None,
    }


def chunk_ids(ids: list[int], n_chunks: int, chunk_len: int, bos: int | None) -> list[list[int]]:
    """llama-imatrix's chunks of the tokenized file: consecutive `chunk_len` ids, the first set to BOS when it adds one."""
    if len(ids) < max(n_chunks, 2) * chunk_len:
        raise BedsideError(
            f"the calibration text tokenizes to {len(ids)} ids, fewer than {n_chunks} chunks of {chunk_len} "
            "(llama-imatrix needs at least two)"
        )
    chunks = [list(ids[i * chunk_len : (i + 1) * chunk_len]) for i in range(n_chunks)]
    if bos is not None:
        for chunk in chunks:
            chunk[0] = bos
    return chunks


def _calibration_blocks(model_dir: Path, tokenizer: Any) -> Any:
    """The blocks `bedside compress` gathers on by default (toolkit/compress/pipeline.py `_prepare_data`), one spare."""
    from toolkit.core.records import EVAL_FRACTION, default_data
    from toolkit.data import load_dataset_spec, make_blocks, split_calibration_eval

    source = default_data(False)
    documents = load_dataset_spec(source)
    calib_docs, _, _ = split_calibration_eval(documents, EVAL_FRACTION, SEED, source=source)
    # one spare block, so the text's tail (which llama.cpp may cut differently) lies past the compared chunks
    return make_blocks(calib_docs, tokenizer, SEQ_LEN, SEQUENCES + 1, SEED, source=source), source


def _llama_tokenize(gguf: Path, text: str) -> tuple[list[int], int | None, dict[str, Any]]:
    """common_tokenize(ctx, text, add_special=true, parse_special=true) of llama-imatrix, on the same GGUF."""
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        ids = list(llama.tokenize(text.encode("utf-8"), add_bos=True, special=True))
        vocab = llama_cpp.llama_model_get_vocab(llama.model)
        adds_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = int(llama_cpp.llama_vocab_bos(vocab)) if adds_bos else None
        info = {"architecture": llama.metadata.get("general.architecture", "llama")}
        info["block_count"] = int(llama.metadata.get(f"{info['architecture']}.block_count", 0))
        info["add_bos"] = adds_bos
    finally:
        llama.close()
    return ids, bos, info


def _f16_rounded(model: Any) -> None:
    """Round every matrix (2-D weight) of `model` to float16 and back, as the F16 GGUF stores them (norms stay F32)."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 2:
                parameter.copy_(parameter.to(torch.float16).to(torch.float32))


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from exporters import export
    from toolkit.compress.quant.imatrix import gather_imatrix
    from toolkit.compress.stages import load_tokenizer
    from toolkit.core.hashing import token_ids_sha256
    from toolkit.model.source import resolve_model_dir

    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "command": command_line(),
        "started": utc_now(),
        "loadavg_start": load_average(),
    }
    tools = build_tools(jobs=args.threads)
    record["tools"] = {"llama_imatrix": str(tools.imatrix), "build_seconds": tools.build_seconds}
    model_dir = resolve_model_dir("demo")
    cache = bench_cache_dir("imatrix_parity")

    gguf_dir = cache / "gguf-F16"
    if not (gguf_dir / "model-F16.gguf").is_file():
        start = time.perf_counter()
        export(model_dir, "gguf", "F16", gguf_dir, threads=args.threads)
        record["export_seconds"] = round(time.perf_counter() - start, 1)
    gguf = gguf_dir / "model-F16.gguf"

    tokenizer = load_tokenizer(model_dir)
    blocks, source = _calibration_blocks(model_dir, tokenizer)
    stream = blocks.input_ids.reshape(-1).tolist()
    text = tokenizer.decode(stream, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    text_path = cache / "calibration.txt"
    write_text_atomic(text_path, text)

    ids, bos, info = _llama_tokenize(gguf, text)
    chunks = chunk_ids(ids, SEQUENCES, SEQ_LEN, bos)
    compared = blocks.input_ids[:SEQUENCES].reshape(-1).tolist()
    flat = [token for chunk in chunks for token in chunk]
    mismatches = [i for i, (a, b) in enumerate(zip(flat, compared, strict=True)) if a != b]
    record["tokens"] = {
        "data": source,
        "sequences": SEQUENCES,
        "seq_len": SEQ_LEN,
        "seed": SEED,
        "make_blocks_sha256": token_ids_sha256(blocks.input_ids[:SEQUENCES]),
        "llama_chunks_sha256": token_ids_sha256(np.asarray(chunks, dtype=np.int64)),
        "llama_tokens_in_file": len(ids),
        "same_as_make_blocks": not mismatches,
        "mismatched_positions": len(mismatches),
        "first_mismatches": mismatches[:10],
        "add_bos": info["add_bos"],
    }

    out = cache / "llama-imatrix.gguf"
    out.unlink(missing_ok=True)
    command = [
        str(tools.imatrix),
        "-m", str(gguf),
        "-f", str(text_path),
        "-o", str(out),
        "--output-format", "gguf",
        "-c", str(SEQ_LEN),
        "-b", str(SEQ_LEN),
        "--chunks", str(SEQUENCES),
        "--parse-special",
        "--no-ppl",
        "-t", str(args.threads),
    ]  # fmt: skip
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    log = completed.stdout + completed.stderr
    (cache / "llama-imatrix.log").write_text(log, encoding="utf-8")
    if completed.returncode != 0 or not out.is_file():
        raise BedsideError(
            f"llama-imatrix failed (status {completed.returncode}): see {cache / 'llama-imatrix.log'}"
        )
    found = re.search(r"computing over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", log)
    record["llama_imatrix"] = {
        "command": " ".join(command),
        "seconds": round(seconds, 2),
        "log_line": found.group(0) if found else None,
    }
    if found is None or int(found.group(1)) != SEQUENCES:
        raise BedsideError(
            f"llama-imatrix did not process {SEQUENCES} chunks: see {cache / 'llama-imatrix.log'}"
        )
    reference = read_imatrix_sums(out)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=False)
    calib = torch.tensor(chunks, dtype=torch.long)
    runs: dict[str, Any] = {}
    for variant in ("float32_weights", "f16_weights"):
        if variant == "f16_weights":
            _f16_rounded(model)
        stats = gather_imatrix(model, calib, batch_size=4)
        comparison = compare_imatrix(
            stats.in_sum2,
            stats.counts,
            reference.in_sum2,
            reference.counts,
            info["architecture"],
            info["block_count"],
        )
        comparison["gather_seconds"] = round(stats.seconds, 2)
        runs[variant] = comparison
    record["comparisons"] = runs
    record["finished"] = utc_now()
    record["loadavg_end"] = load_average()
    return record


def worst_note(comparison: dict[str, Any]) -> str:
    """One sentence on where the largest max_rel is: that column's sum against its tensor's median."""
    name = comparison["worst_tensor"]
    if name is None:
        return ""
    entry = comparison["tensors"][name]
    ratio = (
        entry["median_reference"] / entry["worst_reference"] if entry["worst_reference"] > 0 else float("inf")
    )
    return (
        f"The largest max_rel ({entry['max_rel']:.2e}, {name}) is at a column whose llama-imatrix sum is "
        f"{entry['worst_reference']:.3g}, {ratio:.0f} x below that tensor's median ({entry['median_reference']:.3g}): "
        "small sums carry the largest relative differences; rel_l2 weighs columns by size."
    )


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def write_docs(record: dict[str, Any]) -> None:
    """The BENCHMARKS.md section: the command, the tokens, and the figures of both comparisons."""
    rows = []
    for variant, comparison in record["comparisons"].items():
        rows.append(
            [
                variant.replace("_", " "),
                comparison["compared"],
                "yes" if comparison["counts_equal"] else "no",
                _figure(comparison["max_rel"]),
                _figure(comparison["median_max_rel"]),
                _figure(comparison["max_rel_l2"]),
                _figure(comparison["median_rel_l2"]),
                comparison["worst_tensor"],
            ]
        )
    tokens = record["tokens"]
    body = "\n".join(
        [
            "## Importance matrix: Bedside against llama-imatrix (issue 17)",
            "",
            f"`{record['command']}` (bench/imatrix_parity.py; raw figures in docs/benchmarks/imatrix_parity.json).",
            f"The demo model's F16 GGUF, {tokens['sequences']} x {tokens['seq_len']} tokens of the default "
            f"calibration data (`{tokens['data']}`, the blocks `bedside compress` uses, seed {tokens['seed']}); "
            f"llama-imatrix tokenized the decoded text itself and saw the same ids as the blocks: "
            f"{'yes' if tokens['same_as_make_blocks'] else 'no, ' + str(tokens['mismatched_positions']) + ' differ'} "
            "(Bedside gathers on llama-imatrix's chunks either way).",
            f"Reference: `{short_command(record['llama_imatrix']['command'])}` (llama-imatrix built from the "
            f"llama-cpp-python sdist by bench/llama_tools.py; {record['llama_imatrix']['seconds']} s). Per weight, "
            "max_rel = max_j |b_j - r_j| / r_j and rel_l2 = ||b - r|| / ||r|| of the in_sum2 vectors "
            "(b Bedside, r llama-imatrix); Bedside's torch model once as it is (float32) and once with its "
            "matrices rounded to float16 as the GGUF stores them.",
            "",
            markdown_table(
                [
                    "Bedside's torch model",
                    "weights",
                    "counts equal",
                    "max max_rel",
                    "median max_rel",
                    "max rel_l2",
                    "median rel_l2",
                    "worst weight",
                ],
                rows,
            ),
            "",
            worst_note(record["comparisons"]["float32_weights"]),
            f"Load average {record['loadavg_start']} at start, {record['loadavg_end']} at the end ({record['started']}).",
        ]
    )
    update_benchmarks_doc(MARKER, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads", type=int, default=2, help="threads of llama-imatrix, torch and the build"
    )
    args = parser.parse_args()
    record = run(args)
    write_json_atomic(RESULTS, record)
    write_docs(record)
    for variant, comparison in record["comparisons"].items():
        print(
            f"{variant}: {comparison['compared']} weights, counts equal {comparison['counts_equal']}, "
            f"max max_rel {_figure(comparison['max_rel'])}, median max_rel {_figure(comparison['median_max_rel'])}, "
            f"max rel_l2 {_figure(comparison['max_rel_l2'])}"
        )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
