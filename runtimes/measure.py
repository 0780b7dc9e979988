"""Measure a runtime in a child process: load time, prefill/decode speed, peak memory, scoring.

Why a child: peak resident memory must be the runtime's own (not the toolkit's torch, datasets
and reference model), and a crash in native code (llama.cpp's AMX segfault, an abort in ONNX
Runtime, the OOM killer) must become a clear `RuntimeCrashError` instead of killing the toolkit.

The child is `python -m runtimes.measure JOB.json RESULT.json`, started with subprocess so that
its exit status tells a signal apart from a Python error. It imports only the runtime it runs.
It writes the phase it is in to a side file, so a crash can be reported as
"llama.cpp crashed (signal 11, SIGSEGV) while decoding 32 tokens at context 2048 (model.gguf)".

A job: load with n_ctx = `context`; prefill `context - decode_tokens` tokens (the given ids or
text, repeated to length); decode `decode_tokens` tokens greedily one at a time, which fills the
KV cache to exactly `context`; record memory (peak and at context, after this first pass). With `warm_pass` (the
default) the same prefill and decode then run again from an empty cache, and the speeds reported are this
second pass's: the steady state a runtime's own benchmark reports (llama-bench times runs after a warm-up),
not a first call's (ONNX Runtime plans memory per input shape on first sight, so its first decode at a new
length is slower; docs/RUNTIMES.md, "Measured speeds against the runtimes' own benchmarks", bench/runtime_parity.py
records both passes). Memory figures stay the first pass's, as the estimator is
calibrated on them; the first pass's times and the resident memory after the warm pass are in `details`
(first_pass_prefill_seconds, first_pass_decode_seconds, warm_pass_rss_bytes). Then, optionally,
score `score_ids`
(from a fresh cache) and report scoring memory apart. Instead of ids, a job may give `score_texts`:
the child tokenizes them with the artifact's own tokenizer and scores them in windows of `score_seq_len`, each
opened by the tokenizer's BOS when it adds one (returning the ids scored, so a caller can check two artifacts
saw the same tokens); and
`option_items`, multiple-choice prompts scored with `Runner.option_logprobs`; and `image_items`, image
questions scored with `Runner.continuation_logprobs` and answered with `Runner.generate(image=...)`.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtimes.registry import RUNNERS
from runtimes.results import MeasureResult, RuntimeCrashError, RuntimeLoadError, ScoreResult
from runtimes.runner import PrefilledPrompt, first_line
from toolkit.core.memory_sampling import current_rss_bytes, peak_rss_bytes
from toolkit.core.windows import window_ids

# Imported before the baseline reading, so `baseline_rss_bytes` covers Python and the runtime's
# libraries and `loaded_rss_bytes - baseline_rss_bytes` is what loading the model added.
RUNTIME_MODULES: dict[str, tuple[str, ...]] = {
    "llama.cpp": ("llama_cpp",),
    "onnxruntime": ("onnxruntime", "tokenizers"),
    "torch": ("torch", "transformers"),
}

FILLER_TEXT = (
    "The patient is a 67-year-old man with hypertension and type 2 diabetes who presented with "
    "two hours of crushing chest pain radiating to the left arm. Troponin was elevated and the "
    "electrocardiogram showed ST elevation in the inferior leads. "
)

CRASH_TEST_KIND = "crash-test"


WARM_PASS_ENV = "BEDSIDE_MEASURE_WARM_PASS"


@dataclass
class MeasureJob:
    """What the child does; `kind` "crash-test" is for tests only (the child kills itself with SIGSEGV)."""

    context: int = 2048
    decode_tokens: int = 32
    n_threads: int | None = None
    device: str = "auto"
    prompt_ids: list[int] | None = None
    prompt_text: str | None = None
    score_ids: list[int] | None = None
    score_full_path: str | None = None  # write log-probs [tokens, vocab] here (.npy, `score_full_dtype`)
    # Texts to score instead of `score_ids`: each a string or chat messages (rendered with the artifact's
    # chat template, no generation prompt), joined by a blank line, tokenized by the artifact's own
    # tokenizer, cut to `score_max_tokens` and scored in windows of `score_seq_len` from a fresh cache (each
    # opened by the tokenizer's BOS when it adds one, counted in the window).
    score_texts: list[str | list[dict[str, str]]] | None = None
    score_seq_len: int = 512
    score_max_tokens: int | None = None
    score_full_dtype: str = "float32"  # or "float16" (halves the file for long evaluations)
    # Multiple-choice items {"messages": [...], "options": [...]}: the chat prompt (with generation prompt)
    # and each option are tokenized by the artifact and scored with `Runner.option_logprobs`.
    option_items: list[dict[str, Any]] | None = None
    # Image questions {"messages": [...] (the user turn holds "<image>"), "image": path, "answer": text,
    # "options": [...] or None, "max_new_tokens": n}: the answer's per-token log-probabilities after the
    # prompt and image; each option's summed log-probability (closed questions); a greedy answer (open ones).
    image_items: list[dict[str, Any]] | None = None
    image_full_path: str | None = None  # write the answers' log-prob rows [answer tokens, vocab] here (.npy)
    runner_options: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the Runner class
    # Speeds of a second, warm prefill + decode; memory of the first (module docstring). WARM_PASS_ENV=0 makes the
    # default one pass: the test suite sets it, where speeds are not what is checked and the pass doubles the cost.
    warm_pass: bool = field(default_factory=lambda: os.environ.get(WARM_PASS_ENV, "1") != "0")
    kind: str = "measure"


class VramMonitor:
    """Peak GPU memory of this process, sampled through NVML in a background thread.

    Uses the per-process figure when NVML lists this pid, else the growth of the devices' used
    memory since start (containers often hide pids). `peak_bytes` is None without a GPU.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list[Any] = []
        self._baseline = 0

    def _used(self) -> int:
        import pynvml

        pid = os.getpid()
        own = 0
        found = False
        for handle in self._handles:
            try:
                for process in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if process.pid == pid and process.usedGpuMemory is not None:
                        own += int(process.usedGpuMemory)
                        found = True
            except pynvml.NVMLError:
                pass
        if found:
            return own
        total = sum(int(pynvml.nvmlDeviceGetMemoryInfo(handle).used) for handle in self._handles)
        return max(0, total - self._baseline)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        """Take one reading now (also called at phase ends, so short peaks are not missed)."""
        if not self._handles:
            return
        try:
            used = self._used()
        except Exception:
            return
        self.peak_bytes = max(self.peak_bytes or 0, used)

    def start(self) -> VramMonitor:
        """Start sampling when NVML sees a GPU; a no-op otherwise."""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._baseline = sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles)
        except Exception:
            self._handles = []
            return self
        if self._handles:
            self.peak_bytes = 0
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> int | None:
        """Stop sampling; returns the peak in bytes (None without a GPU)."""
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak_bytes


def _tile(ids: list[int], length: int) -> list[int]:
    if not ids:
        raise ValueError("the prompt for prefill tokenized to nothing")
    repeats = -(-length // len(ids))
    return (ids * repeats)[:length]


def _prefill_and_decode(
    runner: Any,
    prefill_ids: list[int],
    decode_tokens: int,
    vram: VramMonitor,
    phase: Callable[[str], None],
    label: str,
) -> tuple[float, float]:
    """From an empty cache: prefill `prefill_ids`, then decode `decode_tokens` greedily; (prefill s, decode s)."""
    phase(f"prefilling {len(prefill_ids)} tokens ({label})")
    runner.reset()
    start = time.perf_counter()
    logits = runner.forward(prefill_ids)
    prefill_seconds = time.perf_counter() - start
    vram.sample()

    phase(f"decoding {decode_tokens} tokens at context {len(prefill_ids) + decode_tokens} ({label})")
    token = int(np.argmax(logits[-1]))
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = int(np.argmax(runner.forward([token])[-1]))
    return prefill_seconds, time.perf_counter() - start


def run_job(
    runtime: str, path: str | Path, job: MeasureJob, on_phase: Callable[[str], None] | None = None
) -> MeasureResult:
    """Run a measurement job in this process (the child calls this; in-process use skips isolation)."""
    phase = on_phase or (lambda text: None)
    if runtime not in RUNNERS:
        raise RuntimeLoadError(f"unknown runtime {runtime!r} (known: {', '.join(sorted(RUNNERS))})")
    if job.kind == CRASH_TEST_KIND:
        phase("running the crash-test job")
        os.kill(os.getpid(), signal.SIGSEGV)
    if job.kind != "measure":
        raise ValueError(f"unknown job kind {job.kind!r}")
    if not 0 < job.decode_tokens < job.context:
        raise ValueError(f"decode_tokens must be in 1..{job.context - 1}, not {job.decode_tokens}")

    for module in RUNTIME_MODULES.get(runtime, ()):
        __import__(module)
    baseline = current_rss_bytes()
    vram = VramMonitor().start()
    name = Path(path).name
    phase(f"loading {name}")
    runner = RUNNERS[runtime](**job.runner_options)
    runner.load(path, n_ctx=job.context, n_threads=job.n_threads, device=job.device)
    loaded = current_rss_bytes()
    vram.sample()

    if job.prompt_ids:
        source = [int(i) for i in job.prompt_ids]
    else:
        source = runner.tokenize(job.prompt_text or FILLER_TEXT)
    prefill_ids = _tile(source, job.context - job.decode_tokens)
    prefill_seconds, decode_seconds = _prefill_and_decode(
        runner, prefill_ids, job.decode_tokens, vram, phase, name
    )
    rss_at_context = current_rss_bytes()
    peak_rss = max(peak_rss_bytes(), rss_at_context)  # the high-water mark can lag the live figure
    peak_vram = vram.stop() if runner.device == "cuda" else None  # a CPU run's delta is other processes'
    passes: dict[str, Any] = {}
    if job.warm_pass:
        passes = {"first_pass_prefill_seconds": prefill_seconds, "first_pass_decode_seconds": decode_seconds}
        prefill_seconds, decode_seconds = _prefill_and_decode(
            runner, prefill_ids, job.decode_tokens, vram, phase, f"{name}, warm pass"
        )
        passes["warm_pass_rss_bytes"] = current_rss_bytes()

    score = None
    if job.score_ids or job.score_texts or job.option_items or job.image_items:
        phase(f"scoring ({name})")
        score = _score(runner, job)
    details = {**dict(getattr(runner, "details", {}) or {}), **passes}
    runner.close()
    return MeasureResult(
        runtime=runtime,
        path=str(runner.path or path),
        device=runner.device,
        context=job.context,
        n_threads=job.n_threads,
        load_seconds=float(runner.load_seconds or 0.0),
        prefill_tokens=len(prefill_ids),
        prefill_seconds=prefill_seconds,
        decode_tokens=job.decode_tokens,
        decode_seconds=decode_seconds,
        baseline_rss_bytes=baseline,
        loaded_rss_bytes=loaded,
        rss_at_context_bytes=rss_at_context,
        peak_rss_bytes=peak_rss,
        peak_vram_bytes=peak_vram,
        score=score,
        details=details,
    )


def _text_windows(runner: Any, job: MeasureJob) -> list[list[int]]:
    """Tokenize `job.score_texts` with the runner's tokenizer; cut the ids into scoring windows.

    Each window of `score_seq_len` ids opens with the tokenizer's BOS when it adds one
    (`toolkit.core.windows`), so every runtime scores the same ids; windows of one id predict nothing
    and are dropped.
    """
    rendered = [
        text if isinstance(text, str) else runner.apply_chat_template(text, add_generation_prompt=False)
        for text in job.score_texts or []
    ]
    ids = runner.tokenize("\n\n".join(rendered), add_special=False) if rendered else []
    if job.score_max_tokens is not None:
        ids = ids[: job.score_max_tokens]
    windows = window_ids(ids, job.score_seq_len, runner.window_bos)
    return [window for window in windows if len(window) >= 2]


def _score(runner: Any, job: MeasureJob) -> ScoreResult:
    """Score `job.score_ids` (or the windows of `job.score_texts`) chunk by chunk, then option items.

    Full log-probs, when asked for, stream to a .npy memmap with one row per position of every
    window, windows one after the other.
    """
    if job.score_texts:
        windows = _text_windows(runner, job)
        ids = [token for window in windows for token in window]
    else:
        ids = [int(i) for i in job.score_ids or []]
        windows = [ids] if ids else []
    rows_total = sum(len(window) for window in windows)
    full = None
    if job.score_full_path and rows_total:
        full = np.lib.format.open_memmap(
            job.score_full_path,
            mode="w+",
            dtype=np.dtype(job.score_full_dtype),
            shape=(rows_total, runner.vocab_size),
        )
    gathered: list[np.ndarray] = []
    row = 0
    start = time.perf_counter()
    for window in windows:
        position = 0
        for rows in runner.iter_logprobs(window):
            if full is not None:
                full[row : row + len(rows)] = rows
            targets = window[position + 1 : position + 1 + len(rows)]
            gathered.append(rows[np.arange(len(targets)), targets])
            position += len(rows)
            row += len(rows)
    seconds = time.perf_counter() - start
    if full is not None:
        full.flush()
        del full
    values = np.concatenate(gathered) if gathered else np.zeros(0, np.float32)

    options: list[list[float] | None] | None = None
    if job.option_items:
        options = []
        for item in job.option_items:
            prompt = runner.tokenize(runner.apply_chat_template(item["messages"]), add_special=False)
            choices = [runner.tokenize(option, add_special=False) for option in item["options"]]
            if len(prompt) + max(len(choice) for choice in choices) > runner.n_ctx:
                options.append(None)
                continue
            options.append(runner.option_logprobs(prompt, choices))
    return ScoreResult(
        image_results=_image_results(runner, job.image_items, job.image_full_path) if job.image_items else None,
        tokens=len(ids),
        token_logprobs=[float(v) for v in values],
        seconds=seconds,
        peak_rss_bytes=peak_rss_bytes(),
        full_logprobs_path=job.score_full_path if rows_total else None,
        token_ids=ids if job.score_texts else None,
        window_lengths=[len(window) for window in windows] if job.score_texts else None,
        option_logprobs=options,
    )


def _image_results(runner: Any, items: list[dict[str, Any]], full_path: str | None = None) -> list[dict[str, Any]]:
    """Per image question: the answer's token log-probs, each option's total, and a greedy answer when open.

    The answer is tokenized as the assistant writes it (no special tokens) and scored after the
    rendered prompt with the image at its marker; an option that is the answer reuses its scores.
    The prompt and its image are prefilled once per question; the answer, each other option and the
    greedy reply continue from that cache, rewound to the prompt's end after each (`Runner.rewind`),
    which gives the same rows as a fresh prefill per continuation at a third of the image encodes.
    With `full_path`, the answers' full log-prob rows, item after item, go to that .npy (float32).
    """
    results = []
    full_rows: list[np.ndarray] = []
    for item in items:
        parts = runner.prompt_parts(item["messages"], item["image"])
        answer_ids = runner.tokenize(item["answer"], add_special=False)
        prompt = PrefilledPrompt(runner, parts)
        try:
            rows = prompt.rows(answer_ids)
            if full_path is not None:
                full_rows.append(rows.astype(np.float32))
            answer = rows[np.arange(len(answer_ids)), answer_ids]
            options = None
            if item.get("options"):
                options = []
                for option in item["options"]:
                    ids = runner.tokenize(option, add_special=False)
                    scores = answer if ids == answer_ids else prompt.rows(ids)[np.arange(len(ids)), ids]
                    options.append(float(np.sum(scores)))
            generated = None
            if not item.get("options"):
                generated = prompt.greedy(item.get("max_new_tokens", 16))
        finally:
            runner.reset()
        results.append(
            {"answer_logprobs": [float(v) for v in answer], "options": options, "generated": generated}
        )
    if full_path is not None and full_rows:
        np.save(full_path, np.concatenate(full_rows, axis=0))
    return results


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def measure_in_child(
    runner_name: str,
    path: str | Path,
    job: MeasureJob | dict[str, Any] | None = None,
    timeout_s: float | None = 3600,
) -> MeasureResult:
    """Run `job` on runtime `runner_name` for `path` in a fresh Python process; return its result.

    Raises RuntimeCrashError (a RuntimeLoadError) when the child dies from a signal, naming the
    phase it was in, and RuntimeLoadError when it cannot load the artifact, fails, or runs past
    `timeout_s`.
    """
    if isinstance(job, dict):
        job = MeasureJob(**job)
    job = job or MeasureJob()
    if runner_name not in RUNNERS:
        raise RuntimeLoadError(f"unknown runtime {runner_name!r} (known: {', '.join(sorted(RUNNERS))})")
    path = Path(path)
    package_root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="bedside-measure-") as folder:
        job_file, result_file = Path(folder, "job.json"), Path(folder, "result.json")
        phase_file = Path(folder, "phase.txt")
        job_file.write_text(
            json.dumps({"runtime": runner_name, "path": str(path), "job": dataclasses.asdict(job)}),
            encoding="utf-8",
        )
        command = [sys.executable, "-m", "runtimes.measure", str(job_file), str(result_file), str(phase_file)]
        try:
            completed = subprocess.run(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            phase = phase_file.read_text(encoding="utf-8") if phase_file.exists() else "starting"
            raise RuntimeLoadError(
                f"{runner_name} did not finish within {timeout_s:.0f} s while {phase} ({path})"
            ) from error
        phase = phase_file.read_text(encoding="utf-8") if phase_file.exists() else "starting"
        output = completed.stdout.decode("utf-8", errors="replace").strip().splitlines()
        last_line = output[-1] if output else ""
        if completed.returncode < 0:
            number = -completed.returncode
            hint = " (killed: out of memory?)" if number == signal.SIGKILL else ""
            raise RuntimeCrashError(
                f"{runner_name} crashed (signal {number}, {_signal_name(number)}) while {phase} ({path}){hint}"
            )
        if not result_file.exists():
            raise RuntimeLoadError(
                f"{runner_name} measurement exited with status {completed.returncode} while {phase} "
                f"({path}): {last_line}"
            )
        payload = json.loads(result_file.read_text(encoding="utf-8"))
    if not payload["ok"]:
        raise RuntimeLoadError(payload["error"])
    return MeasureResult.from_dict(payload["result"])


def main(argv: list[str] | None = None) -> int:
    """Child entry point: `python -m runtimes.measure JOB.json RESULT.json PHASE.txt`."""
    job_file, result_file, phase_file = (argv if argv is not None else sys.argv[1:])[:3]
    faulthandler.enable()
    spec = json.loads(Path(job_file).read_text(encoding="utf-8"))

    def on_phase(text: str) -> None:
        Path(phase_file).write_text(text, encoding="utf-8")

    try:
        result = run_job(spec["runtime"], spec["path"], MeasureJob(**spec["job"]), on_phase=on_phase)
        payload: dict[str, Any] = {"ok": True, "result": result.to_dict()}
        status = 0
    except RuntimeLoadError as error:
        payload, status = {"ok": False, "error": str(error)}, 2
    except Exception as error:  # reported to the parent as one line; traceback on the child's output
        import traceback

        traceback.print_exc()
        phase = Path(phase_file).read_text(encoding="utf-8") if Path(phase_file).exists() else "starting"
        payload = {
            "ok": False,
            "error": f"{spec['runtime']} failed while {phase} ({spec['path']}): "
            f"{type(error).__name__}: {first_line(error)}",
        }
        status = 3
    Path(result_file).write_text(json.dumps(payload), encoding="utf-8")
    return status


if __name__ == "__main__":
    sys.exit(main())
