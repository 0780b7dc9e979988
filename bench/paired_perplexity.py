"""Issue 17: is Bedside's perplexity against llama.cpp's importance matrix a real difference? A paired comparison.

    .venv/bin/python -m bench.paired_perplexity --threads 2 [--schemes Q4_0 Q4_K_M] [--tokens 16384]

Bench 8 (bench/quant_methods.py) scores each row on 4,096 held-apart tokens; two rows' perplexities that differ by
1 % there may differ by chance. This bench takes bench 8's unpruned `imatrix`, `awq` and `awq-gptq` rows of a scheme (the same
`compress` calls and folders, so a finished row's stages are resumed, and the same GGUF export with the matrix),
scores the GGUFs and the float demo model on the same `--tokens` held-apart tokens (4x bench 8's by default) with
`evaluate(..., token_logprobs_path=...)`, and compares each Bedside method A (awq, awq-gptq) with imatrix token by
token (toolkit/validate/paired.py):

    ratio = perplexity(A) / perplexity(imatrix) = exp( mean_t [ log q_imatrix(x_t) - log q_A(x_t) ] )

with a 95 % block-bootstrap interval (blocks of 128 tokens, 10,000 resamples) and the share of resamples where A
is worse; then where the difference comes from: per bin of the float model's probability of the target token, the
mean NLL change of each artifact against the float model and the bin's part of log(ratio). Two checks of what the
decomposition suggests (a flatter distribution gains on tokens the float model found unlikely):

    entropy(model) = mean_t H(q(. | x_<t)) = mean_t -sum_v q(v | x_<t) log q(v | x_<t)     (nats, each GGUF and the
                     float model, on the first ENTROPY_TOKENS of the same text, every scored position)
    perplexity of the float model with its logits divided by T, T in TEMPERATURES (the same tokens as the rows)

`--reuse` skips compressing and scoring: it reads the last run's rows from the JSON and their per-token log-probs
from the bench cache, and computes the comparison and the checks again.

Writes docs/benchmarks/paired_perplexity.json and the section between the `paired-perplexity` markers of
docs/BENCHMARKS.md. Skips cleanly (exit 0, a message) without the shared data or the demo model.
"""

from __future__ import annotations

import argparse
import time
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
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
)

RESULTS = RESULTS_DIR / "paired_perplexity.json"
MARKER = "paired-perplexity"
BEDSIDE: tuple[str, ...] = ("awq", "awq-gptq")  # the A of each ratio
BASELINE = "imatrix"  # its B
METHODS: tuple[str, ...] = (*BEDSIDE, BASELINE)  # the rows scored
SCHEMA_VERSION = 2  # 1: one ratio per scheme (awq / imatrix)
DEFAULT_TOKENS, BLOCK, RESAMPLES = 16384, 128, 10_000
ENTROPY_TOKENS = 4096
TEMPERATURES: tuple[float, ...] = (1.0, 1.05, 1.1, 1.2)


def score_row(scheme: str, method: str, data: tuple[Path, Path, list[Any]], tokens: int, threads: int) -> dict[str, Any]:
    """Compress (or resume) bench 8's unpruned row, export it, score it and the float model on `tokens` tokens.

    `data`: bench 8's calibration file, evaluation file and evaluation documents (`quant_methods._data_paths`)."""
    from bench import quant_methods as bench8
    from exporters import export
    from toolkit.compress.pipeline import compress
    from toolkit.compress.record import CompressOptions
    from toolkit.validate.evaluate import evaluate

    root = bench_cache_dir("quant_methods")
    calib, evaluation, documents = data
    out = root / f"{scheme}-{method}"
    options = CompressOptions(
        prune_layers=0, quant_method=bench8.PIPELINE_METHOD[method], calib=str(calib), eval_data=str(evaluation),
        calib_sequences=bench8.CALIB_SEQUENCES, seq_len=bench8.CALIB_LEN, eval_sequences=1, seed=bench8.SEED,
        quant=scheme,
    )  # fmt: skip
    started = time.perf_counter()
    result = compress("demo", out, options, progress=False)
    exported = export(result.checkpoint, "gguf", scheme, out / "gguf", imatrix=result.imatrix, threads=threads)
    saved = out / f"token_logprobs-{tokens}.npz"
    scores = evaluate(
        exported.model_file, documents=documents, reference="demo", context=bench8.EVAL_SEQ_LEN,
        seq_len=bench8.EVAL_SEQ_LEN, max_tokens=tokens, n_threads=threads, progress=False,
        token_logprobs_path=saved,
    )  # fmt: skip
    with np.load(saved) as arrays:
        logprobs = {name: arrays[name] for name in ("artifact", "reference", "window_lengths")}
    return {
        "scheme": scheme,
        "method": method,
        "kl": scores["kl_divergence"],
        "perplexity": scores["perplexity"],
        "top1_agreement": scores["top1_agreement"],
        "tokens": scores["tokens"],
        "seconds": round(time.perf_counter() - started, 1),
        "logprobs": logprobs,
    }


def _score_windows(runner: Any, documents: list[Any], tokens: int) -> list[list[int]]:
    """The scoring windows `evaluate` gives `runner` on the first `tokens` held-apart tokens (the same ids)."""
    from bench import quant_methods as bench8
    from runtimes.measure import MeasureJob, _text_windows
    from toolkit.validate.evaluate import scoring_texts

    job = MeasureJob(
        context=bench8.EVAL_SEQ_LEN, decode_tokens=1, score_texts=scoring_texts(documents, tokens),
        score_seq_len=bench8.EVAL_SEQ_LEN, score_max_tokens=tokens,
    )  # fmt: skip
    return _text_windows(runner, job)


def predictive_entropy(artifact: str | Path, documents: list[Any], tokens: int, threads: int) -> float:
    """mean_t H(q(. | x_<t)) in nats over every scored position of the first `tokens` held-apart tokens."""
    from runtimes.registry import load_runner

    runner = load_runner(artifact, n_ctx=512, n_threads=threads)
    total, count = 0.0, 0
    for window in _score_windows(runner, documents, tokens):
        for rows in runner.iter_logprobs(window):
            logprobs = np.asarray(rows, dtype=np.float64)
            total += float(-(np.exp(logprobs) * logprobs).sum())
            count += len(logprobs)
    return total / max(count, 1)


def float_temperature_perplexity(documents: list[Any], tokens: int, threads: int) -> dict[str, float]:
    """Perplexity of the float demo model with its logits divided by T (T in TEMPERATURES) on the rows' tokens."""
    import torch

    from runtimes.registry import load_runner
    from toolkit.core.paths import demo_model_dir

    torch.set_num_threads(threads)
    runner = load_runner(demo_model_dir(), n_ctx=512, n_threads=threads)
    nll = dict.fromkeys(TEMPERATURES, 0.0)
    count = 0
    with torch.no_grad():
        for window in _score_windows(runner, documents, tokens):
            ids = torch.tensor([window])
            logits = runner.model(input_ids=ids).logits[0, :-1].float()
            targets = ids[0, 1:]
            for temperature in TEMPERATURES:
                logprobs = torch.log_softmax(logits / temperature, dim=-1)
                nll[temperature] += float(-logprobs[torch.arange(len(targets)), targets].sum())
            count += len(targets)
    return {f"{temperature:g}": float(np.exp(value / count)) for temperature, value in nll.items()}


def bench8_positions(window_lengths: Any) -> int:
    """Scored positions within bench 8's token budget: the windows of its first EVAL_MAX_TOKENS tokens (the text is
    cut, then windowed from its start, so those windows open both runs), each predicting all but its last."""
    from bench.quant_methods import EVAL_MAX_TOKENS

    positions, seen = 0, 0
    for length in (int(value) for value in window_lengths):
        if seen + length > EVAL_MAX_TOKENS:
            break
        positions, seen = positions + length - 1, seen + length
    return positions


def compare(rows: dict[str, dict[str, Any]], method: str) -> dict[str, Any]:
    """The paired ratio method / imatrix and its decomposition by the float model's probability of the token."""
    from toolkit.validate.paired import nll_change_by_reference_probability, paired_perplexity_ratio

    a, b = rows[method]["logprobs"], rows[BASELINE]["logprobs"]
    reference = a["reference"]
    if not np.allclose(reference, b["reference"], atol=1e-4):
        raise SystemExit("bench.paired_perplexity: the float model scored the two rows' tokens differently")
    ratio = paired_perplexity_ratio(a["artifact"], b["artifact"], block=BLOCK, resamples=RESAMPLES)
    first = bench8_positions(a["window_lengths"])
    bench8 = paired_perplexity_ratio(a["artifact"][:first], b["artifact"][:first], block=BLOCK, resamples=RESAMPLES)
    return {
        "ratio": ratio.to_dict(),
        "ratio_on_bench8_tokens": bench8.to_dict(),
        "float_perplexity": float(np.exp(-reference.mean())),
        "by_reference_probability": nll_change_by_reference_probability(reference, a["artifact"], b["artifact"]),
    }


def _ratio_lines(method: str, paired: dict[str, Any]) -> list[str]:
    """One Bedside method against imatrix: the ratio on all tokens and on bench 8's, then the decomposition."""
    ratio, short = paired["ratio"], paired["ratio_on_bench8_tokens"]
    return [
        f"{method} / imatrix: ratio **{ratio['ratio']:.4f}** (95 % interval {ratio['low']:.4f}-{ratio['high']:.4f}; "
        f"{method} worse in {100 * ratio['share_a_worse']:.1f} % of resamples); on bench 8's first "
        f"{short['tokens']:,} positions alone {short['ratio']:.4f} ({short['low']:.4f}-{short['high']:.4f}).",
        "",
        markdown_table(
            ["float p(token)", "tokens", f"{method} NLL change (nats)", "imatrix NLL change (nats)",
             "part of log(ratio)"],
            [
                [
                    f"{row['p_low']:.2f}-{row['p_high']:.2f}",
                    f"{row['tokens']:,}",
                    "n/a" if row["a_nll_change"] is None else f"{row['a_nll_change']:+.4f}",
                    "n/a" if row["b_nll_change"] is None else f"{row['b_nll_change']:+.4f}",
                    f"{row['log_ratio_part']:+.5f}",
                ]
                for row in paired["by_reference_probability"]
            ],
        ),  # fmt: skip
        "",
    ]


def report(record: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: per scheme the rows, then per Bedside method its paired ratio and decomposition."""
    lines = [
        f"Command: `{record['command']}` (raw: `docs/benchmarks/paired_perplexity.json`). Bench 8's unpruned "
        f"`imatrix`, `awq` and `awq-gptq` rows, scored with the float demo model on the first {record['tokens']:,} "
        "held-apart tokens (bench 8: 4,096); ratio = perplexity(A) / perplexity(imatrix) over the same tokens, 95 % "
        f"block-bootstrap interval ({BLOCK}-token blocks, {RESAMPLES:,} resamples; toolkit/validate/paired.py).",
        "",
    ]
    for scheme, entry in record["schemes"].items():
        rows = entry["rows"]
        first = next(iter(entry["paired"].values()))
        lines += [
            f"**{scheme}** (float perplexity {first['float_perplexity']:.2f}): "
            + "; ".join(
                f"{method} KL {rows[method]['kl']:.4f}, perplexity {rows[method]['perplexity']:.2f}, "
                f"top-1 {rows[method]['top1_agreement']:.3f}"
                for method in rows
            )
            + ".",
            "",
        ]
        for method, paired in entry["paired"].items():
            lines += _ratio_lines(method, paired)
    checks = record.get("checks")
    if checks:
        temperatures = ", ".join(f"T {t}: {value:.2f}" for t, value in checks["float_temperature_perplexity"].items())
        entropies = "; ".join(
            f"{scheme}: " + ", ".join(f"{name} {value:.3f}" for name, value in values.items())
            for scheme, values in checks["entropy"].items()
        )
        lines += [
            f"Predictive entropy (nats, first {checks['entropy_tokens']:,} tokens, every scored position): {entropies}. "
            f"The float model's perplexity on the rows' tokens with its logits divided by T: {temperatures}.",
            "",
        ]
    rows_from = record.get("rows_from")
    if rows_from:
        lines.append(
            f"Rows scored by `{rows_from['command']}` ({rows_from['started']} to {rows_from['finished']}); the "
            "comparison and the checks computed again from their saved log-probs (`--reuse`)."
        )
    lines.append(f"Measured {record['started']} to {record['finished']}; load average {record['loadavg']}.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    from bench.quant_methods import _data_paths

    root = bench_cache_dir("quant_methods")
    data = _data_paths(root / "data")  # once: loading the shared data sets and writing the pipeline files
    earlier = read_json(RESULTS) if args.reuse and RESULTS.is_file() else {}
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": "paired_perplexity",
        "command": command_line(),
        "tokens": args.tokens,
        "started": utc_now(),
        "loadavg": [load_average()],
        "schemes": {},
    }
    for scheme in args.schemes:
        if args.reuse:
            old = earlier.get("schemes", {}).get(scheme)
            if old is None or earlier.get("tokens") != args.tokens or earlier.get("schema_version") != SCHEMA_VERSION:
                raise SystemExit(f"bench.paired_perplexity: no earlier {scheme} rows at {args.tokens} tokens to reuse")
            rows = {method: dict(old["rows"][method]) for method in METHODS}
            for method in METHODS:
                with np.load(root / f"{scheme}-{method}" / f"token_logprobs-{args.tokens}.npz") as arrays:
                    rows[method]["logprobs"] = {
                        name: arrays[name] for name in ("artifact", "reference", "window_lengths")
                    }
            record["rows_from"] = earlier.get("rows_from") or {
                key: earlier.get(key) for key in ("command", "started", "finished")
            }
        else:
            rows = {method: score_row(scheme, method, data, args.tokens, args.threads) for method in METHODS}
        paired = {method: compare(rows, method) for method in BEDSIDE}
        record["schemes"][scheme] = {
            "rows": {method: {k: v for k, v in row.items() if k != "logprobs"} for method, row in rows.items()},
            "paired": paired,
        }
        for method, entry in paired.items():
            print(f"{scheme}: {method} / imatrix perplexity {entry['ratio']['ratio']:.4f} "
                  f"({entry['ratio']['low']:.4f}-{entry['ratio']['high']:.4f})")  # fmt: skip
    from toolkit.core.paths import demo_model_dir

    entropy: dict[str, dict[str, float]] = {}
    float_entropy = predictive_entropy(demo_model_dir(), data[2], ENTROPY_TOKENS, args.threads)
    for scheme in args.schemes:
        entropy[scheme] = {"float": float_entropy}
        for method in METHODS:
            gguf = next((root / f"{scheme}-{method}" / "gguf").glob("*.gguf"))
            entropy[scheme][method] = predictive_entropy(gguf, data[2], ENTROPY_TOKENS, args.threads)
    record["checks"] = {
        "entropy_tokens": ENTROPY_TOKENS,
        "entropy": entropy,
        "float_temperature_perplexity": float_temperature_perplexity(data[2], args.tokens, args.threads),
    }
    record["loadavg"].append(load_average())
    record["finished"] = utc_now()
    write_json_atomic(RESULTS, record)
    update_benchmarks_doc(MARKER, report(record))
    return record


def main() -> None:
    from bench.quant_methods import SCHEMES, available

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="held-apart tokens scored")
    parser.add_argument(
        "--reuse", action="store_true", help="the last run's rows and token log-probs; only the analysis again"
    )
    args = parser.parse_args()
    reason = available()
    if reason is not None:
        print(f"bench.paired_perplexity: skipped ({reason})")
        return
    run(args)
    print(f"wrote {Path(RESULTS)}")


if __name__ == "__main__":
    main()
