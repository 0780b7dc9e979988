"""`bedside eval` and `bedside run` on image questions with a LLaVA checkpoint (the torch reference runtime)."""

from __future__ import annotations

import json

import pytest

from tests.cli_runner import assert_one_line_error
from tests.cli_runner import bedside as run_bedside
from toolkit.validate.evaluate import image_accuracy, image_items


@pytest.fixture(scope="module")
def eval_json(tiny_llava, image_qa_file):
    result = run_bedside(
        "eval", "--artifact", str(tiny_llava), "--data", str(image_qa_file), "--reference", str(tiny_llava),
        "--context", "128", "--max-items", "8", "--json",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.heavy
def test_eval_reports_closed_and_open_accuracy_with_counts(eval_json):
    accuracy = eval_json["accuracy"]
    assert accuracy["closed"]["n"] == 4 and accuracy["open"]["n"] == 4
    assert 0.0 <= accuracy["closed"]["value"] <= 1.0
    # the reference is the same checkpoint: its figures are the artifact's, bit for bit
    assert accuracy["closed"]["reference"] == accuracy["closed"]["value"]
    assert accuracy["open"]["reference"] == accuracy["open"]["value"]
    assert accuracy["reference_perplexity"] == pytest.approx(eval_json["perplexity"], rel=1e-6)
    assert eval_json["perplexity"] > 1.0 and eval_json["tokens"] >= 8
    assert "overall" not in accuracy  # no text multiple choice in an image-QA file


def test_accuracy_rules_on_known_scores(image_qa_file):
    from toolkit.data.sources import load_image_question_answer_jsonl

    documents = load_image_question_answer_jsonl(image_qa_file)[:4]
    items, chosen = image_items(documents, max_items=4)
    assert [item["options"] is not None for item in items] == [True, False, True, False]
    assert items[0]["options"] == ["No", "Yes"] or set(items[0]["options"]) == {"Yes", "No"}
    assert items[0]["messages"][0]["content"].startswith("<image>\n")
    right = items[0]["options"].index(chosen[0].answer)
    results = [
        {"options": [0.0 if i == right else -5.0 for i in range(2)], "generated": None, "answer_logprobs": [-1.0]},
        {"options": None, "generated": f"the {chosen[1].answer}.", "answer_logprobs": [-2.0]},
        {"options": [0.0 if i != items[2]["options"].index(chosen[2].answer) else -5.0 for i in range(2)],
         "generated": None, "answer_logprobs": [-1.0]},
        {"options": None, "generated": "something else", "answer_logprobs": [-2.0]},
    ]
    accuracy = image_accuracy(results, items)
    assert accuracy["closed"] == {"value": 0.5, "n": 2}
    assert accuracy["open"]["value"] == 0.5 and accuracy["open"]["n"] == 2


def test_run_streams_an_answer_about_an_image(tiny_llava, test_images):
    result = run_bedside(
        "run", str(tiny_llava), "--image", str(test_images[0]), "--prompt", "Is this a CT?", "--max-tokens", "3",
        "--json", "--context", "128",
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["tokens"] == 3
    assert answer["prompt_tokens"] > 16  # the image's 16 positions are in the prompt


@pytest.mark.parametrize("case", ["missing", "not-an-image", "text-model"])
def test_bad_image_input_is_one_line_exit_2(case, tiny_llava, demo_model_dir, tmp_path, test_images):
    artifact, image = tiny_llava, test_images[0]
    if case == "missing":
        image = tmp_path / "absent.jpg"
    elif case == "not-an-image":
        image = tmp_path / "scan.jpg"
        image.write_bytes(b"\x00\x01 not a jpeg")
    else:
        artifact = demo_model_dir
    result = run_bedside("run", str(artifact), "--image", str(image), "--prompt", "Is this a CT?", "--context", "128")
    assert_one_line_error(result, {"missing": "not found", "not-an-image": "cannot be read", "text-model": "no vision tower"}[case])
