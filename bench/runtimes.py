"""Bench 3: every export format and runtime on this machine, for the demo model.

Run from the repository root (resumes: exports are cached, finished measurements are skipped):

    .venv/bin/python -m bench.runtimes             # docs/benchmarks/runtimes.json + BENCHMARKS.md
    .venv/bin/python -m bench.runtimes --export-only

Per artifact (GGUF F16..Q3_K_M through llama.cpp, ONNX fp32..int4_b128 through ONNX Runtime CPU),
one `runtimes.measure.measure_in_child` job at context 2048: prefill 2016 tokens of held-apart
medical text, decode 32 tokens greedily (the KV cache ends full), then score a fixed held-apart
text from a fresh cache. Recorded: model file size, perplexity = exp(-mean_t log q(x_t | x_<t))
over the scored tokens (`toolkit.core.metrics`), prefill and decode tokens/s, peak RSS of the child (VmHWM), the load
average before and after, and

    bandwidth_fraction = decode_tok_s / (host_bandwidth / bytes_per_token)
    bytes_per_token    = weight_bytes_read + kv_bytes_read
    weight_bytes_read  = every weight tensor's bytes, except an embedding table that is only
                         gathered from, of which one row per token counts (bytes / rows); a table
                         shared with the output head (tied) counts in full
    kv_bytes_read      = 2 (K, V) x layers x kv_heads x head_dim x mean_position x kv_element_bytes

with mean_position = context - decode_tokens / 2 (the decode steps read 2016..2047 cached
positions), kv_element_bytes 2 for llama.cpp (F16 cache) and the element size of the ONNX graph's
past_key_values inputs. host_bandwidth is `toolkit.target.host.measure_memory_bandwidth` (best numpy
copy, bytes read + written, STREAM copy convention) with the thread count the runtimes used.
Exports are cached under ~/.cache/bedside/bench/runtimes (not in the repository).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS_DIR,
    bench_cache_dir,
    command_line,
    evaluation_blocks,
    load_average,
    load_medical_data,
    markdown_table,
    read_json,
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
)
from exporters import export
from runtimes.measure import MeasureJob, measure_in_child
from toolkit.core.metrics import perplexity_from_logprobs
from toolkit.core.records import EXPORT_RECORD
from toolkit.model.source import resolve_model_dir
from toolkit.target.host import measure_memory_bandwidth

RESULTS = RESULTS_DIR / "runtimes.json"
ARTIFACTS: tuple[tuple[str, str], ...] = (
    *(("gguf", q) for q in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M")),
    *(("onnx", q) for q in ("fp32", "fp16", "int8", "int4_b32", "int4_b128")),
)
RUNTIME_OF = {"gguf": "llama.cpp", "onnx": "onnxruntime"}
CONTEXT = 2048
DECODE_TOKENS = 32
SCORE_TOKENS = 2000
EVAL_LEN, EVAL_BLOCKS_PER_SOURCE, EVAL_SEED = 256, 4, 2
ONNX_ELEMENT_BYTES = {1: 4, 10: 2, 16: 2, 11: 8}  # TensorProto FLOAT, FLOAT16, BFLOAT16, DOUBLE


def artifact_key(format_name: str, quant: str) -> str:
    """Key of one artifact in the results: `gguf/Q4_0`, `onnx/int8`."""
    return f"{format_name}/{quant}"


def kv_bytes_per_token(
    layers: int, kv_heads: int, head_dim: int, mean_position: float, element_bytes: int
) -> float:
    """KV-cache bytes one decode step reads: 2 x layers x kv_heads x head_dim x positions x bytes."""
    return 2.0 * layers * kv_heads * head_dim * mean_position * element_bytes


def bandwidth_fraction(decode_tok_s: float, bandwidth_bytes_s: float, bytes_per_token: float) -> float:
    """decode_tok_s / (bandwidth / bytes_per_token): 1.0 = decoding as fast as memory allows."""
    return decode_tok_s / (bandwidth_bytes_s / bytes_per_token)


def gguf_weight_bytes(path: Path) -> dict[str, Any]:
    """Weight bytes a decode step reads from a GGUF (see the module docstring for the rule)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    total = sum(int(tensor.n_bytes) for tensor in tensors.values())
    embedding = tensors.get("token_embd.weight")
    tied = "output.weight" not in tensors
    read = total
    note = "all tensors; token_embd counted in full (tied: it is the output head too)"
    if embedding is not None and not tied:
        rows = int(embedding.shape[-1])  # gguf shapes are (columns, rows)
        read = total - int(embedding.n_bytes) + int(embedding.n_bytes) / rows
        note = "all tensors except token_embd, of which one row"
    return {"tensor_bytes": total, "weight_bytes_read": read, "tied_output": tied, "counted": note}


def _initializer_bytes(initializer: Any) -> int:
    from onnx import helper

    if initializer.HasField("raw_data") and initializer.raw_data:
        return len(initializer.raw_data)
    for entry in initializer.external_data:
        if entry.key == "length":
            return int(entry.value)
    count = int(np.prod(list(initializer.dims))) if initializer.dims else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(initializer.data_type)).itemsize


def onnx_weight_bytes(model_dir: Path) -> dict[str, Any]:
    """Weight bytes a decode step reads from an ONNX decoder, and the KV cache element size."""
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    read = 0.0
    gathered = []
    for initializer in model.graph.initializer:
        size = _initializer_bytes(initializer)
        total += size
        ops = consumers.get(initializer.name, set())
        if (
            ops
            and all(op.startswith("Gather") for op in ops)
            and initializer.dims
            and initializer.dims[0] > 1
        ):
            read += size / int(initializer.dims[0])
            gathered.append(initializer.name)
        else:
            read += size
    kv_types = {
        value.type.tensor_type.elem_type
        for value in model.graph.input
        if value.name.startswith("past_key_values")
    }
    element = max((ONNX_ELEMENT_BYTES.get(t, 4) for t in kv_types), default=4)
    return {
        "tensor_bytes": total,
        "weight_bytes_read": read,
        "gather_only_tables": gathered,
        "kv_element_bytes": element,
        "counted": "every initializer; tables consumed only by Gather ops: one row",
    }


def export_artifact(model_dir: Path, format_name: str, quant: str) -> tuple[Path, dict[str, Any]]:
    """The cached export (made on first use): the path a runtime loads and its file sizes."""

    out_dir = bench_cache_dir("runtimes") / f"{format_name}-{quant}"
    record_path = out_dir / EXPORT_RECORD
    if not record_path.is_file():
        options = {"threads": 1} if format_name == "gguf" else {}
        export(model_dir, format_name, quant, out_dir, **options)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if format_name == "gguf":
        path = next(out_dir.glob("*.gguf"))
        model_bytes = path.stat().st_size
    else:
        path = out_dir
        model_bytes = sum(p.stat().st_size for p in out_dir.glob("model.onnx*"))
    return path, {
        "export_dir": str(out_dir),
        "model_file_bytes": model_bytes,
        "export_record_keys": sorted(record),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    results = read_json(RESULTS) if not args.fresh else {}
    results.setdefault("artifacts", {})
    results.setdefault("runs", [])
    run_record: dict[str, Any] = {
        "command": command_line(),
        "started": utc_now(),
        "loadavg_start": load_average(),
    }
    results["runs"].append(run_record)
    model_dir = resolve_model_dir("demo")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    layers = int(config["num_hidden_layers"])
    kv_heads = int(config.get("num_key_value_heads", config["num_attention_heads"]))
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    data = load_medical_data()
    ids = evaluation_blocks(data, tokenizer, EVAL_LEN, EVAL_BLOCKS_PER_SOURCE, EVAL_SEED).reshape(-1).tolist()
    score_ids = ids[:SCORE_TOKENS]
    bandwidth, bandwidth_source = measure_memory_bandwidth(args.threads, 256, 1.0)
    mean_position = CONTEXT - DECODE_TOKENS / 2
    results["setup"] = {
        "model": "demo (SmolLM2-135M-Instruct)",
        "layers": layers,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "context": CONTEXT,
        "decode_tokens": DECODE_TOKENS,
        "score_tokens": len(score_ids),
        "score_text": "held-apart PubMedQA contexts + MedQuAD answers (bench/common.py split), "
        f"{EVAL_BLOCKS_PER_SOURCE} x {EVAL_LEN} tokens per source, seed {EVAL_SEED}",
        "data": data.record,
        "threads": args.threads,
        "host_bandwidth_gb_s": round(bandwidth, 2),
        "host_bandwidth_source": bandwidth_source,
        "mean_decode_position": mean_position,
    }
    write_json_atomic(RESULTS, results)
    for format_name, quant in ARTIFACTS:
        key = artifact_key(format_name, quant)
        entry = results["artifacts"].get(key, {})
        if "export" not in entry:
            path, export_info = export_artifact(model_dir, format_name, quant)
            entry["export"] = export_info
            entry["path"] = str(path)
            results["artifacts"][key] = entry
            write_json_atomic(RESULTS, results)
            print(f"{key}: exported, {export_info['model_file_bytes'] / 1e6:.1f} MB", flush=True)
        if args.export_only or "decode_tok_s" in entry:
            continue
        path = Path(entry["path"])
        weights = gguf_weight_bytes(path) if format_name == "gguf" else onnx_weight_bytes(path)
        element = 2 if format_name == "gguf" else weights["kv_element_bytes"]
        kv = kv_bytes_per_token(layers, kv_heads, head_dim, mean_position, element)
        job = MeasureJob(
            context=CONTEXT,
            decode_tokens=DECODE_TOKENS,
            n_threads=args.threads,
            device="cpu",
            prompt_ids=ids,
            score_ids=score_ids,
        )
        load_before = load_average()
        measured = measure_in_child(RUNTIME_OF[format_name], path, job, timeout_s=1800)
        load_after = load_average()
        logprobs = measured.score.token_logprobs if measured.score else []
        bytes_per_token = weights["weight_bytes_read"] + kv
        entry.update(
            {
                "runtime": RUNTIME_OF[format_name],
                "perplexity": round(perplexity_from_logprobs(logprobs), 4) if logprobs else None,
                "scored_tokens": len(logprobs),
                "prefill_tok_s": round(measured.prefill_tokens_per_s, 2),
                "decode_tok_s": round(measured.decode_tokens_per_s, 2),
                "peak_rss_bytes": measured.peak_rss_bytes,
                "baseline_rss_bytes": measured.baseline_rss_bytes,
                "load_seconds": round(measured.load_seconds, 3),
                "weights": weights,
                "kv_bytes_read": kv,
                "kv_element_bytes": element,
                "bytes_per_token": bytes_per_token,
                "bandwidth_bound_tok_s": round(bandwidth * 1e9 / bytes_per_token, 2),
                "bandwidth_fraction": round(
                    bandwidth_fraction(measured.decode_tokens_per_s, bandwidth * 1e9, bytes_per_token), 4
                ),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "measured": utc_now(),
            }
        )
        results["artifacts"][key] = entry
        write_json_atomic(RESULTS, results)
        update_benchmarks_doc("runtimes", render(results))
        print(
            f"{key}: ppl {entry['perplexity']}, decode {entry['decode_tok_s']} tok/s, "
            f"peak RSS {entry['peak_rss_bytes'] / 1e6:.0f} MB, load {load_after}",
            flush=True,
        )
    run_record["finished"] = utc_now()
    run_record["loadavg_end"] = load_average()
    write_json_atomic(RESULTS, results)
    return results


def render(results: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: one row per artifact."""
    setup = results.get("setup", {})
    rows = []
    for format_name, quant in ARTIFACTS:
        entry = results.get("artifacts", {}).get(artifact_key(format_name, quant))
        if not entry or "decode_tok_s" not in entry:
            continue
        rows.append(
            [
                f"{format_name} {quant}",
                entry["runtime"],
                f"{entry['export']['model_file_bytes'] / 1e6:.1f}",
                f"{entry['perplexity']:.3f}" if entry.get("perplexity") else "-",
                f"{entry['prefill_tok_s']:.0f}",
                f"{entry['decode_tok_s']:.1f}",
                f"{entry['peak_rss_bytes'] / 1e6:.0f}",
                f"{entry['bytes_per_token'] / 1e6:.1f}",
                f"{entry['bandwidth_fraction']:.2f}",
                "/".join(f"{v:.1f}" for v in entry["loadavg_after"]),
            ]
        )
    return "\n".join(
        [
            "## Formats and runtimes (bench 3)",
            "",
            "Command: `.venv/bin/python -m bench.runtimes` (raw: `docs/benchmarks/runtimes.json`). Demo model, "
            f"CPU, {setup.get('threads')} thread(s), context {CONTEXT}: prefill {CONTEXT - DECODE_TOKENS} tokens, "
            f"decode {DECODE_TOKENS}; perplexity on {setup.get('score_tokens')} held-apart medical tokens "
            "(PubMedQA contexts + MedQuAD answers). Peak RSS = VmHWM of the measuring child (includes Python and "
            "the runtime's libraries). Bandwidth fraction = decode tok/s / (host bandwidth / bytes read per "
            f"token), host bandwidth {setup.get('host_bandwidth_gb_s')} GB/s (numpy copy, read + written, "
            "`toolkit.target.host.measure_memory_bandwidth`); bytes per token = weight bytes (embedding table "
            "that is only gathered from: one row; tied output head: in full) + KV cache read at the mean decode "
            "position. Load average (1/5/15 min) after each measurement in the last column: timings on this "
            "shared 2-core machine are inflated by other work.",
            "",
            markdown_table(
                [
                    "artifact",
                    "runtime",
                    "model MB",
                    "perplexity",
                    "prefill tok/s",
                    "decode tok/s",
                    "peak RSS MB",
                    "MB read/token",
                    "bandwidth fraction",
                    "load avg",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--export-only", action="store_true", help="make the cached exports, measure nothing")
    parser.add_argument("--fresh", action="store_true", help="measure again even where results exist")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    results = run(args)
    update_benchmarks_doc("runtimes", render(results))


if __name__ == "__main__":
    main()
