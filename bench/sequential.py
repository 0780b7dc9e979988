"""Benchmark: block-by-block compression of Llama-shaped models with random bf16 weights (issue 14, part 1).

    .venv/bin/python bench/sequential.py --shape tinyllama-1.1b [--calib-sequences 4 --seq-len 128] [--export]
    nice -n 10 .venv/bin/python bench/sequential.py --shape llama2-7b --export

Writes a Llama checkpoint with the named model's shapes and random bf16 weights shard by shard into
`--work` (no download: N(0, 0.02) linears and embeddings, unit norms, one tensor resident at a time),
with the demo model's tokenizer (no Llama tokenizer is available offline, so the vocabulary is the
demo's 49152 tokens instead of Llama's 32000: +70 M parameters at 1.1B, +140 M at 7B), then runs

    bedside compress --model DIR --prune-layers 4 --quant Q4_K_M --no-heal --calib-sequences N --seq-len S --out OUT

in a child process (/usr/bin/time-style peak from the child's own VmHWM via resource), optionally
`bedside export --format gguf`, and records per stage: seconds, peak RSS (load and save included, from
compression.json), seconds per decoder block, and the perplexity runs' peaks, beside the
compression-memory estimate of `toolkit.plan.memory.compression_memory`. Results:
docs/benchmarks/sequential_<shape>.json. Resumes: the checkpoint is kept, compress resumes its stages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.compress.sequential.checkpoint import ShardedCheckpoint, write_shards  # noqa: E402
from toolkit.core.atomic import write_json_atomic  # noqa: E402
from toolkit.model.source import resolve_model_dir  # noqa: E402

# Llama shapes of the named models (config.json of each, vocabulary aside: see the module docstring).
SHAPES: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
SHARD_BYTES = 2 << 30


def tensor_specs(shape: dict[str, Any], vocab: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, bf16) of every tensor of a Llama with these shapes (HF names, untied head)."""
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = hidden // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"model.embed_tokens.weight": ((vocab, hidden), torch.bfloat16)}
    for index in range(shape["num_hidden_layers"]):
        prefix = f"model.layers.{index}."
        for name, dims in (
            ("input_layernorm.weight", (hidden,)),
            ("self_attn.q_proj.weight", (hidden, hidden)),
            ("self_attn.k_proj.weight", (kv, hidden)),
            ("self_attn.v_proj.weight", (kv, hidden)),
            ("self_attn.o_proj.weight", (hidden, hidden)),
            ("post_attention_layernorm.weight", (hidden,)),
            ("mlp.gate_proj.weight", (inter, hidden)),
            ("mlp.up_proj.weight", (inter, hidden)),
            ("mlp.down_proj.weight", (hidden, inter)),
        ):
            specs[prefix + name] = (dims, torch.bfloat16)
    specs["model.norm.weight"] = ((hidden,), torch.bfloat16)
    specs["lm_head.weight"] = ((vocab, hidden), torch.bfloat16)
    return specs


def build_checkpoint(folder: Path, shape_name: str) -> Path:
    """The random bf16 Llama checkpoint (kept between runs; its config records the seed)."""
    if (folder / "config.json").is_file():
        return folder
    demo = resolve_model_dir("demo", need_weights=True)
    demo_config = json.loads((demo / "config.json").read_text(encoding="utf-8"))
    vocab = int(demo_config["vocab_size"])
    building = folder.with_name(folder.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    shape = SHAPES[shape_name]
    specs = tensor_specs(shape, vocab)
    generator = torch.Generator().manual_seed(0)

    def make(name: str) -> torch.Tensor:
        dims, dtype = specs[name]
        if name.endswith("norm.weight"):
            return torch.ones(dims, dtype=dtype)
        return (torch.randn(dims, generator=generator) * 0.02).to(dtype)

    started = time.perf_counter()
    write_shards(building, specs, make, SHARD_BYTES)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": demo_config.get("bos_token_id"),
        "eos_token_id": demo_config.get("eos_token_id"),
        "dtype": "bfloat16",
        "bedside_bench": {"shape": shape_name, "weights": "N(0, 0.02) bf16, seed 0, norms 1"},
    }
    (building / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (demo / name).is_file():
            shutil.copy2(demo / name, building / name)
    os.replace(building, folder)
    print(f"[bench] wrote {shape_name} ({sum(math.prod(d) for d, _ in specs.values()) / 1e9:.2f} B parameters) "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def run_child(command: list[str], log: Path) -> dict[str, Any]:
    """Run a bedside command; its wall time and the child's peak RSS (ru_maxrss of the waited child)."""
    started = time.perf_counter()
    with log.open("w", encoding="utf-8") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}): see {log}")
    return {"command": " ".join(command), "seconds": round(time.perf_counter() - started, 1),
            "process_peak_rss_bytes": usage.ru_maxrss * 1024}


def write_partial(out: Path, args: argparse.Namespace) -> None:
    """The finished stages of a run that has not ended: their stage.json (seconds, peak RSS, per block)."""
    stages = {}
    for record_path in sorted((out / "stages").glob("*/stage.json")):
        stored = json.loads(record_path.read_text(encoding="utf-8"))
        blocks = stored.get("block_seconds") or []
        stages[stored["stage"]] = {
            "seconds": stored["seconds"],
            "peak_rss_bytes": stored["peak_rss_bytes"],
            "sequential": stored.get("sequential", False),
            "seconds_per_block": round(sum(blocks) / len(blocks), 3) if blocks else None,
            "block_seconds": blocks,
            "layers_removed": stored["details"].get("layers_removed"),
        }
    if not stages:  # would overwrite the recorded result with an empty one
        raise SystemExit(f"no finished stage under {out / 'stages'}: nothing to record")
    quality_path = out / "stages" / "quality.json"
    result = {
        "benchmark": "sequential compression (issue 14 part 1), PARTIAL: the run had not ended",
        "shape": args.shape,
        "stages": stages,
        "perplexities": json.loads(quality_path.read_text(encoding="utf-8")) if quality_path.is_file() else {},
        "host": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
    }
    write_json_atomic(ROOT / "docs" / "benchmarks" / f"sequential_{args.shape}.json", result)
    print(json.dumps(stages, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "bedside" / "bench-sequential")
    parser.add_argument("--calib-sequences", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--export", action="store_true", help="also bedside export --format gguf --quant Q4_K_M")
    parser.add_argument(
        "--awq-search-rounding", choices=("rerank", "exact", "emulated"), default="rerank",
        help="compress's --awq-search-rounding (emulated: no libggml re-rank; the 7B shape's AWQ in minutes, not hours)",
    )  # fmt: skip
    parser.add_argument(
        "--partial", action="store_true", help="record the finished stages of a run still going (stage.json files)"
    )
    args = parser.parse_args()
    work = args.work / args.shape
    out = work / "compressed"
    if args.partial:  # reads the running compress's stage records; builds nothing
        write_partial(out, args)
        return
    checkpoint = build_checkpoint(work / "checkpoint", args.shape)
    bedside = [sys.executable, "-m", "toolkit.cli.main"]
    compress_command = [
        *bedside, "compress", "--model", str(checkpoint), "--prune-layers", "4", "--quant", "Q4_K_M", "--no-heal",
        "--calib-sequences", str(args.calib_sequences), "--seq-len", str(args.seq_len), "--no-progress",
        "--awq-search-rounding", args.awq_search_rounding,
        "--out", str(out),
    ]
    kept = work / "compression-run.json"  # the first run's record: a resumed run records no peaks
    runs_path = work / "runs.json"
    runs = json.loads(runs_path.read_text(encoding="utf-8")) if runs_path.is_file() else {}
    if not kept.is_file():
        runs["compress"] = run_child(compress_command, work / "compress.log")
        shutil.copy2(out / "compression.json", kept)
        write_json_atomic(runs_path, runs)
    record = json.loads(kept.read_text(encoding="utf-8"))
    if args.export and "export" not in runs:
        runs["export"] = run_child(
            [*bedside, "export", "--model", str(out), "--format", "gguf", "--quant", "Q4_K_M", "--out", str(work / "gguf")],
            work / "export.log",
        )
        write_json_atomic(runs_path, runs)
    from toolkit.model.facts import read_facts
    from toolkit.plan.compression_memory import compression_memory

    options = record["options"]
    estimate = compression_memory(
        read_facts(str(checkpoint)),
        calib_sequences=options["calib_sequences"],
        seq_len=options["seq_len"],
        eval_sequences=options["eval_sequences"],
        prune_layers=options["prune_layers"],
        quant=options["quant"] is not None,
        sequential=bool(record.get("sequential")),
    )
    stages: dict[str, Any] = {}
    for name, entry in record["stages"].items():
        if "skipped" in entry:
            stages[name] = {"skipped": entry["skipped"]}
            continue
        blocks = entry.get("block_seconds") or []
        stages[name] = {
            "seconds": entry["seconds"],
            "peak_rss_bytes": entry["peak_rss_bytes"],
            "sequential": entry.get("sequential", False),
            "seconds_per_block": round(sum(blocks) / len(blocks), 3) if blocks else None,
            "block_seconds": blocks,
            "estimate_bytes": estimate.get(name),
        }
    for label, measurement in record["quality"].get("measurements", {}).items():
        key = "perplexity_quantized" if label == "quantized" else "perplexity"
        stages[f"perplexity-{label}"] = {**measurement, "estimate_bytes": estimate.get(key)}
    for entry in stages.values():
        if entry.get("estimate_bytes") and entry.get("peak_rss_bytes"):
            entry["estimate_error"] = round(entry["estimate_bytes"] / entry["peak_rss_bytes"] - 1, 3)
    result = {
        "benchmark": "sequential compression (issue 14 part 1)",
        "shape": args.shape,
        "checkpoint": str(checkpoint),
        "parameters": sum(math.prod(entry.shape) for entry in ShardedCheckpoint(checkpoint).tensors.values()),
        "calibration": record["calibration"],
        "evaluation_tokens": record["eval"]["tokens"],
        "sequential": record.get("sequential"),
        "layers_removed": record["layers_removed"],
        "quality": {k: v for k, v in record["quality"].items() if k != "measurements"},
        "stages": stages,
        "runs": runs,
        "host": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "command": f".venv/bin/python bench/sequential.py --shape {args.shape} --calib-sequences "
        f"{args.calib_sequences} --seq-len {args.seq_len}" + (" --export" if args.export else ""),
    }
    target = ROOT / "docs" / "benchmarks" / f"sequential_{args.shape}.json"
    write_json_atomic(target, result)
    print(json.dumps({k: result[k] for k in ("stages", "runs")}, indent=1))


if __name__ == "__main__":
    main()
