"""`bedside eval`: quality, memory and speed of an artifact on its own runtime (see toolkit/validate/evaluate.py).

`--json` prints exactly one JSON object on stdout (progress goes to stderr); without it, a table.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from toolkit.core.errors import BedsideError
from toolkit.core.formats import KV_CACHE_DTYPES
from toolkit.core.units import MIB
from toolkit.validate.evaluate import evaluate, resolve_artifact, to_json


def register(app: typer.Typer) -> None:
    """Add the `eval` command to the `bedside` app."""
    app.command("eval")(eval_command)


def eval_command(
    artifact: Annotated[
        str,
        typer.Option("--artifact", help="'demo', a checkpoint folder, a .gguf file, or an export folder."),
    ],
    data: Annotated[
        str,
        typer.Option("--data", help="Evaluation data: a file or a named source (radiology, pubmedqa, ...)."),
    ],
    runtime: Annotated[
        str | None,
        typer.Option("--runtime", help="torch, llama.cpp or onnxruntime (default: from the artifact)."),
    ] = None,
    reference: Annotated[
        str | None,
        typer.Option("--reference", help="Model to compare with (KL divergence, top-1 agreement)."),
    ] = None,
    context: Annotated[
        int, typer.Option("--context", help="KV-cache tokens for the memory/speed measurement.")
    ] = 2048,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Evaluation tokens scored at most.")] = 4096,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Scoring window in tokens.")] = 512,
    max_items: Annotated[
        int, typer.Option("--max-items", help="Multiple-choice items scored at most.")
    ] = 200,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Runtime threads (default: the runtime's).")
    ] = None,
    kv_cache: Annotated[
        str | None,
        typer.Option("--kv-cache", help="llama.cpp KV-cache precision: f16 (default), q8_0 or q4_0."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Score ARTIFACT on DATA: perplexity, KL and top-1 agreement against a reference, accuracy, memory, speed."""

    result = evaluate(
        artifact,
        data,
        runtime=runtime,
        reference=reference,
        context=context,
        max_tokens=max_tokens,
        seq_len=seq_len,
        n_threads=threads,
        max_items=max_items,
        runner_options=_kv_options(kv_cache, artifact, runtime),
    )
    if as_json:
        typer.echo(to_json(result))
        return
    Console().print(result_table(result))


def _kv_options(kv_cache: str | None, artifact: str, runtime: str | None) -> dict[str, Any] | None:
    """LlamaCppRunner options for --kv-cache; a BedsideError when the artifact does not run on llama.cpp."""
    if kv_cache is None:
        return None
    if kv_cache not in KV_CACHE_DTYPES:
        raise BedsideError(
            f"--kv-cache: unknown KV-cache dtype '{kv_cache}'; known: {', '.join(KV_CACHE_DTYPES)}"
        )
    if resolve_artifact(artifact, runtime).runtime != "llama.cpp":
        raise BedsideError("--kv-cache is a llama.cpp setting (ONNX Runtime and torch keep a float KV cache)")
    return {"kv_cache_dtype": kv_cache}


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f} MiB"


def result_table(result: dict[str, Any]) -> Table:
    """The evaluation as a two-column table."""
    table = Table(title=f"{result['artifact']} on {result['runtime']} ({result['device']})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    accuracy = result["accuracy"]
    data = result["data"]
    rows = [
        ("perplexity", _number(result["perplexity"], 3)),
        ("KL divergence vs reference (nats)", _number(result["kl_divergence"], 5)),
        ("top-1 agreement", _number(result["top1_agreement"], 4)),
        ("accuracy", "-" if accuracy is None else f"{accuracy['overall']:.3f} (n={accuracy['n']})"),
        ("tokens scored", _number(result["tokens"])),
        ("scoring window / context", f"{result['seq_len']} / {result['context']}"),
        (f"peak RSS at context {result['context']}", _mib(result["peak_rss_bytes"])),
        ("peak RSS while scoring", _mib(result["scoring_peak_rss_bytes"])),
        ("peak VRAM", _mib(result["peak_vram_bytes"])),
        ("prefill tok/s", _number(result["prefill_tokens_per_s"], 1)),
        (
            "runner options",
            ", ".join(f"{k}={v}" for k, v in (result.get("runner_options") or {}).items()) or "-",
        ),
        ("decode tok/s", _number(result["decode_tokens_per_s"], 1)),
        ("reference", result["reference"] or "-"),
        ("data", f"{data['source']} ({data['documents']} documents, sha256 {data['sha256'][:12]})"),
        ("artifact sha256", result["artifact_sha256"][:16]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table
