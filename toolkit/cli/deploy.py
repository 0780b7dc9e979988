"""`bedside deploy`: the main job, plan -> compress -> export -> validate -> report + bundle (toolkit.deploy).

Exit codes: 0 a bundle was written (every blocking check passed); 1 nothing passed within
--max-attempts (report.json/report.html say why); 2 bad input; 3 nothing fits the profile at all.
With `--json` (no progress bars) stdout holds one JSON object, `deploy_summary`, and nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from toolkit.cli.build_tools import import_build_module
from toolkit.cli.options import FormatOption, KvCacheOption, PruneLayersOption, QuantOption
from toolkit.core.errors import BedsideError

if TYPE_CHECKING:
    from toolkit.deploy.pipeline import DeployResult


def register(app: typer.Typer) -> None:
    """Add the `deploy` command to the `bedside` app."""
    app.command("deploy")(deploy_command)


def deploy_command(
    profile: Annotated[str, typer.Option("--profile", help="Device profile name, 'host', or a YAML path.")],
    model: Annotated[str, typer.Option("--model", help="'demo' or a local checkpoint folder.")] = "demo",
    calib: Annotated[
        str | None,
        typer.Option("--calib", help="Calibration data (path or named source); default radiology."),
    ] = None,
    eval_data: Annotated[
        str | None,
        typer.Option("--eval", help="Held-apart evaluation data; default: a split of the calibration data."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder (work cache, report, bundle).")] = Path(
        "out/deploy"
    ),
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", help="Re-plans after failed validation.")
    ] = 3,
    calib_sequences: Annotated[
        int, typer.Option("--calib-sequences", help="Calibration sequences (1-128; fewer is faster).")
    ] = 64,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="LoRA healing steps after pruning.")] = 40,
    no_heal: Annotated[
        bool, typer.Option("--no-heal", help="Skip LoRA healing (also skipped when the host cannot hold it).")
    ] = False,
    eval_tokens: Annotated[
        int, typer.Option("--eval-tokens", help="Tokens scored in validation (fewer is faster, noisier).")
    ] = 4096,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Calibration sequence length in tokens.")] = 256,
    prune_method: Annotated[
        str,
        typer.Option("--prune-method", help="Layer selection: activation, block-influence, angular, last."),
    ] = "activation",
    quant_method: Annotated[
        str,
        typer.Option(
            "--quant-method",
            help="auto (default: awq-gptq for GGUF, awq for ONNX), awq, awq-gptq (AWQ, then GPTQ rounding on the "
            "exact Q4_0/Q5_0 grid, GGUF only), rtn (no search: faster, for tests) or imatrix (llama.cpp's "
            "importance matrix, GGUF only).",
        ),
    ] = "auto",
    replace: Annotated[
        str,
        typer.Option(
            "--replace",
            help="Removed layers: linear (a fitted linear map folded into the block before each removed span, "
            "no extra parameters) or none (plain removal).",
        ),
    ] = "linear",
    threads: Annotated[
        int | None, typer.Option("--threads", help="Runtime threads (default: runtime's).")
    ] = None,
    kv_cache: KvCacheOption = None,
    format_name: FormatOption = None,
    quant: QuantOption = None,
    prune_layers: PruneLayersOption = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept pickle (*.bin/*.pt) weights; they can run code.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the data split and sampling.")] = 0,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars.")] = True,
    sign_key: Annotated[
        Path | None,
        typer.Option(
            "--sign-key", help="Ed25519 private key (PEM, `bedside keygen`): sign the bundle's manifest."
        ),
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help="Print one JSON summary (exit status, bundle, checks) on stdout; no progress bars."
        ),
    ] = False,
) -> None:
    """Compress MODEL for PROFILE, validate it on the target runtime, and write the report and bundle."""

    pipeline = import_build_module("toolkit.deploy.pipeline", "deploy")  # torch: when deploying, not at start
    options = pipeline.DeployOptions(
        profile=profile,
        model=model,
        calib=calib,
        eval_data=eval_data,
        out=out,
        max_attempts=max_attempts,
        calib_sequences=calib_sequences,
        heal_steps=heal_steps,
        heal=not no_heal,
        eval_tokens=eval_tokens,
        seq_len=seq_len,
        prune_method=prune_method,
        quant_method=quant_method,
        replace=replace,
        threads=threads,
        kv_cache_dtype=kv_cache,
        format=format_name,
        quant=quant,
        prune_layers=prune_layers,
        allow_pickle=allow_pickle,
        seed=seed,
        progress=progress and not json_output,
        sign_key=sign_key,
    )
    if not json_output:
        result = pipeline.run_deploy(options)
        if not result.passed:
            raise SystemExit(1)
        return
    try:
        result = pipeline.run_deploy(options)
    except BedsideError as error:  # bad input (2) or nothing fits (3): still one object, then the error line
        _print_json(deploy_summary(None, out, error))
        raise
    _print_json(deploy_summary(result, out))
    if not result.passed:
        raise SystemExit(1)


def deploy_summary(
    result: DeployResult | None, out: Path, error: BedsideError | None = None
) -> dict[str, Any]:
    """`deploy --json`'s object: exit status, out folder, bundle (folder and archive) or null, passed, the
    final attempt's checks as report.json holds them, and the reason when nothing passed (else null)."""
    if result is None:
        reason = str(error) if error is not None else "deploy did not run"
        status = error.exit_code if error is not None else 2
        return {
            "exit_status": status,
            "out": str(out),
            "bundle": None,
            "archive": None,
            "report": None,
            "passed": False,
            "checks": [],
            "reason": reason,
        }
    return {
        "exit_status": 0 if result.passed else 1,
        "out": str(out),
        "bundle": str(result.bundle_dir) if result.bundle_dir else None,
        "archive": str(result.tarball) if result.tarball else None,
        "report": str(result.report_json),
        "passed": result.passed,
        "checks": result.report.get("checks", []),
        "reason": None if result.passed else result.reason,
    }


def _print_json(summary: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
