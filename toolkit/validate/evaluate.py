"""Evaluate an artifact (checkpoint, GGUF, ONNX export) on its own runtime: quality, memory and speed.

`evaluate(artifact, data, reference=...)` answers what `bedside eval --json` prints. The artifact runs in a
child process (`runtimes.measure.measure_in_child`), which first loads it and fills a KV cache of
`context` tokens (peak resident memory and prefill/decode speed of a deployment), then scores the
evaluation text and the multiple-choice items. The reference, when given, runs the same texts in its own
child. Both children tokenize with their artifact's own tokenizer; the ids must be equal (otherwise the
comparison would be meaningless and is refused).

Scoring: the documents (question/answer documents as chat exchanges rendered by the artifact's chat
template, others as plain text) are joined by a blank line, tokenized, cut to `max_tokens` and scored in
consecutive windows of `seq_len` tokens, each from an empty KV cache and opened by the tokenizer's BOS when it
adds one (Gemma's `<bos>`; `toolkit.core.windows`, counted in `seq_len`). Over the N predicted positions i
(every position of a window but its last) with target token y_i:

    perplexity      = exp( -(1/N) sum_i log p_art(y_i | window prefix) )
    kl_divergence   = (1/N) sum_i sum_v p_ref(v | i) (log p_ref(v | i) - log p_art(v | i))     (nats)
    top1_agreement  = (1/N) sum_i [argmax_v p_ref(v | i) == argmax_v p_art(v | i)]

(perplexity and top-1 agreement as defined once in `toolkit.core.metrics`.)

The full-vocabulary log-probabilities for KL are written by each child to a .npy file [positions, vocab]
(float32, or float16 when a file would exceed FLOAT32_LIMIT_BYTES) and compared here chunk by chunk, so
memory stays at a chunk of rows, not the whole evaluation.

Accuracy: for documents with options and an answer (PubMedQA yes/no/maybe, lettered multiple choice), the
user turn `Document.prompt()` is rendered with the chat template and generation prompt; each option, written
as the assistant would answer it (`Document.response()`), is scored as log p(option tokens | prompt) summed
over its tokens; the prediction is the argmax. accuracy = {"overall": correct / n, "n": n}; None when no
document has options.

Image questions (a LLaVA on SLAKE / VQA-RAD-style data) are scored with their image at the prompt's
marker (`image_items`): closed ones by option log-likelihood as above, open ones by a greedy answer
compared after normalisation (`toolkit.data.vqa`); accuracy gains {"closed": {value, n}, "open":
{value, recall, n}} (each with "reference" when a reference is given), and `perplexity` is over the
reference answers' tokens: exp(-(1/N) sum log p(answer token | prompt, image, earlier answer tokens)).
KL divergence and top-1 agreement are then taken over those N answer positions (same formulas).

`artifact_sha256`: sha256 of the file; for a folder, sha256 over the sorted lines "relative path\\0file sha256\\n".
"""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from runtimes.gguf_header import read_gguf_header
from runtimes.measure import MeasureJob, measure_in_child
from runtimes.registry import FORMAT_LABELS, RUNNERS, artifact_format
from runtimes.results import MeasureResult, RuntimeLoadError
from toolkit.core.atomic import write_bytes_atomic
from toolkit.core.checkpoint_policy import refuse_custom_code
from toolkit.core.errors import BedsideError
from toolkit.core.formats import FORMAT_RUNTIME
from toolkit.core.gguf_header import truncated_data
from toolkit.core.hashing import checkpoint_sha256, file_sha256
from toolkit.core.metrics import perplexity_from_logprobs, top1_matches
from toolkit.core.records import COMPRESSION_RECORD
from toolkit.data import DEFAULT_SOURCE, Document, data_sha256, load_dataset_spec
from toolkit.data.vqa import closed_answer_sets, closed_options, exact_match, is_closed, token_recall
from toolkit.model.checkpoint import loadable_checkpoint
from toolkit.model.source import DEMO_NAME, resolve_model_dir

SCHEMA_VERSION = 1
FLOAT32_LIMIT_BYTES = 256 * 1024**2  # above this, full log-prob files are written as float16
CHARS_PER_TOKEN_BOUND = 12  # documents beyond max_tokens x this many characters are never tokenized
KL_CHUNK_ROWS = 256
MIN_CONTEXT = 16

# The keys of the `bedside eval --json` object (and of `evaluate`'s result), in print order.
RESULT_KEYS = (
    "artifact",
    "runtime",
    "device",
    "artifact_sha256",
    "reference",
    "data",
    "perplexity",
    "kl_divergence",
    "top1_agreement",
    "accuracy",
    "tokens",
    "seq_len",
    "context",
    "peak_rss_bytes",
    "scoring_peak_rss_bytes",
    "peak_vram_bytes",
    "prefill_tokens_per_s",
    "decode_tokens_per_s",
    "load_seconds",
    "runner_options",
    "schema_version",
)


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A resolved artifact: the path its runtime loads, its format ("gguf", "onnx", "hf") and runtime."""

    path: Path
    format: str
    runtime: str


# ----------------------------------------------------------------------------------------------
# Resolving and checking artifacts (cheap checks here, so bad input fails before a child starts)


def _check_gguf(path: Path) -> None:
    """Refuse a GGUF file whose header is cut off or whose tensor data is shorter than the header says."""

    file = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
    header = read_gguf_header(file)  # RuntimeLoadError for a non-GGUF or truncated header
    truncated = truncated_data(file, header)
    if truncated is not None:
        raise BedsideError(f"{truncated}; export it again")


def _check_tokenizer(folder: Path, label: str) -> None:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json")
    if not any((folder / name).is_file() for name in names):
        raise BedsideError(
            f"{folder}: no tokenizer in this {label} (expected tokenizer.json or tokenizer.model); "
            "copy the checkpoint's tokenizer files into it or export again"
        )


def resolve_artifact(artifact: str | Path, runtime: str | None = None) -> Artifact:
    """Map "demo", a checkpoint, a `bedside compress` folder, a .gguf/.onnx file or an export folder to an Artifact.

    The runtime is the one the format calls for unless `runtime` names another registered one that reads
    the format; a mismatch (e.g. onnxruntime for a .gguf) is a BedsideError naming the right runtime.
    """
    if str(artifact) == DEMO_NAME:
        path = resolve_model_dir(DEMO_NAME)
    else:
        path = Path(artifact).expanduser()
        if not path.exists():
            raise BedsideError(
                f"artifact '{artifact}' not found: pass 'demo', a checkpoint folder, a .gguf file or an export folder"
            )
        if path.is_dir() and (path / COMPRESSION_RECORD).is_file() and (path / "checkpoint").is_dir():
            path = path / "checkpoint"
    try:
        found = artifact_format(path)
    except RuntimeLoadError as error:
        raise BedsideError(str(error)) from error
    expected = FORMAT_RUNTIME[found]
    if runtime is not None:
        if runtime not in RUNNERS:
            raise BedsideError(f"unknown runtime '{runtime}': choose one of {', '.join(sorted(RUNNERS))}")
        if runtime != expected:
            raise BedsideError(
                f"{path}: {FORMAT_LABELS[found]} cannot run on {runtime}; use --runtime {expected} (or leave it out)"
            )
    try:
        if found == "gguf":
            _check_gguf(path)
        elif found == "onnx":
            folder = path if path.is_dir() else path.parent
            refuse_custom_code(folder)  # its tokenizer may load through transformers
            _check_tokenizer(folder, "ONNX export")
        else:
            refuse_custom_code(path)
            _check_tokenizer(path, "checkpoint folder")
            loadable_checkpoint(path)  # the config describes these weights (no random tensors)
    except RuntimeLoadError as error:
        raise BedsideError(str(error)) from error
    return Artifact(path=path, format=found, runtime=runtime or expected)


def artifact_sha256(path: str | Path) -> str:
    """sha256 of a file; of a folder, exporters.base.checkpoint_sha256 (sorted "relative path NUL file sha256 LF")."""
    path = Path(path)
    return file_sha256(path) if path.is_file() else checkpoint_sha256(path)


# ----------------------------------------------------------------------------------------------
# What the children score


def scoring_texts(documents: Sequence[Document], max_tokens: int) -> list[str | list[dict[str, str]]]:
    """Texts for perplexity: chat messages for question/answer documents, plain text for the rest.

    Stops adding documents once they surely hold more than `max_tokens` tokens (a character bound), so a
    large corpus is never tokenized whole.
    """
    texts: list[str | list[dict[str, str]]] = []
    characters = 0
    for document in documents:
        if document.image is not None:  # scored with its image (image_items), never as text
            continue
        texts.append(document.messages() if document.is_question_answer else document.text)
        characters += len(document.text)
        if characters > max_tokens * CHARS_PER_TOKEN_BOUND:
            break
    return texts


def option_items(documents: Sequence[Document], max_items: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Multiple-choice items (chat prompt + options written as answers) and the index of each right answer."""
    items: list[dict[str, Any]] = []
    answers: list[int] = []
    for document in documents:
        if len(items) >= max_items:
            break
        if not document.options or document.question is None or document.answer_index is None:
            continue
        if document.image is not None:  # image questions need the vision tower: not scored as text
            continue
        responses = [dataclasses.replace(document, answer=option).response() for option in document.options]
        items.append({"messages": [{"role": "user", "content": document.prompt()}], "options": responses})
        answers.append(int(document.answer_index))
    return items, answers


def image_items(
    documents: Sequence[Document], max_items: int, max_new_tokens: int = 16
) -> tuple[list[dict[str, Any]], list[Document]]:
    """Image questions as measurement items: chat prompt with the image marker, image, answer, options.

    CLOSED questions carry the options `toolkit.data.vqa.closed_options` gives, with the answers the
    same question takes elsewhere in this file as the last fallback (an evaluation file has no
    training split); OPEN questions carry none and are answered by greedy generation.
    """
    chosen = [d for d in documents if d.image is not None and d.is_question_answer][:max_items]
    answer_sets = closed_answer_sets(documents)
    items = []
    for document in chosen:
        options = list(closed_options(document, answer_sets)) if is_closed(document) else None
        items.append({
            "messages": [{"role": "user", "content": document.prompt()}],
            "image": str(document.image),
            "answer": document.response(),
            "options": options,
            "max_new_tokens": max_new_tokens,
        })
    return items, chosen


def image_accuracy(results: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """{"closed": {value, n}, "open": {value, recall, n}} of image questions (toolkit.data.vqa's rules).

    closed: share whose highest-scoring option equals the answer (after normalisation); open: share of
    greedy answers equal to the reference after normalisation (`value`), and mean token recall.
    """
    closed = [
        exact_match(item["options"][int(np.argmax(result["options"]))], item["answer"])
        for result, item in zip(results, items, strict=True)
        if item["options"]
    ]
    open_pairs = [
        (result["generated"] or "", item["answer"])
        for result, item in zip(results, items, strict=True)
        if not item["options"]
    ]
    return {
        "closed": {"value": sum(closed) / len(closed), "n": len(closed)} if closed else None,
        "open": {
            "value": sum(exact_match(p, r) for p, r in open_pairs) / len(open_pairs),
            "recall": sum(token_recall(p, r) for p, r in open_pairs) / len(open_pairs),
            "n": len(open_pairs),
        }
        if open_pairs
        else None,
    }


def answer_perplexity(results: Sequence[dict[str, Any]]) -> float | None:
    """exp(mean negative log-probability of the reference answers' tokens after prompt and image)."""
    values = [value for result in results for value in result["answer_logprobs"]]
    return perplexity_from_logprobs(values) if values else None


def accuracy_from_option_logprobs(
    option_logprobs: Sequence[Sequence[float] | None], answers: Sequence[int]
) -> dict[str, Any] | None:
    """{"overall": fraction of items whose highest-scoring option is the answer, "n": items scored}."""
    scored = [
        (int(np.argmax(scores)), answer)
        for scores, answer in zip(option_logprobs, answers, strict=True)
        if scores is not None
    ]
    if not scored:
        return None
    correct = sum(1 for predicted, answer in scored if predicted == answer)
    return {"overall": correct / len(scored), "n": len(scored)}


def predicted_positions(window_lengths: Sequence[int]) -> np.ndarray:
    """Row indices (into the windows' concatenated rows) that predict a next token: all but each window's last."""
    rows: list[np.ndarray] = []
    start = 0
    for length in window_lengths:
        rows.append(np.arange(start, start + length - 1))
        start += length
    return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)


def compare_logprobs(
    reference_path: str | Path, artifact_path: str | Path, rows: np.ndarray
) -> tuple[float, float]:
    """Mean KL(ref || art) in nats and top-1 agreement over `rows` of two [positions, vocab] log-prob files.

    Files are memory-mapped and compared KL_CHUNK_ROWS rows at a time. When the widths differ (a padded
    vocabulary), the common leading columns are compared.
    """
    reference = np.load(reference_path, mmap_mode="r")
    artifact = np.load(artifact_path, mmap_mode="r")
    if reference.shape[0] != artifact.shape[0]:
        raise BedsideError(
            f"reference and artifact scored different numbers of positions ({reference.shape[0]} vs "
            f"{artifact.shape[0]}): they must use the same tokenizer"
        )
    width = min(reference.shape[1], artifact.shape[1])
    kl_total, agree, count = 0.0, 0, 0
    for start in range(0, len(rows), KL_CHUNK_ROWS):
        index = rows[start : start + KL_CHUNK_ROWS]
        log_ref = np.asarray(reference[index, :width], dtype=np.float64)
        log_art = np.asarray(artifact[index, :width], dtype=np.float64)
        kl_total += float((np.exp(log_ref) * (log_ref - log_art)).sum())
        agree += top1_matches(log_art.argmax(axis=1), log_ref.argmax(axis=1))
        count += len(index)
    if count == 0:
        return float("nan"), float("nan")
    return kl_total / count, agree / count


# ----------------------------------------------------------------------------------------------
# Orchestration


@contextmanager
def _stages(enabled: bool, total: int) -> Iterator[Any]:
    """A rich progress display on stderr (stdout stays clean for --json); a no-op stand-in when disabled."""
    if not enabled:

        class _Quiet:
            def stage(self, text: str) -> None:
                pass

        yield _Quiet()
        return

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task("evaluating", total=total)
        started = [False]

        class _Shown:
            def stage(self, text: str) -> None:
                if started[0]:
                    progress.advance(task)
                started[0] = True
                progress.update(task, description=text)

        yield _Shown()
        progress.update(task, completed=total)


def _run_child(artifact: Artifact, job: Any) -> MeasureResult:
    try:
        return measure_in_child(artifact.runtime, artifact.path, job)
    except RuntimeLoadError as error:
        raise BedsideError(str(error)) from error


def _first_difference(left: Sequence[int], right: Sequence[int]) -> int:
    for position, (a, b) in enumerate(zip(left, right, strict=False)):
        if a != b:
            return position
    return min(len(left), len(right))


def _finite_or_none(value: float | None) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def evaluate(
    artifact: str | Path,
    data: str | Path | None = None,
    *,
    runtime: str | None = None,
    reference: str | Path | None = None,
    context: int = 2048,
    max_tokens: int = 4096,
    seq_len: int = 512,
    n_threads: int | None = None,
    max_items: int = 200,
    documents: list[Document] | None = None,
    progress: bool = True,
    runner_options: dict[str, Any] | None = None,
    token_logprobs_path: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate `artifact` on `data` (or the given eval `documents`); returns the `eval --json` object.

    Args:
        artifact: "demo", a checkpoint folder, a `bedside compress` output folder, a .gguf/.onnx file or an
            export folder.
        data: a data spec for `load_dataset_spec` (file or named source); default the radiology corpus.
        runtime: force a runtime (must read the artifact's format).
        reference: a model to compare against (KL divergence, top-1 agreement); same kinds as `artifact`.
        context: KV-cache size of the memory/speed measurement (and the artifact's n_ctx).
        max_tokens: tokens of evaluation text scored at most.
        seq_len: scoring window (clamped to `context`).
        n_threads: runtime threads (None: the runtime's default).
        max_items: multiple-choice items scored at most.
        documents: already-split evaluation documents (used instead of `data`).
        progress: show a progress display on stderr.
        runner_options: keyword arguments of the artifact's Runner, so it is measured and scored as deployed
            (llama.cpp: kv_cache_dtype, flash_attn, kv_offload, gpu_layers; runtimes.llamacpp_runner.runner_options).
            The reference runs with its runtime's defaults.
        token_logprobs_path: also write the scored text's per-token log-probabilities here (.npz: `artifact`,
            `reference` when a reference is given, `window_lengths`), for paired comparisons of two artifacts on
            the same tokens (`toolkit.validate.paired`). Written to a temporary name, then renamed.
    """

    if context < MIN_CONTEXT:
        raise BedsideError(f"--context {context} is too small: use at least {MIN_CONTEXT} tokens")
    if max_tokens < 2:
        raise BedsideError(f"--max-tokens {max_tokens} is too small: at least 2 tokens are needed to score")
    if seq_len < 2:
        raise BedsideError(f"seq_len {seq_len} is too small: use at least 2")
    window = min(seq_len, context)
    target = resolve_artifact(artifact, runtime)
    baseline = resolve_artifact(reference) if reference is not None else None

    if documents is None:
        source = str(data) if data is not None else DEFAULT_SOURCE
        documents = load_dataset_spec(source)
    else:
        source = str(data) if data is not None else "documents"
    if not documents:
        raise BedsideError(
            f"data '{source}' has no documents: pass a file with text or question/answer records"
        )
    texts = scoring_texts(documents, max_tokens)
    items, answers = option_items(documents, max_items)
    pictures, _ = image_items(documents, max_items)

    with tempfile.TemporaryDirectory(prefix="bedside-eval-") as folder, _stages(progress, 3) as stages:
        full_dtype = "float32"
        if baseline is not None and max_tokens * 65536 * 4 > FLOAT32_LIMIT_BYTES:
            full_dtype = "float16"  # decided before the vocabulary is known: 65,536 bounds most vocabularies
        stages.stage(f"{target.runtime}: loading {target.path.name}, filling {context} tokens, scoring")
        job = MeasureJob(
            context=context,
            decode_tokens=min(32, context // 4),
            n_threads=n_threads,
            score_texts=texts,
            score_seq_len=window,
            score_max_tokens=max_tokens,
            score_full_path=str(Path(folder, "artifact.npy")) if baseline is not None else None,
            score_full_dtype=full_dtype,
            option_items=items or None,
            image_items=pictures or None,
            image_full_path=str(Path(folder, "artifact-answers.npy")) if baseline is not None and pictures else None,
            runner_options=dict(runner_options or {}),
        )
        result = _run_child(target, job)
        score = result.score
        if pictures:
            assert score is not None and score.image_results is not None
            perplexity = answer_perplexity(score.image_results)
        elif score is None or score.token_ids is None or not score.token_logprobs:
            raise BedsideError(f"data '{source}' gives fewer than 2 tokens to score: pass more text")
        else:
            perplexity = score.perplexity
        reference_images = None

        kl_divergence = top1_agreement = None
        if baseline is not None and pictures:
            stages.stage(f"{baseline.runtime}: answering the image questions with the reference {baseline.path.name}")
            image_job = MeasureJob(
                context=window,
                decode_tokens=min(8, window - 1),
                n_threads=n_threads,
                image_items=pictures,
                image_full_path=str(Path(folder, "reference-answers.npy")),
            )
            reference_score = _run_child(baseline, image_job).score
            assert reference_score is not None
            reference_images = reference_score.image_results
            if [len(r["answer_logprobs"]) for r in reference_images or []] != [
                len(r["answer_logprobs"]) for r in score.image_results or []
            ]:
                raise BedsideError(
                    f"artifact {target.path} and reference {baseline.path} tokenize the answers differently: "
                    "compare against a reference with the same tokenizer"
                )
            answer_rows = sum(len(r["answer_logprobs"]) for r in reference_images or [])
            stages.stage("comparing the answers' log-probabilities")
            kl_divergence, top1_agreement = compare_logprobs(
                Path(folder, "reference-answers.npy"), Path(folder, "artifact-answers.npy"), np.arange(answer_rows)
            )
        if baseline is not None and texts:
            stages.stage(f"{baseline.runtime}: scoring the reference {baseline.path.name}")
            reference_job = MeasureJob(
                context=window,
                decode_tokens=min(8, window - 1),
                n_threads=n_threads,
                score_texts=texts,
                score_seq_len=window,
                score_max_tokens=max_tokens,
                score_full_path=str(Path(folder, "reference.npy")),
                score_full_dtype=full_dtype,
            )
            reference_score = _run_child(baseline, reference_job).score
            assert reference_score is not None and reference_score.token_ids is not None
            if (
                reference_score.token_ids != score.token_ids
                or reference_score.window_lengths != score.window_lengths
            ):
                position = _first_difference(reference_score.token_ids, score.token_ids)
                raise BedsideError(
                    f"artifact {target.path} and reference {baseline.path} tokenize the evaluation text "
                    f"differently (first difference at token {position}; a BOS added by one tokenizer only "
                    "shows at token 0): compare against a reference with the same tokenizer"
                )
            stages.stage("comparing log-probabilities")
            rows = predicted_positions(score.window_lengths or [])
            kl_divergence, top1_agreement = compare_logprobs(
                reference_score.full_logprobs_path or "", score.full_logprobs_path or "", rows
            )
            if token_logprobs_path is not None:
                _write_token_logprobs(Path(token_logprobs_path), score, reference_score)
        elif token_logprobs_path is not None and texts:
            _write_token_logprobs(Path(token_logprobs_path), score, None)

    accuracy = accuracy_from_option_logprobs(score.option_logprobs or [], answers) if items else None
    if pictures:
        accuracy = {**(accuracy or {}), **image_accuracy(score.image_results or [], pictures)}
        if reference_images is not None:
            for kind, value in image_accuracy(reference_images, pictures).items():
                if value is not None:
                    accuracy[kind]["reference"] = value["value"]
            accuracy["reference_perplexity"] = _finite_or_none(answer_perplexity(reference_images))
    record = {
        "artifact": str(target.path),
        "runtime": target.runtime,
        "device": result.device,
        "artifact_sha256": artifact_sha256(target.path),
        "reference": str(baseline.path) if baseline is not None else None,
        "data": {"source": source, "sha256": data_sha256(documents), "documents": len(documents)},
        "perplexity": _finite_or_none(perplexity),
        "kl_divergence": _finite_or_none(kl_divergence),
        "top1_agreement": _finite_or_none(top1_agreement),
        "accuracy": accuracy,
        "tokens": len(score.token_logprobs) or sum(len(r["answer_logprobs"]) for r in score.image_results or []),
        "seq_len": window,
        "context": context,
        "peak_rss_bytes": int(result.peak_rss_bytes),
        "scoring_peak_rss_bytes": int(score.peak_rss_bytes) if score.peak_rss_bytes is not None else None,
        "peak_vram_bytes": result.peak_vram_bytes,
        "prefill_tokens_per_s": _finite_or_none(result.prefill_tokens_per_s),
        "decode_tokens_per_s": _finite_or_none(result.decode_tokens_per_s),
        "load_seconds": float(result.load_seconds),
        "runner_options": dict(runner_options or {}),
        "schema_version": SCHEMA_VERSION,
    }
    return {key: record[key] for key in RESULT_KEYS}


def _write_token_logprobs(path: Path, score: Any, reference: Any) -> None:
    """The per-token log-probabilities of the scored text (and the reference's on the same ids) as one .npz."""
    arrays = {
        "artifact": np.asarray(score.token_logprobs, dtype=np.float64),
        "window_lengths": np.asarray(score.window_lengths or [], dtype=np.int64),
    }
    if reference is not None:
        arrays["reference"] = np.asarray(reference.token_logprobs, dtype=np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def to_json(result: dict[str, Any]) -> str:
    """The `eval --json` text of an `evaluate` result."""
    return json.dumps(result, indent=2)
