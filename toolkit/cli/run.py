"""`bedside run ARTIFACT --prompt TEXT [--image PATH]`: chat with an artifact on its runtime, streamed.

The prompt is sent as one user turn through the artifact's own chat template; the answer is written to
stdout as it decodes (`Runner.generate(stream=...)`). Temperature 0 is greedy decoding. With `--image`
(a LLaVA checkpoint or its export with the vision part) the image goes before the prompt, as LLaVA-1.5
puts it; a prompt that holds the `<image>` marker places it there instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from runtimes import load_runner
from toolkit.core.errors import BedsideError
from toolkit.core.vision import IMAGE_MARKER
from toolkit.validate.evaluate import resolve_artifact


def register(app: typer.Typer) -> None:
    """Add the `run` command to the `bedside` app."""
    app.command("run")(run_command)


def run_command(
    artifact: Annotated[
        str, typer.Argument(help="'demo', a checkpoint folder, a .gguf file, or an export folder.")
    ],
    prompt: Annotated[str, typer.Option("--prompt", help="The user's message.")],
    image: Annotated[
        Path | None, typer.Option("--image", help="An image (PNG/JPEG) the question is about (vision-language models).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Tokens to generate at most.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 for greedy decoding.")] = 0.0,
    runtime: Annotated[
        str | None,
        typer.Option("--runtime", help="torch, llama.cpp or onnxruntime (default: from the artifact)."),
    ] = None,
    context: Annotated[int, typer.Option("--context", help="KV-cache size in tokens.")] = 2048,
    threads: Annotated[int | None, typer.Option("--threads", help="Runtime threads.")] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Sampling seed (with --temperature > 0).")
    ] = None,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object (answer, tokens, seconds) instead of streaming."),
    ] = False,
) -> None:
    """Answer PROMPT with ARTIFACT, streaming the text to stdout."""

    if max_tokens < 1:
        raise BedsideError(f"--max-tokens {max_tokens}: generate at least 1 token")
    if temperature < 0:
        raise BedsideError(f"--temperature {temperature}: use 0 (greedy) or a positive value")
    if not prompt.strip():
        raise BedsideError("--prompt is empty: give the message to answer")
    if context < 1:
        raise BedsideError(f"--context {context}: the KV cache needs at least 1 token (e.g. --context 2048)")
    if threads is not None and threads < 1:
        raise BedsideError(f"--threads {threads}: use 1 or more (or leave it out)")
    if image is not None and not image.is_file():
        raise BedsideError(f"--image '{image}' not found: pass the path of a PNG or JPEG file")
    content = prompt if image is None or IMAGE_MARKER in prompt else f"{IMAGE_MARKER}\n{prompt}"
    target = resolve_artifact(artifact, runtime)
    runner = load_runner(target.path, target.runtime, n_ctx=context, n_threads=threads)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    with runner:
        try:
            result = runner.generate(
                [{"role": "user", "content": content}],
                image=image,
                max_new_tokens=max_tokens,
                greedy=temperature == 0,
                temperature=temperature or 1.0,
                seed=seed,
                stream=None if json_output else write,
            )
        except ValueError as error:  # the prompt does not fit the context, or no vision part for --image
            if image is not None and not runner.has_vision:
                raise BedsideError(
                    f"{target.path} has no vision tower: --image needs a LLaVA checkpoint or its export "
                    "with the vision part (GGUF: the mmproj file beside the model)"
                ) from None
            raise BedsideError(f"{error}: pass a larger --context or a shorter prompt") from error
    if json_output:
        answer = {
            "answer": result.text,
            "tokens": len(result.token_ids),
            "prompt_tokens": result.prompt_tokens,
            "finish_reason": result.finish_reason,
            "seconds": round(result.prefill_seconds + result.decode_seconds, 3),
            "runtime": target.runtime,
        }
        sys.stdout.write(json.dumps(answer) + "\n")
    else:
        sys.stdout.write("\n")
    sys.stdout.flush()
