"""What the benchmarks share: the held-apart medical text, atomic JSON checkpoints, load averages.

Data. Calibration and evaluation come from the shared development data (PubMedQA PQA-L dev items
and MedQuAD question/answer pairs). Each source is split with
`toolkit.data.split_calibration_eval` (document level, seed fixed); the evaluation text is the
*plain* PubMedQA contexts and MedQuAD answers of the evaluation side, and any evaluation text that
also occurs (normalised) as a context or answer of a calibration document is dropped, so no
evaluation token was seen by calibration, selection, healing or AWQ (`overlap_removed` counts them).

Scoring (one definition for every benchmark, `toolkit.core.metrics`):

    perplexity = exp( mean_t -log q(x_t | x_<t) )          over every predicted position of every block
    top-1 agreement = mean_t [ argmax_v q(v | x_<t) == argmax_v p(v | x_<t) ]

with p the original float model and q the model under test, on the same evaluation tokens.
Memory figures of a benchmark process come from `toolkit.core.memory_sampling` (`proc_status_bytes`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from toolkit.core.atomic import write_json_atomic, write_text_atomic
from toolkit.core.memory_sampling import proc_status_bytes
from toolkit.core.metrics import perplexity, top1_agreement
from toolkit.core.records import EVAL_FRACTION
from toolkit.data import (
    Document,
    data_sha256,
    load_dataset_spec,
    make_blocks,
    normalise_text,
    split_calibration_eval,
)

# The benchmarks' atomic writes and /proc/self/status reader are the project's.
__all__ = ["proc_status_bytes", "write_json_atomic", "write_text_atomic"]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "docs" / "benchmarks"
SOURCES: tuple[str, ...] = ("pubmedqa", "medquad")
SPLIT_SEED = 0


def bench_cache_dir(name: str) -> Path:
    """Where a benchmark caches big intermediate files (exports, healed models): outside the repo."""
    root = Path(os.environ.get("BEDSIDE_CACHE", Path.home() / ".cache" / "bedside"))
    path = root / "bench" / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_average() -> list[float]:
    """os.getloadavg() rounded: 1, 5 and 15 minute averages (other work inflates timings)."""
    return [round(value, 2) for value in os.getloadavg()]


def utc_now() -> str:
    """Current time, ISO 8601 UTC, seconds."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root."""
    if not sys.argv:
        return ".venv/bin/python"
    script = Path(sys.argv[0])
    if script.parent == REPO_ROOT / "bench":  # run as `python -m bench.NAME`
        return " ".join([".venv/bin/python", "-m", f"bench.{script.stem}", *sys.argv[1:]])
    return " ".join([".venv/bin/python", *sys.argv])


def short_command(command: str) -> str:
    """A recorded command line with every path shortened to its file name (how the docs print it)."""
    return " ".join(Path(part).name if "/" in part else part for part in command.split())


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object at `path`, or {} when there is none yet."""
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def replace_section(document: str, marker: str, body: str) -> str:
    """Replace the text between `<!-- marker:start -->` and `<!-- marker:end -->` (append if absent).

    Each benchmark owns one marked section of docs/BENCHMARKS.md, so the three scripts can rewrite
    their own table without touching the others'.
    """
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in document and end in document:
        head, rest = document.split(start, 1)
        _old, tail = rest.split(end, 1)
        return head + block + tail
    return document.rstrip() + "\n\n" + block + "\n"


def update_benchmarks_doc(marker: str, body: str) -> None:
    """Rewrite one marked section of docs/BENCHMARKS.md (atomically)."""
    path = REPO_ROOT / "docs" / "BENCHMARKS.md"
    current = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    write_text_atomic(path, replace_section(current, marker, body))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class MedicalData:
    """Calibration documents (QA, rendered with the chat template) and held-apart evaluation text."""

    calibration: list[Any]  # every source's calibration documents
    calibration_by_source: dict[str, list[Any]]
    evaluation_text: dict[str, list[Any]]  # source -> plain Documents (contexts / answers)
    record: dict[str, Any]


def _evaluation_text(source: str, document: Any) -> str | None:
    """The plain medical prose of an evaluation item: a PubMedQA context, a MedQuAD answer."""
    return document.context if source == "pubmedqa" else document.answer


def load_medical_data(sources: Sequence[str] = SOURCES) -> MedicalData:
    """Split each source into calibration / evaluation documents with no text in common."""

    calibration: list[Any] = []
    by_source: dict[str, list[Any]] = {}
    evaluation_text: dict[str, list[Any]] = {}
    record: dict[str, Any] = {"eval_fraction": EVAL_FRACTION, "split_seed": SPLIT_SEED, "sources": {}}
    for source in sources:
        documents = load_dataset_spec(source)
        calib, evaluation, split = split_calibration_eval(documents, EVAL_FRACTION, SPLIT_SEED, source=source)
        seen = {normalise_text(text) for d in calib for text in (d.context, d.answer, d.text) if text}
        texts = [_evaluation_text(source, d) for d in evaluation]
        kept = [Document(text=t, source=source) for t in texts if t and normalise_text(t) not in seen]
        calibration.extend(calib)
        by_source[source] = calib
        evaluation_text[source] = kept
        record["sources"][source] = {
            **split.to_dict(),
            "eval_text": "contexts" if source == "pubmedqa" else "answers",
            "eval_texts": len(kept),
            "overlap_removed": len([t for t in texts if t]) - len(kept),
            "eval_text_sha256": data_sha256(kept),
        }
    return MedicalData(
        calibration=calibration,
        calibration_by_source=by_source,
        evaluation_text=evaluation_text,
        record=record,
    )


def evaluation_blocks(
    data: MedicalData, tokenizer: Any, block_len: int, blocks_per_source: int, seed: int
) -> Any:
    """Evaluation token blocks: `blocks_per_source` blocks of each source's held-apart text, stacked."""
    import torch

    parts = [
        make_blocks(data.evaluation_text[source], tokenizer, block_len, blocks_per_source, seed).input_ids
        for source in data.evaluation_text
    ]
    return torch.cat(parts, dim=0)


@dataclass
class Scores:
    """Perplexity and top-1 agreement of one model on the evaluation blocks (see module docstring)."""

    perplexity: float
    top1_agreement: float | None
    mean_nll: float
    tokens: int
    argmax: Any  # (n_blocks, block_len - 1) predicted ids, to serve as the reference of others

    def to_dict(self) -> dict[str, Any]:
        out = {
            "perplexity": round(self.perplexity, 4),
            "mean_nll": round(self.mean_nll, 6),
            "tokens": self.tokens,
        }
        if self.top1_agreement is not None:
            out["top1_agreement"] = round(self.top1_agreement, 5)
        return out


def score_model(model: Any, blocks: Any, reference_argmax: Any | None = None, batch_size: int = 4) -> Scores:
    """Perplexity of `model` on `blocks` and agreement of its argmax with `reference_argmax`."""
    import torch

    total_nll = 0.0
    count = 0
    argmaxes = []
    model.eval()
    with torch.no_grad():
        for start in range(0, blocks.shape[0], batch_size):
            ids = blocks[start : start + batch_size]
            logits = model(input_ids=ids).logits[:, :-1].float()
            log_probs = torch.log_softmax(logits, dim=-1)
            targets = ids[:, 1:]
            total_nll -= float(log_probs.gather(-1, targets.unsqueeze(-1)).sum())
            count += targets.numel()
            argmaxes.append(logits.argmax(dim=-1))
    argmax = torch.cat(argmaxes, dim=0)
    agreement = None
    if reference_argmax is not None:
        agreement = top1_agreement(argmax, reference_argmax)
    mean_nll = total_nll / count
    return Scores(
        perplexity=perplexity(total_nll, count),
        top1_agreement=agreement,
        mean_nll=mean_nll,
        tokens=count,
        argmax=argmax,
    )


class Timer:
    """Wall time with the load average at start and end: `with Timer() as t: ...; t.record()`."""

    def __enter__(self) -> Timer:
        self.load_start = load_average()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.load_end = load_average()

    def record(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 2),
            "loadavg_start": self.load_start,
            "loadavg_end": self.load_end,
        }
