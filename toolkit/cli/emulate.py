"""`bedside emulate --profile P BUNDLE [--prompt TEXT] [--json]`: chat on this host at the target's speed.

Each forward step of the runtime is slowed to the latency the simulator predicts for the bundle on the profile
(toolkit/deploy/emulate.py: CXLMemSim-style delay injection), so people can feel a Jetson's or a 4 GB laptop
GPU's responsiveness before they own one. With --prompt: one answer, streamed (or, with --json, one object with
per-step target and host latency). Without: an interactive loop (an empty line, /quit or end of input ends it;
each turn re-sends the whole conversation, as a runtime without prompt caching does, and the target's time
for that prompt is what the first token waits for). When this host is slower than the target, the summary says
so: delay can be added, not taken away. Bad input is one error line and exit 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from runtimes import load_runner
from runtimes.runner import Runner
from toolkit.core.errors import BedsideError
from toolkit.core.paths import path_inside
from toolkit.deploy.emulate import DelayInjector, TurnReport
from toolkit.deploy.verify import opened_bundle
from toolkit.plan.simulator import PLACEMENTS, target_clock
from toolkit.plan.workload import RUNTIME_CONFIG, read_artifact_workload
from toolkit.target.profiles import load_profile
from toolkit.validate.evaluate import resolve_artifact

QUIT = ("", "/quit", "/exit")


def register(app: typer.Typer) -> None:
    """Add the `emulate` command to the `bedside` app."""
    app.command("emulate")(emulate_command)


def _model_of(folder_or_file: Path) -> tuple[Path, str | None]:
    """The model file or folder to load and its runtime: a bundle's runtime.json, else what the artifact is."""
    config = folder_or_file / RUNTIME_CONFIG
    if folder_or_file.is_dir() and config.is_file():
        try:
            runtime = json.loads(config.read_text(encoding="utf-8"))
            model, name = str(runtime["model"]).rstrip("/"), str(runtime["runtime"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BedsideError(f"{config}: not a bundle's runtime.json ({error})") from None
        return path_inside(folder_or_file, model, f"{config}'s model"), name
    artifact = resolve_artifact(folder_or_file)
    return artifact.path, artifact.runtime


def _answer(
    runner: Runner, injector: DelayInjector, messages: list[dict[str, str]], max_tokens: int, stream: bool
) -> tuple[Any, TurnReport]:
    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    injector.new_turn()
    try:
        result = runner.generate(messages, max_new_tokens=max_tokens, greedy=True, stream=write if stream else None)
    except ValueError as error:  # the conversation no longer fits the context
        raise BedsideError(f"{error}: pass a larger --context or a shorter prompt") from error
    return result, TurnReport(list(injector.steps))


def emulate_command(
    bundle: Annotated[Path, typer.Argument(help="A bundle folder or .tar.gz, an export folder, or a .gguf file.")],
    profile: Annotated[str, typer.Option("--profile", help="Device profile name, 'host', or a YAML path.")],
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="One message to answer (default: an interactive chat).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to generate per answer at most.")] = 128,
    context: Annotated[
        int | None, typer.Option("--context", help="KV-cache size in tokens (default: the profile's).")
    ] = None,
    placement: Annotated[
        str, typer.Option("--placement", help=f"Where weights and KV cache live: {', '.join(PLACEMENTS)}.")
    ] = "auto",
    threads: Annotated[int | None, typer.Option("--threads", help="Runtime threads on this host.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --prompt: one object with per-token target and host latency.")
    ] = False,
) -> None:
    """Chat with BUNDLE on this host, each step slowed to the simulated latency of the target PROFILE."""
    if max_tokens < 1:
        raise BedsideError(f"--max-tokens {max_tokens}: generate at least 1 token")
    if threads is not None and threads < 1:
        raise BedsideError(f"--threads {threads}: use 1 or more (or leave it out)")
    if prompt is not None and not prompt.strip():
        raise BedsideError("--prompt is empty: give the message to answer (or leave it out to chat)")
    if as_json and prompt is None:
        raise BedsideError("--json needs --prompt: the interactive chat prints text")
    device = load_profile(profile)
    with contextlib.ExitStack() as stack:
        path = bundle.expanduser()
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            path = stack.enter_context(opened_bundle(path))  # checked member by member, as verify does
        workload = read_artifact_workload(path, device)
        clock, simulation = target_clock(workload, device, context, placement, threads)
        model, runtime = _model_of(path)
        runner = stack.enter_context(
            load_runner(model, runtime, n_ctx=simulation.context, n_threads=threads)
        )
        injector = DelayInjector(runner, clock)
        stack.enter_context(injector.installed())
        label = simulation.placement.label(workload.num_layers)
        header = (
            f"emulating {device.name} ({label}, context {simulation.context}): predicted "
            f"{simulation.decode_tokens_per_s:.2f} tok/s decode; each step is slowed to the target's latency"
        )
        if prompt is not None:
            if not as_json:
                typer.echo(header, err=True)
            result, report = _answer(runner, injector, [{"role": "user", "content": prompt}], max_tokens, not as_json)
            if as_json:
                typer.echo(
                    json.dumps(
                        {
                            "profile": device.name,
                            "artifact": workload.label,
                            "runtime": workload.runtime,
                            "placement": label,
                            "context": simulation.context,
                            "predicted_decode_tokens_per_s": simulation.decode_tokens_per_s,
                            "answer": result.text,
                            "prompt_tokens": result.prompt_tokens,
                            "tokens": len(result.token_ids),
                            "finish_reason": result.finish_reason,
                            **report.to_json(),
                        }
                    )
                )
                return
            sys.stdout.write("\n")
            typer.echo(report.summary(), err=True)
            return
        typer.echo(header + "; an empty line or /quit ends the chat", err=True)
        messages: list[dict[str, str]] = []
        while True:
            try:
                line = input("you> ")
            except EOFError:
                break
            if line.strip() in QUIT:
                break
            messages.append({"role": "user", "content": line})
            try:
                result, report = _answer(runner, injector, messages, max_tokens, True)
            except BedsideError as error:  # the conversation outgrew the context: start a new one
                typer.echo(f"\nerror: {error}; the conversation starts again", err=True)
                messages = []
                continue
            messages.append({"role": "assistant", "content": result.text})
            sys.stdout.write("\n")
            typer.echo(report.summary(), err=True)
