"""Runtimes: load exported artifacts and score, generate and measure them, one Runner per runtime.

    from runtimes import load_runner, runner_for_path, RUNNERS
    with load_runner("model.gguf", n_ctx=2048) as runner:
        logprobs = runner.token_logprobs(runner.tokenize(text))
    from runtimes.measure import measure_in_child, MeasureJob

Importing this package is cheap: torch, llama_cpp and onnxruntime are imported when a runner
loads. It never imports `toolkit` (imports flow toolkit -> runtimes).
"""

from typing import Any

from runtimes import llamacpp_runner, onnx_runner, torch_runner
from runtimes.llamacpp_runner import LlamaCppRunner
from runtimes.onnx_runner import OnnxRunner
from runtimes.registry import RUNNERS, artifact_format, load_runner, runner_for_path, runtime_for_path
from runtimes.results import GenerationResult, MeasureResult, RuntimeCrashError, RuntimeLoadError, ScoreResult
from runtimes.runner import Runner, log_softmax
from runtimes.torch_runner import TorchRunner

__all__ = [
    "RUNNERS",
    "GenerationResult",
    "LlamaCppRunner",
    "MeasureJob",
    "MeasureResult",
    "OnnxRunner",
    "Runner",
    "RuntimeCrashError",
    "RuntimeLoadError",
    "ScoreResult",
    "TorchRunner",
    "artifact_format",
    "llamacpp_runner",
    "load_runner",
    "log_softmax",
    "measure_in_child",
    "onnx_runner",
    "runner_for_path",
    "runtime_for_path",
    "torch_runner",
]


def __getattr__(name: str) -> Any:
    """`runtimes.measure_in_child` / `runtimes.MeasureJob` without importing runtimes.measure eagerly.

    Eager import would make `python -m runtimes.measure` (the measurement child) warn that the
    module was imported twice.
    """
    if name in ("measure_in_child", "MeasureJob"):
        from runtimes import measure

        return getattr(measure, name)
    raise AttributeError(f"module 'runtimes' has no attribute {name!r}")
