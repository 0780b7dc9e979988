"""Issue 17: is AWQ's perplexity against llama.cpp's importance matrix a real difference? A paired comparison.

    .venv/bin/python -m bench.paired_perplexity --threads 2 [--schemes Q4_0 Q4_K_M] [--tokens 16384]

Bench 8 (bench/quant_methods.py) scores each row on 4,096 held-apart tokens; two rows' perplexities that differ by
1 % there may differ by chance. This bench takes bench 8's unpruned `imatrix` and `awq` rows of a scheme (the same
`compress` calls and folders, so a finished row's stages are resumed, and the same GGUF export with the matrix),
scores both GGUFs and the float demo model on the same `--tokens` held-apart tokens (4x bench 8's by default) with
`evaluate(..., token_logprobs_path=...)`, and compares them token by token (toolkit/validate/paired.py):

    ratio = perplexity(awq) / perplexity(imatrix) = exp( mean_t [ log q_imatrix(x_t) - log q_awq(x_t) ] )

with a 95 % block-bootstrap interval (blocks of 128 tokens, 10,000 resamples) and the share of resamples where awq
is worse; then where the difference comes from: per bin of the float model's probability of the target token, the
mean NLL change of each artifact against the float model and the bin's part of log(ratio).

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
    update_benchmarks_doc,
    utc_now,
    write_json_atomic,
)

RESULTS = RESULTS_DIR / "paired_perplexity.json"
MARKER = "paired-perplexity"
METHODS: tuple[str, str] = ("awq", "imatrix")  # A, B of the ratio
DEFAULT_TOKENS, BLOCK, RESAMPLES = 16384, 128, 10_000


def score_row(scheme: str, method: str, tokens: int, threads: int) -> dict[str, Any]:
    """Compress (or resume) bench 8's unpruned row, export it, score it and the float model on `tokens` tokens."""
    from bench import quant_methods as bench8
    from exporters import export
    from toolkit.compress.pipeline import compress
    from toolkit.compress.record import CompressOptions
    from toolkit.validate.evaluate import evaluate

    root = bench_cache_dir("quant_methods")
    calib, evaluation, documents = bench8._data_paths(root / "data")
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
        logprobs = {name: arrays[name] for name in ("artifact", "reference")}
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


def compare(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The paired ratio awq / imatrix and its decomposition by the float model's probability of the token."""
    from toolkit.validate.paired import nll_change_by_reference_probability, paired_perplexity_ratio

    a, b = (rows[method]["logprobs"] for method in METHODS)
    reference = a["reference"]
    if not np.allclose(reference, b["reference"], atol=1e-4):
        raise SystemExit("bench.paired_perplexity: the float model scored the two rows' tokens differently")
    ratio = paired_perplexity_ratio(a["artifact"], b["artifact"], block=BLOCK, resamples=RESAMPLES)
    return {
        "ratio": ratio.to_dict(),
        "float_perplexity": float(np.exp(-reference.mean())),
        "by_reference_probability": nll_change_by_reference_probability(reference, a["artifact"], b["artifact"]),
    }


def report(record: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: per scheme the two rows, the paired ratio, and the decomposition table."""
    lines = [
        f"Command: `{record['command']}` (raw: `docs/benchmarks/paired_perplexity.json`). Bench 8's unpruned "
        f"`imatrix` and `awq` rows, scored with the float demo model on the first {record['tokens']:,} held-apart "
        "tokens (bench 8: 4,096); ratio = perplexity(awq) / perplexity(imatrix) over the same tokens, 95 % "
        f"block-bootstrap interval ({BLOCK}-token blocks, {RESAMPLES:,} resamples; toolkit/validate/paired.py).",
        "",
    ]
    for scheme, entry in record["schemes"].items():
        rows, paired = entry["rows"], entry["paired"]
        ratio = paired["ratio"]
        lines += [
            f"**{scheme}** (float perplexity {paired['float_perplexity']:.2f}): "
            + "; ".join(
                f"{method} KL {rows[method]['kl']:.4f}, perplexity {rows[method]['perplexity']:.2f}, "
                f"top-1 {rows[method]['top1_agreement']:.3f}"
                for method in METHODS
            )
            + f". Ratio **{ratio['ratio']:.4f}** (95 % interval {ratio['low']:.4f}-{ratio['high']:.4f}; awq worse "
            f"in {100 * ratio['share_a_worse']:.1f} % of resamples).",
            "",
            markdown_table(
                ["float p(token)", "tokens", "awq NLL change (nats)", "imatrix NLL change (nats)",
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
    lines.append(f"Measured {record['started']} to {record['finished']}; load average {record['loadavg']}.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "schema_version": 1,
        "kind": "paired_perplexity",
        "command": command_line(),
        "tokens": args.tokens,
        "started": utc_now(),
        "loadavg": [load_average()],
        "schemes": {},
    }
    for scheme in args.schemes:
        rows = {method: score_row(scheme, method, args.tokens, args.threads) for method in METHODS}
        paired = compare(rows)
        record["schemes"][scheme] = {
            "rows": {method: {k: v for k, v in row.items() if k != "logprobs"} for method, row in rows.items()},
            "paired": paired,
        }
        print(f"{scheme}: awq / imatrix perplexity {paired['ratio']['ratio']:.4f} "
              f"({paired['ratio']['low']:.4f}-{paired['ratio']['high']:.4f})")  # fmt: skip
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
    args = parser.parse_args()
    reason = available()
    if reason is not None:
        print(f"bench.paired_perplexity: skipped ({reason})")
        return
    run(args)
    print(f"wrote {Path(RESULTS)}")


if __name__ == "__main__":
    main()
