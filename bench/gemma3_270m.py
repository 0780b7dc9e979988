"""Gemma 3 270M checks that are too slow for the tests: the tokenizer on a medical corpus, and the memory
estimate against measured peaks over a range of contexts.

Run from the repository root once the model is built (toolkit.model.gemma.build_gemma_model):

    .venv/bin/python -m bench.gemma3_270m tokenizer [--texts 300]
    .venv/bin/python -m bench.gemma3_270m memory ARTIFACT [ARTIFACT ...] --contexts 512,1024,2048,4096

`tokenizer`: token ids of tokenizer.json (what transformers and OnnxRunner read) against llama.cpp's own
tokenizer on the original GGUF, over the first N MedQuAD question + answer records and N PubMedQA records of
../shared/data (BOS added, as both do for this GGUF). Prints the count of texts, tokens and mismatches.

`memory`: each artifact (a GGUF file or an ONNX export folder of Gemma 3 270M or of a `bedside compress` of it,
its kept layers read from its export.json) measured as `bedside eval` measures it
(runtimes.measure.measure_in_child, MeasureJob(context=N, decode_tokens=min(32, N // 4)), the runner's
defaults), beside `bedside plan --profile host`'s estimate for the same deployment. Prints one JSON row a
measurement: peak, loaded and at-context RSS, the estimate and its error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MIB = 1024**2


def _corpus(count: int) -> list[str]:
    from toolkit.core.paths import shared_data_dir

    data = shared_data_dir()
    if data is None:
        raise SystemExit("no ../shared/data beside the checkout: the corpus check needs MedQuAD and PubMedQA")
    texts: list[str] = []
    for name in ("medquad/medquad.jsonl", "pubmedqa/dev.jsonl"):
        lines = (data / name).read_text(encoding="utf-8").split("\n")
        for line in [line for line in lines if line.strip()][:count]:
            record = json.loads(line)
            texts.append(" ".join(str(value) for value in record.values())[:3000])
    return texts


def tokenizer_check(count: int) -> dict[str, Any]:
    """tokenizer.json against llama.cpp on `count` records of each corpus (see the module docstring)."""
    from tokenizers import Tokenizer

    from toolkit.core.paths import gemma_model_dir
    from toolkit.model.gemma import TOKENIZER_CHECK_TEXTS, compare_with_llama_cpp, gemma_gguf_path

    tokenizer = Tokenizer.from_file(str(gemma_model_dir() / "tokenizer.json"))
    texts = (*TOKENIZER_CHECK_TEXTS, *_corpus(count))
    return compare_with_llama_cpp(lambda text: tokenizer.encode(text).ids, gemma_gguf_path(), texts)


def _deployment(artifact: Path) -> tuple[str, str, str, int]:
    """(runtime, format, scheme, layers removed) of an export, from its export.json (or the GGUF's name)."""
    folder = artifact if artifact.is_dir() else artifact.parent
    record_path = folder / "export.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if artifact.suffix == ".gguf" or record.get("format") == "gguf":
        quant = record.get("quant") or artifact.stem.split("-")[-1]
        return "llama.cpp", "gguf", quant, len(record.get("layers_removed") or [])
    return "onnxruntime", "onnx", record["quant"], len(record.get("layers_removed") or [])


def memory_rows(artifacts: list[Path], contexts: list[int]) -> list[dict[str, Any]]:
    """Measured peak (as `bedside eval`) and estimate (as `bedside plan --profile host`) per artifact and context."""
    from runtimes.measure import MeasureJob, measure_in_child
    from toolkit.core.paths import gemma_model_dir
    from toolkit.model.facts import read_facts
    from toolkit.plan.memory import Deployment, estimate_memory
    from toolkit.target.profiles import load_profile

    facts = read_facts(gemma_model_dir())
    profile = load_profile("host")
    rows = []
    for artifact in artifacts:
        runtime, format_name, quant, removed = _deployment(artifact)
        for context in contexts:
            result = measure_in_child(
                runtime, artifact, MeasureJob(context=context, decode_tokens=min(32, context // 4))
            )
            estimate = estimate_memory(
                facts, Deployment(format_name, quant, layers_removed=removed, context=context), profile
            ).total_bytes
            row = {
                "artifact": str(artifact),
                "runtime": runtime,
                "format": format_name,
                "quant": quant,
                "layers_removed": removed,
                "context": context,
                "baseline_rss_mib": round(result.baseline_rss_bytes / MIB, 1),
                "loaded_rss_mib": round(result.loaded_rss_bytes / MIB, 1),
                "rss_at_context_mib": round(result.rss_at_context_bytes / MIB, 1),
                "measured_peak_rss_mib": round(result.peak_rss_bytes / MIB, 1),
                "estimate_mib": round(estimate / MIB, 1),
                "error_pct": round(100 * (estimate / result.peak_rss_bytes - 1), 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tokenizer = commands.add_parser("tokenizer")
    tokenizer.add_argument("--texts", type=int, default=300, help="records of each corpus")
    memory = commands.add_parser("memory")
    memory.add_argument("artifacts", nargs="+", type=Path)
    memory.add_argument("--contexts", default="512,1024,2048,4096")
    args = parser.parse_args(argv)
    if args.command == "tokenizer":
        check = tokenizer_check(args.texts)
        print(
            json.dumps(
                {k: v for k, v in check.items() if k != "mismatches"}
                | {"mismatches": len(check["mismatches"])}
            )
        )
        for mismatch in check["mismatches"][:5]:
            print(json.dumps(mismatch, ensure_ascii=False), file=sys.stderr)
        return 1 if check["mismatches"] else 0
    memory_rows(args.artifacts, [int(c) for c in args.contexts.split(",")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
