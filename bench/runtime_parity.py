"""Issue 15, section 4: Bedside's measured speeds against each runtime's own benchmark, same file, same threads.

Run from the repository root (builds llama-bench on first use, bench/llama_tools.py; exports are cached):

    .venv/bin/python -m bench.runtime_parity --threads 2     # docs/benchmarks/runtime_parity.json + RUNTIMES.md

Bedside: `runtimes.measure.measure_in_child` (what `bedside eval` runs) with MeasureJob(context=1024,
decode_tokens=32, n_threads=T): prefill 992 tokens from an empty cache, then decode 32 tokens greedily at
positions 992..1023, twice (the speeds are the second, warm pass's; the first pass's are kept); `--reps`
child processes per file and setting,

    prefill tok/s = 992 / prefill_seconds,   decode tok/s = 32 / decode_seconds,   reported: the mean over runs

(the mean of per-run rates, as llama-bench's avg_ts). For GGUF the two sides run in interleaved rounds (Bedside
flash attention off, on, then `llama-bench -r 1`), so that a drift of the host's speed falls on both alike.
References on the same file and thread count:

- llama.cpp: `llama-bench -m FILE -t T -r R -fa 0,1 -p 992 -n 32 -d 0,992 -o json`, built from the same sdist as
  the llama-cpp-python Bedside runs; prefill is compared with pp992 @ d0 (992 tokens from an empty cache),
  decode with tg32 @ d992 (32 tokens after 992 cached). Flash attention is compared like with like: Bedside's
  CPU default (off with an f16 cache) against -fa 0, Bedside with flash_attn=True against -fa 1, which is
  what llama-bench's own default -fa auto resolves to on a CPU (llama-context.cpp); a third row puts the two
  defaults side by side. A second run at -b 512 (Bedside's n_batch) checks that llama-bench's n_batch 2048
  is not what makes the difference;
- ONNX Runtime: a minimal loop in its own process (`ort_reference`): one InferenceSession (CPU provider,
  intra_op_num_threads=T, default optimisation), IO binding with the present tensors bound as the next step's
  past; a warm-up pass, then R repetitions of: prefill 992 tokens in one call from an empty past, decode 32.

    ratio = Bedside tok/s / reference tok/s       (1.0: Bedside measures the runtime's own speed)

The load average is recorded around every measurement: the machine may be shared, and load inflates times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    RESULTS_DIR,
    bench_cache_dir,
    command_line,
    load_average,
    markdown_table,
    read_json,
    replace_section,
    short_command,
    utc_now,
    write_json_atomic,
    write_text_atomic,
)
from toolkit.core.errors import BedsideError

RESULTS = RESULTS_DIR / "runtime_parity.json"
DOC = Path(__file__).resolve().parents[1] / "docs" / "RUNTIMES.md"
MARKER = "runtime-parity"
CONTEXT, DECODE = 1024, 32
PREFILL = CONTEXT - DECODE
ARTIFACTS: tuple[tuple[str, str], ...] = (("gguf", "Q8_0"), ("gguf", "Q4_K_M"), ("onnx", "int4_b32"))
RUNTIME_OF = {"gguf": "llama.cpp", "onnx": "onnxruntime"}


def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """llama-bench's `-o json` output: one row per test with n_prompt, n_gen, n_depth, avg_ts, samples_ts..."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise BedsideError(f"llama-bench printed no JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise BedsideError("llama-bench's JSON is not a list of test rows")
    for row in rows:
        missing = [key for key in ("n_prompt", "n_gen", "n_depth", "avg_ts", "samples_ts") if key not in row]
        if missing:
            raise BedsideError(f"llama-bench row lacks {', '.join(missing)}")
    return rows


def bench_row(rows: Sequence[dict[str, Any]], n_prompt: int, n_gen: int, n_depth: int) -> dict[str, Any]:
    """The one llama-bench row of test (n_prompt, n_gen) at depth n_depth (pp: n_gen 0; tg: n_prompt 0)."""
    found = [
        row
        for row in rows
        if (int(row["n_prompt"]), int(row["n_gen"]), int(row["n_depth"])) == (n_prompt, n_gen, n_depth)
    ]
    if len(found) != 1:
        raise BedsideError(
            f"llama-bench output has {len(found)} rows for pp{n_prompt}/tg{n_gen} at depth {n_depth}, expected one"
        )
    return found[0]


def mean_rate(tokens: int, seconds: Sequence[float]) -> float:
    """mean_i(tokens / seconds_i): the mean of per-run rates (llama-bench's avg_ts)."""
    if not seconds or min(seconds) <= 0:
        raise BedsideError("no positive timings to average")
    return float(np.mean([tokens / s for s in seconds]))


def ort_reference(folder: Path, threads: int, reps: int, prefill: int, decode: int) -> dict[str, Any]:
    """The minimal ONNX Runtime loop (module docstring): InferenceSession + IO binding, warm-up, then `reps` runs."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from runtimes.measure import FILLER_TEXT

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    inputs = {item.name: item for item in session.get_inputs()}
    past_names = sorted(
        (name for name in inputs if name.startswith("past_key_values.")),
        key=lambda name: (int(name.split(".")[1]), name),
    )
    present_names = [name.replace("past_key_values", "present") for name in past_names]
    first = inputs[past_names[0]]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    heads = first.shape[1] if isinstance(first.shape[1], int) else config["num_key_value_heads"]
    head_dim = first.shape[3] if isinstance(first.shape[3], int) else config["head_dim"]
    kv_dtype = np.float16 if first.type == "tensor(float16)" else np.float32
    filler = (
        Tokenizer.from_file(str(folder / "tokenizer.json")).encode(FILLER_TEXT, add_special_tokens=False).ids
    )
    prompt = (filler * (prefill // len(filler) + 1))[:prefill]

    def step(ids: list[int], past: list[Any], start: int) -> tuple[np.ndarray, list[Any]]:
        binding = session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        total = start + len(ids)
        if "attention_mask" in inputs:
            binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if "position_ids" in inputs:
            binding.bind_cpu_input("position_ids", np.arange(start, total, dtype=np.int64)[None, :])
        for name, value in zip(past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in present_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy()[0, -1], outputs[1:]

    def empty() -> list[Any]:
        zeros = np.zeros((1, heads, 0, head_dim), dtype=kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(zeros) for _ in past_names]

    def one_run() -> tuple[float, float]:
        start = time.perf_counter()
        logits, past = step(prompt, empty(), 0)
        prefill_seconds = time.perf_counter() - start
        token = int(np.argmax(logits))
        start = time.perf_counter()
        for position in range(prefill, prefill + decode):
            logits, past = step([token], past, position)
            token = int(np.argmax(logits))
        return prefill_seconds, time.perf_counter() - start

    warm_up = one_run()  # as llama-bench's; its times show a first (cold) run
    runs = [one_run() for _ in range(reps)]
    return {
        "warm_up_prefill_tok_s": prefill / warm_up[0],
        "warm_up_decode_tok_s": decode / warm_up[1],
        "prefill_seconds": [round(p, 4) for p, _ in runs],
        "decode_seconds": [round(d, 4) for _, d in runs],
        "prefill_tok_s": mean_rate(prefill, [p for p, _ in runs]),
        "decode_tok_s": mean_rate(decode, [d for _, d in runs]),
        "onnxruntime": ort.__version__,
        "protocol": f"warm-up, then {reps} x (prefill {prefill} in one call, decode {decode})",
    }


def _ort_reference_child(folder: Path, threads: int, reps: int) -> dict[str, Any]:
    """Run `ort_reference` in a fresh Python process (like Bedside's measurement child)."""
    with tempfile.TemporaryDirectory(prefix="bedside-ort-ref-") as scratch:
        out = Path(scratch) / "result.json"
        command = [sys.executable, "-m", "bench.runtime_parity", "--ort-child", str(folder), str(out)]
        command += ["--threads", str(threads), "--reps", str(reps)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0 or not out.is_file():
            tail = (completed.stdout + completed.stderr).strip().splitlines()[-1:] or ["no output"]
            raise BedsideError(f"the ONNX Runtime reference loop failed: {tail[0]}")
        return json.loads(out.read_text(encoding="utf-8"))


def _bedside_run(runtime: str, path: Path, threads: int, options: dict[str, Any]) -> Any:
    """One measurement child (runtimes.measure, warm pass on) on `path`: prefill 992, decode 32 at 992..1023."""
    from runtimes.measure import MeasureJob, measure_in_child

    job = MeasureJob(context=CONTEXT, decode_tokens=DECODE, n_threads=threads, runner_options=options)
    return measure_in_child(runtime, path, job)


def _bedside(runtime: str, path: Path, threads: int, reps: int, options: dict[str, Any]) -> dict[str, Any]:
    """`reps` measurement children on `path`, one after another (see `_bedside_summary`)."""
    return _bedside_summary([_bedside_run(runtime, path, threads, options) for _ in range(reps)], options)


def _bedside_summary(runs: Sequence[Any], options: dict[str, Any]) -> dict[str, Any]:
    """Speeds of measurement runs: means of per-run rates, the seconds of each run, their memory."""
    return {
        "runner_options": options,
        "prefill_seconds": [round(r.prefill_seconds, 4) for r in runs],
        "decode_seconds": [round(r.decode_seconds, 4) for r in runs],
        "prefill_tok_s": mean_rate(PREFILL, [r.prefill_seconds for r in runs]),
        "decode_tok_s": mean_rate(DECODE, [r.decode_seconds for r in runs]),
        "first_pass_prefill_tok_s": mean_rate(
            PREFILL, [r.details["first_pass_prefill_seconds"] for r in runs]
        ),
        "first_pass_decode_tok_s": mean_rate(DECODE, [r.details["first_pass_decode_seconds"] for r in runs]),
        "peak_rss_mib": [round(r.peak_rss_bytes / 2**20, 1) for r in runs],
        "warm_pass_rss_mib": [round(r.details["warm_pass_rss_bytes"] / 2**20, 1) for r in runs],
        "details": {key: value for key, value in runs[-1].details.items() if key != "system_info"},
    }


def _run_llama_bench(binary: Path, arguments: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """Run llama-bench with `arguments` (plus -o json); the command line and its rows."""
    command = [str(binary), *arguments, "-o", "json"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        raise BedsideError(f"llama-bench failed (status {completed.returncode}): {tail[0]}")
    return " ".join(command), parse_llama_bench(completed.stdout)


def _interleaved_gguf(binary: Path, runtime: str, path: Path, threads: int, reps: int) -> dict[str, Any]:
    """`reps` rounds of: Bedside with flash attention off, Bedside with it on, llama-bench (-r 1, both settings).

    Interleaved so that a drift of the host's speed (a 2048 x 2048 matmul here ran at 147-280 GFLOPS in one
    evening) falls on both sides alike; the speeds are means over the rounds of per-run rates on each side.
    """
    off: list[Any] = []
    on: list[Any] = []
    rounds: list[dict[str, Any]] = []
    for _ in range(reps):
        off.append(_bedside_run(runtime, path, threads, {}))
        on.append(_bedside_run(runtime, path, threads, {"flash_attn": True}))
        rounds.append(_llama_bench(binary, path, threads, 1))
    by_fa: dict[int, dict[str, Any]] = {}
    for fa in (0, 1):
        by_fa[fa] = {
            key: float(np.mean([entry["by_flash_attn"][fa][key] for entry in rounds]))
            for key in ("prefill_tok_s", "decode_tok_s", "prefill_tok_s_n_batch_512")
        }
        by_fa[fa]["per_round"] = [entry["by_flash_attn"][fa] for entry in rounds]
    reference = {
        "commands": rounds[0]["commands"],
        "by_flash_attn": by_fa,
        "rows": [row for entry in rounds for row in entry["rows"]],
        "interleaved_rounds": reps,
    }
    return {
        "bedside_flash_attn_off": _bedside_summary(off, {}),
        "bedside_flash_attn_on": _bedside_summary(on, {"flash_attn": True}),
        "llama_bench": reference,
    }


def _llama_bench(binary: Path, gguf: Path, threads: int, reps: int) -> dict[str, Any]:
    """llama-bench's figures on `gguf`: the main run (-fa 0,1 at n_batch 2048) and the n_batch 512 check."""
    common = ["-m", str(gguf), "-t", str(threads), "-r", str(reps), "-fa", "0,1"]
    main_command, rows = _run_llama_bench(
        binary, [*common, "-p", str(PREFILL), "-n", str(DECODE), "-d", f"0,{PREFILL}"]
    )
    batch_command, batch_rows = _run_llama_bench(
        binary, [*common, "-p", str(PREFILL), "-n", "0", "-b", "512"]
    )
    keep = (
        "n_prompt",
        "n_gen",
        "n_depth",
        "n_batch",
        "n_ubatch",
        "flash_attn",
        "avg_ts",
        "stddev_ts",
        "samples_ts",
    )
    by_fa: dict[int, dict[str, Any]] = {}
    for fa in (0, 1):
        these = [row for row in rows if int(row["flash_attn"]) == fa]
        small = [row for row in batch_rows if int(row["flash_attn"]) == fa]
        by_fa[fa] = {
            "prefill_tok_s": float(bench_row(these, PREFILL, 0, 0)["avg_ts"]),
            "decode_tok_s": float(bench_row(these, 0, DECODE, PREFILL)["avg_ts"]),
            "prefill_tok_s_n_batch_512": float(bench_row(small, PREFILL, 0, 0)["avg_ts"]),
        }
    return {
        "commands": [main_command, batch_command],
        "by_flash_attn": by_fa,
        "rows": [{key: row.get(key) for key in keep} for row in rows + batch_rows],
    }


def _artifact(model_dir: Path, format_name: str, quant: str, threads: int) -> Path:
    """The cached export of the demo model: the GGUF file, or the ONNX folder."""
    from exporters import export

    out_dir = bench_cache_dir("runtime_parity") / f"{format_name}-{quant}"
    if not (out_dir / "export.json").is_file():
        export(
            model_dir, format_name, quant, out_dir, **({"threads": threads} if format_name == "gguf" else {})
        )
    return next(out_dir.glob("*.gguf")) if format_name == "gguf" else out_dir


def paired_round_ratio(
    bedside_seconds: Sequence[float], tokens: int, reference_rates: Sequence[float]
) -> dict[str, Any] | None:
    """Ratio of the interleaved rounds: exp(mean_i log r_i), r_i = (tokens / s_i) / reference rate of round i, with
    a 95 % bootstrap interval over the rounds (toolkit.validate.paired.bootstrap_mean); None when the sides'
    runs do not pair up (the ONNX Runtime loop runs apart). Pairing removes the host's drift between rounds, which
    the ratio of means keeps."""
    from toolkit.validate.paired import bootstrap_mean

    if len(bedside_seconds) != len(reference_rates) or len(reference_rates) < 2:
        return None
    logs = [float(np.log(tokens / seconds / rate)) for seconds, rate in zip(bedside_seconds, reference_rates, strict=True)]
    mean, low, high, _ = bootstrap_mean(logs)
    return {"ratio": float(np.exp(mean)), "low": float(np.exp(low)), "high": float(np.exp(high)), "rounds": len(logs)}


def add_paired(row: dict[str, Any], prefill: int, decode: int) -> dict[str, Any]:
    """Set the row's ratios: of the means (``*_ratio``) and of the interleaved rounds (``*_paired``, or None)."""
    bedside, reference = row["bedside"], row["reference"]
    rounds = reference.get("per_round") or []
    for kind, tokens in (("prefill", prefill), ("decode", decode)):
        row[f"{kind}_ratio"] = bedside[f"{kind}_tok_s"] / reference[f"{kind}_tok_s"]
        row[f"{kind}_paired"] = paired_round_ratio(
            bedside.get(f"{kind}_seconds") or [], tokens, [entry[f"{kind}_tok_s"] for entry in rounds]
        )
    return row


def pool_rounds(record: dict[str, Any], earlier: dict[str, Any], source: str) -> dict[str, Any]:
    """The record with each interleaved comparison that `earlier` (a run of the same file, threads and lengths)
    also measured pooled: both runs' Bedside timings and llama-bench rounds, means and paired ratio recomputed
    (the first-pass figures stay this run's). `source`: where the earlier record is kept (e.g. a git revision)."""
    same = ("threads", "context", "prefill_tokens", "decode_tokens")
    if any(record.get(key) != earlier.get(key) for key in same):
        raise BedsideError(f"cannot pool runs that differ in {', '.join(same)}: {source}")
    if record.get("pooled_with"):
        raise BedsideError("the recorded run is already pooled with another: measure again before pooling")
    earlier_rows = {(row["artifact"], row["setting"]): row for row in earlier.get("comparisons", [])}
    kept = set((record.get("earlier_run") or {}).get("artifacts", []))  # rows this run did not measure
    pooled, keys = [], []
    for row in record["comparisons"]:
        old = earlier_rows.get((row["artifact"], row["setting"]))
        if old is None or row["artifact"] in kept or not row["reference"].get("per_round") or not old["reference"].get("per_round"):
            pooled.append(row)
            continue
        bedside, reference = dict(row["bedside"]), dict(row["reference"])
        for kind, tokens in (("prefill", record["prefill_tokens"]), ("decode", record["decode_tokens"])):
            bedside[f"{kind}_seconds"] = old["bedside"][f"{kind}_seconds"] + row["bedside"][f"{kind}_seconds"]
            bedside[f"{kind}_tok_s"] = mean_rate(tokens, bedside[f"{kind}_seconds"])
        reference["per_round"] = old["reference"]["per_round"] + row["reference"]["per_round"]
        for key in ("prefill_tok_s", "decode_tok_s", "prefill_tok_s_n_batch_512"):
            reference[key] = float(np.mean([entry[key] for entry in reference["per_round"]]))
        pooled.append(
            add_paired(
                {**row, "bedside": bedside, "reference": reference}, record["prefill_tokens"], record["decode_tokens"]
            )
        )
        keys.append(row["artifact"])
    run = {name: earlier.get(name) for name in ("command", "started", "finished", "reps")}
    return {**record, "comparisons": pooled, "pooled_with": {"artifacts": sorted(set(keys)), "source": source, **run}}


def _row(artifact: str, setting: str, bedside: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """One side-by-side comparison: ratio = Bedside tok/s / reference tok/s, for prefill and decode."""
    row = add_paired({"artifact": artifact, "setting": setting, "bedside": bedside, "reference": reference}, PREFILL, DECODE)
    print(
        f"{artifact} ({setting}): prefill {bedside['prefill_tok_s']:.1f} vs {reference['prefill_tok_s']:.1f} tok/s "
        f"({row['prefill_ratio']:.2f}x), decode {bedside['decode_tok_s']:.1f} vs {reference['decode_tok_s']:.1f} "
        f"tok/s ({row['decode_ratio']:.2f}x), load {load_average()}",
        flush=True,
    )
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.llama_tools import build_tools
    from toolkit.model.source import resolve_model_dir

    record: dict[str, Any] = {
        "command": command_line(),
        "started": utc_now(),
        "threads": args.threads,
        "reps": args.reps,
        "context": CONTEXT,
        "prefill_tokens": PREFILL,
        "decode_tokens": DECODE,
        "loadavg_start": load_average(),
        "artifacts": {},
        "comparisons": [],
    }
    tools = build_tools(jobs=args.threads)
    record["llama_bench"] = str(tools.bench)
    model_dir = resolve_model_dir("demo")
    for format_name, quant in ARTIFACTS:
        if args.only and quant not in args.only:
            continue
        key = f"{format_name}/{quant}"
        path = _artifact(model_dir, format_name, quant, args.threads)
        runtime = RUNTIME_OF[format_name]
        entry: dict[str, Any] = {"runtime": runtime, "path": str(path), "loadavg_before": load_average()}
        if format_name == "gguf":
            entry.update(_interleaved_gguf(tools.bench, runtime, path, args.threads, args.reps))
            by_fa = entry["llama_bench"]["by_flash_attn"]
            for fa, setting in (
                (0, "flash attention off (Bedside's CPU default)"),
                (1, "flash attention on"),
            ):
                bedside = entry["bedside_flash_attn_on" if fa else "bedside_flash_attn_off"]
                record["comparisons"].append(_row(key, setting, bedside, by_fa[fa]))
            record["comparisons"].append(
                _row(
                    key,
                    "Bedside's default vs llama-bench's default (-fa auto: on)",
                    entry["bedside_flash_attn_off"],
                    by_fa[1],
                )
            )
        else:
            entry["bedside"] = _bedside(runtime, path, args.threads, args.reps, {})
            entry["ort_loop"] = _ort_reference_child(path, args.threads, args.reps)
            record["comparisons"].append(_row(key, "IO-binding loop", entry["bedside"], entry["ort_loop"]))
        entry["loadavg_after"] = load_average()
        record["artifacts"][key] = entry
    record["finished"] = utc_now()
    record["loadavg_end"] = load_average()
    return record


def merge_earlier(record: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """`--only` re-measures some files: keep the earlier record's other files, each marked with the run that
    measured it (`earlier_run`: which files, its command, times and reps), in ARTIFACTS order."""
    order = [f"{format_name}/{quant}" for format_name, quant in ARTIFACTS]
    kept = {key: entry for key, entry in earlier.get("artifacts", {}).items() if key not in record["artifacts"]}
    if not kept:
        return record
    run = {name: earlier.get(name) for name in ("command", "started", "finished", "reps")}
    artifacts = {**kept, **record["artifacts"]}
    comparisons = [row for row in earlier.get("comparisons", []) if row["artifact"] in kept]
    comparisons += record["comparisons"]
    rank = {key: position for position, key in enumerate(order)}
    return {
        **record,
        "artifacts": dict(sorted(artifacts.items(), key=lambda item: rank.get(item[0], len(order)))),
        "comparisons": sorted(comparisons, key=lambda row: rank.get(row["artifact"], len(order))),
        "earlier_run": {"artifacts": [key for key in order if key in kept], **run},
    }


def write_docs(record: dict[str, Any]) -> None:
    """The docs/RUNTIMES.md section: commands, the side-by-side table and the load averages."""
    rows = [
        [
            row["artifact"],
            row["setting"],
            f"{row['bedside']['prefill_tok_s']:.1f}",
            f"{row['reference']['prefill_tok_s']:.1f}",
            f"{row['prefill_ratio']:.2f}",
            _paired_cell(row.get("prefill_paired")),
            f"{row['bedside']['decode_tok_s']:.1f}",
            f"{row['reference']['decode_tok_s']:.1f}",
            f"{row['decode_ratio']:.2f}",
            _paired_cell(row.get("decode_paired")),
        ]
        for row in record["comparisons"]
    ]
    commands = [f"    {record['command']}"]
    for entry in record["artifacts"].values():
        if "llama_bench" in entry:
            commands += [f"    {short_command(command)}" for command in entry["llama_bench"]["commands"]]
    cold = [
        f"{key}: Bedside's first pass {entry[side]['first_pass_prefill_tok_s']:.1f} / "
        f"{entry[side]['first_pass_decode_tok_s']:.1f} tok/s (prefill / decode), warm pass "
        f"{entry[side]['prefill_tok_s']:.1f} / {entry[side]['decode_tok_s']:.1f}"
        for key, entry in record["artifacts"].items()
        for side in ("bedside", "bedside_flash_attn_off")
        if side in entry
    ]
    batch = [
        f"{key}: pp{record['prefill_tokens']} at n_batch 512 {fa['prefill_tok_s_n_batch_512']:.1f} vs 2048 "
        f"{fa['prefill_tok_s']:.1f} tok/s (flash attention {'on' if flag else 'off'})"
        for key, entry in record["artifacts"].items()
        if "llama_bench" in entry
        for flag, fa in ((int(flag), fa) for flag, fa in entry["llama_bench"]["by_flash_attn"].items())
    ]
    body = "\n".join(
        [
            "## Measured speeds against the runtimes' own benchmarks (issue 15, section 4)",
            "",
            f"Same file, {record['threads']} threads, {record['reps']} runs each, for GGUF in interleaved rounds (Bedside "
            "flash attention off, on, then llama-bench -r 1) so that a drift of the host's speed falls on both sides "
            "(bench/runtime_parity.py; raw: "
            "docs/benchmarks/runtime_parity.json). Bedside: `runtimes.measure` (what `bedside eval` measures), "
            f"prefill of {record['prefill_tokens']} tokens from an empty cache, decode of {record['decode_tokens']} "
            f"at positions {record['prefill_tokens']}..{record['context'] - 1}, speeds of the warm (second) pass. "
            f"llama.cpp's reference is llama-bench built from the same sdist (pp{record['prefill_tokens']} @ d0 for "
            f"prefill, tg{record['decode_tokens']} @ d{record['prefill_tokens']} for decode, n_batch 2048), ONNX "
            "Runtime's a minimal InferenceSession loop with IO binding (warm-up, then prefill in one call and "
            "decode). tok/s are means of per-run rates; ratio = Bedside / reference (of the means); paired = the "
            "geometric mean over the interleaved rounds of Bedside's rate / llama-bench's in the same round, with a "
            "95 % bootstrap interval over the rounds (the host's drift between rounds cancels; a run drifts by up to "
            "20 % here).",
            "",
            *commands,
            "",
            markdown_table(
                [
                    "artifact",
                    "setting",
                    "prefill Bedside",
                    "prefill reference",
                    "ratio",
                    "paired (95 %)",
                    "decode Bedside",
                    "decode reference",
                    "ratio",
                    "paired (95 %)",
                ],
                rows,
            ),
            "",
            "First (cold) pass against the warm pass, per artifact: " + "; ".join(cold) + ".",
            "",
            "llama-bench's batch size: " + "; ".join(batch) + ".",
            "",
            f"Measured {record['started']} to {record['finished']}; load average {record['loadavg_start']} at the "
            f"start, {record['loadavg_end']} at the end (1, 5, 15 min; this 2-core machine is shared).",
            *_earlier_line(record),
            *_pooled_line(record),
        ]
    )
    current = DOC.read_text(encoding="utf-8")
    write_text_atomic(DOC, replace_section(current, MARKER, body))


def _pooled_line(record: dict[str, Any]) -> list[str]:
    """Which rows hold the rounds of two runs (`--pool`)."""
    run = record.get("pooled_with")
    if not run:
        return []
    return [
        "",
        f"The rows of {', '.join(run['artifacts'])} pool this run's rounds with those of `{short_command(run['command'])}` "
        f"({run['started']} to {run['finished']}, {run['reps']} rounds; its record: {run['source']}): means and paired "
        "ratios over both runs' rounds, first-pass figures of this run.",
    ]


def _paired_cell(paired: dict[str, Any] | None) -> str:
    return "-" if not paired else f"{paired['ratio']:.2f} ({paired['low']:.2f}-{paired['high']:.2f})"


def _earlier_line(record: dict[str, Any]) -> list[str]:
    """Which rows an earlier run measured, when `--only` re-measured the others."""
    run = record.get("earlier_run")
    if not run:
        return []
    keys = ", ".join(run["artifacts"])
    return [
        "",
        f"The rows of {keys} are from the earlier run `{short_command(run['command'])}` ({run['started']} to "
        f"{run['finished']}, {run['reps']} runs each); the others from the command above (`--only`).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3, help="runs per file and side (default 3)")
    parser.add_argument("--only", nargs="*", help="quant names to run (default: all)")
    parser.add_argument("--no-docs", action="store_true", help="write the JSON only")
    parser.add_argument(
        "--docs-only", action="store_true", help="rewrite the docs section (and paired ratios) from the JSON"
    )
    parser.add_argument(
        "--pool",
        metavar="EARLIER.json[=SOURCE]",
        help="pool the recorded run's interleaved rounds with an earlier record's of the same files (SOURCE: where "
        "that record is kept, e.g. a git revision), rewrite the JSON and docs",
    )
    parser.add_argument("--ort-child", nargs=2, metavar=("FOLDER", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ort_child:
        folder, out = args.ort_child
        result = ort_reference(Path(folder), args.threads, args.reps, PREFILL, DECODE)
        Path(out).write_text(json.dumps(result), encoding="utf-8")
        return
    if args.docs_only or args.pool:
        record = read_json(RESULTS)
        if args.pool:
            path, _, source = args.pool.partition("=")
            try:
                record = pool_rounds(record, read_json(Path(path)), source or path)
            except BedsideError as error:
                print(f"bench.runtime_parity: {error}", file=sys.stderr)
                raise SystemExit(2) from None
        record["comparisons"] = [
            add_paired(row, record["prefill_tokens"], record["decode_tokens"]) for row in record["comparisons"]
        ]
        write_json_atomic(RESULTS, record)
        write_docs(record)
        return
    record = run(args)
    if args.only and RESULTS.is_file():
        record = merge_earlier(record, read_json(RESULTS))
    write_json_atomic(RESULTS, record)
    if not args.no_docs:
        write_docs(record)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
