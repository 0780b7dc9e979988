"""Bench: the demo VLM (`make demo-vlm`) on image questions it never trained on, with torch.

Run from the repository root (after `make demo-vlm`):

    .venv/bin/python -m bench.demo_vlm

Data: SLAKE validate (all 422 CLOSED and 631 OPEN questions) and the held-apart slice of VQA-RAD
train (`toolkit.data.vqa.held_apart_vqa_rad`, images the build never saw). Scoring follows
`toolkit.data.vqa`, read through transformers directly (LlavaForConditionalGeneration and
AutoProcessor from the built folder), so the figures check the saved checkpoint, not the training
code:

- CLOSED: the prompt is the chat template over "<image>\\n{question}" with the generation prompt;
  each option of `closed_options` is scored as the assistant's whole answer,

      score(option) = sum_t log p(y_t | prompt, y_<t),   y = tokens of option + "<|im_end|>"

  and the best-scoring option is the prediction (the end-of-turn token makes an option that is a
  prefix of another, "Right" / "Lower Right", compete fairly);
- OPEN: greedy generation of at most --max-new-tokens tokens, stopped at <|im_end|>; exact match
  after `normalise_answer` and token recall (`toolkit.data.vqa.token_recall`);
- controls: the text-only baseline (`TextOnlyBaseline` fitted on the build's training QA: SLAKE
  train + VQA-RAD train without the held-apart slice) and the same model with every image replaced
  by a constant grey image (RGB 128, 128, 128): if the model reads the image, blanking it must cost
  accuracy.

Writes docs/benchmarks/demo_vlm.json (raw numbers, the command, timings and load averages).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, command_line, load_average, utc_now, write_json_atomic
from toolkit.core.errors import BedsideError
from toolkit.core.paths import demo_vlm_dir, shared_data_dir
from toolkit.data.documents import Document
from toolkit.data.sources import load_image_question_answer_jsonl
from toolkit.data.vqa import (
    TextOnlyBaseline,
    closed_answer_sets,
    closed_options,
    exact_match,
    held_apart_vqa_rad,
    is_closed,
    normalise_answer,
    token_recall,
)
from toolkit.model.llava import vision_user_content

GREY = (128, 128, 128)
END_OF_TURN = "<|im_end|>"


class Scorer:
    """A LLaVA folder loaded with transformers: option log-likelihoods and greedy answers for one image."""

    def __init__(self, folder: Path, threads: int) -> None:
        import torch
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = LlavaForConditionalGeneration.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=False
        ).eval()
        self.processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer
        self.end_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)

    def prompt(self, question: str) -> str:
        """Chat template over the user turn "<image>\\n{question}", ending with the assistant's header."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": vision_user_content(question)}],
            tokenize=False,
            add_generation_prompt=True,
        )

    def option_scores(self, image: Any, question: str, options: Sequence[str]) -> list[float]:
        """sum of log p over each option's tokens and the end-of-turn token, after the prompt."""
        torch = self.torch
        prompt = self.prompt(question)
        prompt_ids = self.processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
        rows = []
        for option in options:
            ids = self.processor(images=image, text=prompt + option + END_OF_TURN, return_tensors="pt")
            row = ids["input_ids"][0].tolist()
            if row[: len(prompt_ids)] != prompt_ids:
                raise BedsideError(f"option {option!r} changes the prompt's tokens")
            rows.append(row)
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.end_id, dtype=torch.long)
        attention = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        pixels = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = self.model(
                input_ids=input_ids, attention_mask=attention, pixel_values=pixels.expand(len(rows), -1, -1, -1)
            ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for i, row in enumerate(rows):
            targets = torch.tensor(row[len(prompt_ids) :])
            positions = torch.arange(len(prompt_ids) - 1, len(row) - 1)
            scores.append(float(logprobs[i, positions, targets].sum()))
        return scores

    def generate(self, image: Any, question: str, max_new_tokens: int) -> str:
        """Greedy answer, at most max_new_tokens tokens, stopped at the end-of-turn token."""
        inputs = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        with self.torch.no_grad():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=self.end_id,
                pad_token_id=self.end_id,
            )
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _image(path: Path, blank: bool) -> Any:
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    return Image.new("RGB", rgb.size, GREY) if blank else rgb


def closed_accuracy(
    scorer: Scorer, documents: Sequence[Document], answer_sets: dict[str, tuple[str, ...]], blank: bool
) -> dict[str, Any]:
    """Accuracy of the best option by summed log-likelihood over the CLOSED documents."""
    right = 0
    single = 0
    by_kind = {"yes_no": [0, 0], "other": [0, 0]}
    for document in documents:
        assert document.image is not None and document.question is not None and document.answer is not None
        options = closed_options(document, answer_sets)
        if len(options) == 1:
            single += 1
            correct = True
        else:
            scores = scorer.option_scores(_image(document.image, blank), document.question, options)
            correct = exact_match(options[max(range(len(options)), key=scores.__getitem__)], document.answer)
        kind = "yes_no" if normalise_answer(document.answer) in ("yes", "no") else "other"
        by_kind[kind][0] += int(correct)
        by_kind[kind][1] += 1
        right += int(correct)
    return {
        "accuracy": right / len(documents),
        "right": right,
        "questions": len(documents),
        "single_option_questions": single,
        "by_kind": {kind: {"right": r, "questions": n} for kind, (r, n) in by_kind.items()},
    }


def open_scores(
    scorer: Scorer, documents: Sequence[Document], max_new_tokens: int, blank: bool
) -> dict[str, Any]:
    """Exact match and token recall of greedy answers over the OPEN documents."""
    matches, recall = 0, 0.0
    examples = []
    for document in documents:
        assert document.image is not None and document.question is not None and document.answer is not None
        prediction = scorer.generate(_image(document.image, blank), document.question, max_new_tokens)
        matches += exact_match(prediction, document.answer)
        recall += token_recall(prediction, document.answer)
        if len(examples) < 10:
            examples.append({"question": document.question, "answer": document.answer, "prediction": prediction})
    return {
        "exact_match": matches / len(documents),
        "token_recall": recall / len(documents),
        "questions": len(documents),
        "examples": examples,
    }


def baseline_open(baseline: TextOnlyBaseline, documents: Sequence[Document]) -> dict[str, float]:
    """The text-only baseline's exact match and token recall on OPEN questions."""
    predictions = [baseline.predict(d.question or "") for d in documents]
    return {
        "exact_match": sum(exact_match(p, d.answer or "") for p, d in zip(predictions, documents, strict=True))
        / len(documents),
        "token_recall": sum(token_recall(p, d.answer or "") for p, d in zip(predictions, documents, strict=True))
        / len(documents),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the demo VLM and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="LLaVA folder (default: the demo VLM's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "demo_vlm.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--no-open", action="store_true", help="skip the OPEN questions (generation)")
    args = parser.parse_args(argv)

    root = shared_data_dir()
    if root is None:
        raise SystemExit("bench.demo_vlm needs the shared data (../shared/data with slake/ and vqa_rad/)")
    folder = args.model or demo_vlm_dir()
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no LLaVA folder at {folder}: run `make demo-vlm` first")
    slake_train = load_image_question_answer_jsonl(root / "slake" / "train.jsonl")
    slake_validate = load_image_question_answer_jsonl(root / "slake" / "validate.jsonl")
    rad_kept, rad_apart = held_apart_vqa_rad(load_image_question_answer_jsonl(root / "vqa_rad" / "train.jsonl"))
    training = slake_train + rad_kept
    answer_sets = closed_answer_sets(training)
    baseline_closed = TextOnlyBaseline().fit(training)
    baseline_all = TextOnlyBaseline().fit(training, closed_only=False)

    results: dict[str, Any] = {
        "command": command_line(),
        "model": str(folder),
        "started": utc_now(),
        "load_average_start": load_average(),
        "threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "sets": {},
    }
    scorer = Scorer(folder, args.threads)
    started = time.perf_counter()
    for name, documents in (("slake_validate", slake_validate), ("vqa_rad_held_apart", rad_apart)):
        closed = [d for d in documents if is_closed(d)]
        opened = [d for d in documents if not is_closed(d)]
        entry: dict[str, Any] = {
            "closed_questions": len(closed),
            "open_questions": len(opened),
            "images": len({d.image for d in documents}),
            "text_only_baseline_closed": baseline_closed.accuracy(closed),
            "text_only_baseline_closed_slake_train_only": TextOnlyBaseline().fit(slake_train).accuracy(closed),
        }
        t = time.perf_counter()
        entry["closed"] = closed_accuracy(scorer, closed, answer_sets, blank=False)
        entry["closed_seconds"] = round(time.perf_counter() - t, 1)
        entry["closed_blank_image"] = closed_accuracy(scorer, closed, answer_sets, blank=True)
        print(
            f"{name}: closed {entry['closed']['accuracy']:.3f}  blank {entry['closed_blank_image']['accuracy']:.3f}"
            f"  text-only {entry['text_only_baseline_closed']:.3f}",
            flush=True,
        )
        if not args.no_open and opened:
            t = time.perf_counter()
            entry["open"] = open_scores(scorer, opened, args.max_new_tokens, blank=False)
            entry["open_seconds"] = round(time.perf_counter() - t, 1)
            entry["open_blank_image"] = open_scores(scorer, opened, args.max_new_tokens, blank=True)
            entry["text_only_baseline_open"] = baseline_open(baseline_all, opened)
            print(
                f"{name}: open exact {entry['open']['exact_match']:.3f} recall {entry['open']['token_recall']:.3f}"
                f"  blank exact {entry['open_blank_image']['exact_match']:.3f}"
                f"  text-only exact {entry['text_only_baseline_open']['exact_match']:.3f}",
                flush=True,
            )
        results["sets"][name] = entry
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_end"] = load_average()
    record = folder / "bedside-demo-vlm.json"
    if record.is_file():
        import json

        build = json.loads(record.read_text())
        results["build"] = {
            key: build.get(key) for key in ("recipe_version", "recipe", "build_seconds", "load_average", "training")
        }
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
