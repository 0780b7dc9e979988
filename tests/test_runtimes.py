"""Runtimes: one Runner interface on torch, llama.cpp and ONNX Runtime, and child-process measurement.

Tiny random Llama models (built in tmp) check the torch runner against transformers directly and
the ONNX runner against torch on an optimum `text-generation-with-past` export. The real demo
GGUF (Q4_1, a quantized model) checks llama.cpp: tokenization, generation, batched quantized
decode (the AMX crash guard, run in a child so a segfault fails the test instead of pytest),
scoring. Broken artifacts must give one-line RuntimeLoadErrors naming the file.
"""

import json
import math
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from runtimes import (
    RUNNERS,
    LlamaCppRunner,
    OnnxRunner,
    RuntimeCrashError,
    RuntimeLoadError,
    TorchRunner,
    load_runner,
    log_softmax,
    runner_for_path,
    runtime_for_path,
)
from runtimes.gguf_header import read_gguf_header
from runtimes.llamacpp_runner import build_has_amx, default_mmap
from runtimes.measure import MeasureJob, measure_in_child
from runtimes.runner import render_chat_template, sample_token

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": "What is hypertension?"}]
CLINICAL_TEXT = (
    "The patient presented with chest pain and shortness of breath. An ECG showed ST elevation in "
    "leads II, III and aVF, consistent with an inferior myocardial infarction."
)


def _save_tiny_llama(folder, with_tokenizer=True, add_bos=False):
    """A 2-layer random Llama (GQA, tied embeddings) with a byte-level tokenizer and chat template; with
    `add_bos` the tokenizer puts its BOS (<|im_start|>, 257) before every text, as Gemma's puts <bos>."""
    import torch
    from tokenizers import Tokenizer, decoders, models, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(
        vocab_size=260,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=257,
        eos_token_id=258,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    if with_tokenizer:
        vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        if add_bos:
            tokenizer.post_processor = processors.TemplateProcessing(
                single="<|im_start|> $A", special_tokens=[("<|im_start|>", 257)]
            )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            unk_token="<|endoftext|>",
        )
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def tiny_onnx(tiny_hf, tmp_path_factory):
    from optimum.exporters.onnx import main_export

    output = tmp_path_factory.mktemp("tiny_onnx")
    main_export(str(tiny_hf), output=str(output), task="text-generation-with-past", do_validation=False)
    return output


@pytest.fixture(scope="module")
def torch_runner(tiny_hf):
    with TorchRunner().load(tiny_hf, n_ctx=128, n_threads=1, device="cpu") as runner:
        yield runner


@pytest.fixture(scope="module")
def onnx_runner(tiny_onnx):
    with OnnxRunner().load(tiny_onnx, n_ctx=128, n_threads=1, device="cpu") as runner:
        yield runner


@pytest.fixture(scope="module")
def llama_runner(demo_gguf_path):
    # One thread: on a shared 2-core machine OpenMP's spinning barriers make 2 threads 20x slower.
    with LlamaCppRunner().load(demo_gguf_path, n_ctx=256, n_threads=1, device="cpu") as runner:
        yield runner


# -- registry and formats ----------------------------------------------------------------------


def test_registry_names_the_three_runtimes():
    assert set(RUNNERS) == {"torch", "llama.cpp", "onnxruntime"}
    assert RUNNERS["llama.cpp"] is LlamaCppRunner


def test_runner_for_path_chooses_by_format(tiny_hf, tiny_onnx, tmp_path):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert runner_for_path(gguf_file) is LlamaCppRunner
    assert runtime_for_path(tiny_onnx) == "onnxruntime"
    assert runtime_for_path(tiny_onnx / "model.onnx") == "onnxruntime"
    assert runner_for_path(tiny_hf) is TorchRunner
    (tmp_path / "folder").mkdir()
    shutil.copy(gguf_file, tmp_path / "folder" / "x.gguf")
    assert runtime_for_path(tmp_path / "folder") == "llama.cpp"
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeLoadError, match="empty: no model found"):
        runner_for_path(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RuntimeLoadError, match="notes.txt: unknown artifact type"):
        runner_for_path(tmp_path / "notes.txt")
    with pytest.raises(RuntimeLoadError, match="no such file"):
        runtime_for_path(tmp_path / "nothing_here")


def test_wrong_runtime_for_a_file_is_a_clear_error(tiny_onnx, tiny_hf):
    with pytest.raises(
        RuntimeLoadError, match=r"an ONNX export cannot run on llama.cpp; use runtime onnxruntime"
    ):
        LlamaCppRunner().load(tiny_onnx, n_ctx=32)
    with pytest.raises(RuntimeLoadError, match="a Hugging Face checkpoint cannot run on onnxruntime"):
        OnnxRunner().load(tiny_hf, n_ctx=32)


# -- shared numerics ----------------------------------------------------------------------------


def test_log_softmax_and_sampling():
    logits = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    rows = log_softmax(logits)
    assert np.all(np.isfinite(rows[1])) and np.allclose(np.exp(rows).sum(axis=1), 1.0, atol=1e-6)
    rng = np.random.default_rng(0)
    assert sample_token(logits[1], greedy=True, temperature=1, top_k=0, top_p=1, rng=rng) == 2
    draws = {
        sample_token(logits[1], greedy=False, temperature=1, top_k=2, top_p=1, rng=rng) for _ in range(50)
    }
    assert draws == {1, 2}  # top-k 2 never draws the third token


def test_plain_transcript_without_a_chat_template():
    assert render_chat_template(None, MESSAGES) == "user: What is hypertension?\nassistant:"


# -- torch --------------------------------------------------------------------------------------


def test_torch_runner_matches_the_model_called_directly(tiny_hf, torch_runner):
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch_runner.tokenize("The patient has a fever and a cough.")
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        direct = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1).numpy()
    full = torch_runner.logprobs_full(ids)
    assert full.shape == (len(ids), 260)
    np.testing.assert_allclose(full, direct, atol=1e-5)
    np.testing.assert_allclose(
        torch_runner.token_logprobs(ids), direct[np.arange(len(ids) - 1), ids[1:]], atol=1e-5
    )

    torch_runner.batch_size = 5  # the KV-cache path in small batches gives the same numbers
    try:
        np.testing.assert_allclose(torch_runner.logprobs_full(ids), direct, atol=1e-5)
    finally:
        torch_runner.batch_size = TorchRunner.default_batch_size

    prompt = torch_runner.prompt_ids(MESSAGES)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    result = torch_runner.generate(MESSAGES, max_new_tokens=6)
    assert result.token_ids == expected[0, len(prompt) :].tolist()


def test_option_scoring_sums_the_option_tokens(torch_runner):
    prompt = torch_runner.tokenize("Is aspirin an antiplatelet drug? Answer:")
    options = [torch_runner.tokenize(" yes"), torch_runner.tokenize(" no way")]
    scores = torch_runner.option_logprobs(prompt, options)
    for option, score in zip(options, scores, strict=True):
        expected = torch_runner.token_logprobs(prompt + option)[len(prompt) - 1 :].sum()
        assert score == pytest.approx(float(expected), abs=1e-5) and score < 0


def test_torch_generation_streams_and_sampling_repeats_with_a_seed(torch_runner):
    pieces = []
    result = torch_runner.generate("Hello", max_new_tokens=8, greedy=False, seed=7, stream=pieces.append)
    again = torch_runner.generate("Hello", max_new_tokens=8, greedy=False, seed=7)
    assert result.token_ids == again.token_ids and len(result.token_ids) > 0
    assert "".join(pieces) == result.text
    assert result.prompt_tokens == len(torch_runner.tokenize("Hello", add_special=True))


def test_torch_runner_without_tokenizer_is_a_clear_error(tmp_path):
    folder = _save_tiny_llama(tmp_path / "no_tokenizer", with_tokenizer=False)
    with pytest.raises(RuntimeLoadError, match=r"no_tokenizer: no tokenizer"):
        TorchRunner().load(folder, n_ctx=32)


def test_scoring_longer_than_the_context_is_refused(torch_runner):
    with pytest.raises(ValueError, match="exceed the context"):
        torch_runner.token_logprobs(list(range(129)))


# -- ONNX Runtime -------------------------------------------------------------------------------


def test_optimum_export_has_the_inputs_the_onnx_runner_drives(tiny_onnx):
    import onnxruntime as ort

    session = ort.InferenceSession(str(tiny_onnx / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {item.name: item.shape for item in session.get_inputs()}
    outputs = {item.name for item in session.get_outputs()}
    assert {"input_ids", "attention_mask", "position_ids"} <= set(inputs)
    assert inputs["past_key_values.1.value"][1:4:2] == [2, 8]  # [batch, kv_heads, past, head_dim]
    assert {"logits", "present.0.key", "present.1.value"} <= outputs


def test_onnx_runner_matches_torch(onnx_runner, torch_runner):
    text = "Chest pain <|im_end|> radiating to the left arm."
    ids = torch_runner.tokenize(text)
    assert onnx_runner.tokenize(text) == ids and 258 in ids  # special-token text parsed the same way
    assert onnx_runner.tokenize(text, add_special=True) == torch_runner.tokenize(text, add_special=True)
    np.testing.assert_allclose(onnx_runner.logprobs_full(ids), torch_runner.logprobs_full(ids), atol=1e-4)
    onnx_runner.batch_size = 4  # KV cache carried across ONNX calls
    try:
        np.testing.assert_allclose(
            onnx_runner.token_logprobs(ids), torch_runner.token_logprobs(ids), atol=1e-4
        )
    finally:
        onnx_runner.batch_size = OnnxRunner.default_batch_size
    assert onnx_runner.apply_chat_template(MESSAGES) == torch_runner.apply_chat_template(MESSAGES)
    assert (
        onnx_runner.generate(MESSAGES, max_new_tokens=8).token_ids
        == torch_runner.generate(MESSAGES, max_new_tokens=8).token_ids
    )
    sampled = {"greedy": False, "seed": 3, "max_new_tokens": 8}
    assert (
        onnx_runner.generate(MESSAGES, **sampled).token_ids
        == torch_runner.generate(MESSAGES, **sampled).token_ids
    )


def test_broken_onnx_exports_are_clear_errors(tiny_onnx, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_onnx, truncated)
    data = (tiny_onnx / "model.onnx").read_bytes()
    (truncated / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(RuntimeLoadError, match=r"truncated/model.onnx: onnxruntime cannot load it") as caught:
        OnnxRunner().load(truncated, n_ctx=32, device="cpu")
    assert "\n" not in str(caught.value)

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny_onnx / "model.onnx", no_tokenizer / "model.onnx")
    with pytest.raises(RuntimeLoadError, match=r"no_tokenizer: no tokenizer"):
        OnnxRunner().load(no_tokenizer, n_ctx=32, device="cpu")

    import onnx

    too_new = tmp_path / "ir14"
    shutil.copytree(tiny_onnx, too_new)
    model = onnx.load(str(too_new / "model.onnx"))
    model.ir_version = 14
    onnx.save(model, str(too_new / "model.onnx"))
    with pytest.raises(RuntimeLoadError, match=r"Unsupported model IR version: 14.*re-export"):
        OnnxRunner().load(too_new, n_ctx=32, device="cpu")


# -- llama.cpp on the demo GGUF -----------------------------------------------------------------


@pytest.mark.demo
def test_llama_tokenization_matches_the_gguf_vocabulary(llama_runner, demo_gguf_path, demo_model_dir):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json"))
    for text in (CLINICAL_TEXT, "Give 250 µg IV; SpO₂ 94 %", "<|im_start|>user\nhi<|im_end|>"):
        assert llama_runner.tokenize(text) == reference.encode(text, add_special_tokens=False).ids
    assert llama_runner.detokenize(llama_runner.tokenize(CLINICAL_TEXT)) == CLINICAL_TEXT


@pytest.mark.demo
def test_llama_generates_with_the_gguf_chat_template(llama_runner):
    prompt = llama_runner.apply_chat_template(MESSAGES)
    assert prompt.endswith("<|im_start|>user\nWhat is hypertension?<|im_end|>\n<|im_start|>assistant\n")
    pieces = []
    result = llama_runner.generate(MESSAGES, max_new_tokens=12, stream=pieces.append)
    assert result.text.strip() and "".join(pieces) == result.text
    assert "hypertension" in result.text.lower() or "blood" in result.text.lower()
    sampled = [
        llama_runner.generate(MESSAGES, max_new_tokens=6, greedy=False, seed=5).token_ids for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


@pytest.mark.demo
def test_llama_batched_quantized_decode_and_scoring(llama_runner):
    """A batch of many tokens through Q4_1 weights: the path that segfaults under llama.cpp's AMX backend."""
    ids = llama_runner.tokenize(CLINICAL_TEXT)
    assert len(ids) >= 16
    llama_runner.reset()
    batched = llama_runner.forward(ids, all_logits=True)
    llama_runner.reset()
    sequential = np.concatenate([llama_runner.forward([token]) for token in ids])
    llama_runner.reset()
    assert batched.shape == (len(ids), llama_runner.vocab_size) and np.all(np.isfinite(batched))
    # Batched and one-by-one decode differ only by llama.cpp's kernel rounding (measured KL ~0.005).
    kl = np.sum(np.exp(log_softmax(batched)) * (log_softmax(batched) - log_softmax(sequential)), axis=1)
    assert kl.mean() < 0.05
    assert np.mean(batched.argmax(axis=1) == sequential.argmax(axis=1)) >= 0.8

    logprobs = llama_runner.token_logprobs(ids)
    assert logprobs.shape == (len(ids) - 1,) and np.all(np.isfinite(logprobs)) and np.all(logprobs <= 0)
    np.testing.assert_allclose(logprobs, log_softmax(batched)[np.arange(len(ids) - 1), ids[1:]], atol=1e-4)
    assert math.exp(-logprobs.mean()) < 100  # real English text under a real model


NOTES = Path(__file__).parent / "fixtures" / "eval" / "clinical_notes.txt"
# Measured on the demo GGUF (Q4_1), 335 predicted positions of NOTES, one thread, CPU (docs/RUNTIMES.md, "KV-cache
# precision"): q8_0 against f16 KL 0.0049 nats, top-1 agreement 0.967, mean log-likelihood -0.003 nats apart;
# q4_0 KL 0.055, top-1 0.872. Flash attention (on for a quantized cache) alone moves an f16 run by KL 0.0046.
KV_Q8_0_MAX_KL, KV_Q8_0_MIN_TOP1, KV_Q8_0_MAX_NLL_DIFF = 0.01, 0.93, 0.02


def test_kv_cache_options_map_to_llama_cpp():
    import llama_cpp

    from runtimes.llamacpp_runner import ggml_type, runner_options

    assert ggml_type("f16") == llama_cpp.GGML_TYPE_F16 == 1
    assert (
        ggml_type("q8_0") == llama_cpp.GGML_TYPE_Q8_0 == 8
        and ggml_type("q4_0") == llama_cpp.GGML_TYPE_Q4_0 == 2
    )
    runtime = {
        "kv_cache_dtype": "q4_0",
        "flash_attn": True,
        "kv_offload": False,
        "gpu_layers": 20,
        "mmap": False,
    }
    assert runner_options(runtime) == {
        "kv_cache_dtype": "q4_0",
        "flash_attn": True,
        "kv_offload": False,
        "gpu_layers": 20,
    }
    assert runner_options({"gpu_layers": -1, "kv_offload": True}) == {}  # every layer: the runner's default
    with pytest.raises(RuntimeLoadError, match="needs flash attention"):
        LlamaCppRunner(kv_cache_dtype="q8_0", flash_attn=False)
    with pytest.raises(RuntimeLoadError, match="unknown KV-cache dtype"):
        LlamaCppRunner(kv_cache_dtype="q2")


@pytest.mark.demo
@pytest.mark.heavy
def test_llama_runs_a_quantized_kv_cache_close_to_f16(demo_gguf_path):
    """type_k / type_v reach llama.cpp: q8_0 scores close to f16 (measured tolerance above), q4_0 clearly less so."""
    scores, details = {}, {}
    for kv in ("f16", "q8_0", "q4_0"):
        with LlamaCppRunner(kv_cache_dtype=kv).load(
            demo_gguf_path, n_ctx=512, n_threads=1, device="cpu"
        ) as runner:
            ids = runner.tokenize(NOTES.read_text(encoding="utf-8"))[:336]
            scores[kv] = runner.logprobs_full(ids)
            details[kv] = dict(runner.details)
    assert details["f16"]["flash_attn"] is False and details["q8_0"]["flash_attn"] is True
    assert details["q8_0"]["kv_cache_dtype"] == "q8_0" and details["q4_0"]["kv_cache_dtype"] == "q4_0"
    reference = scores["f16"]
    positions = np.arange(len(ids) - 1)

    def compare(kv: str) -> tuple[float, float, float]:
        p = np.exp(reference.astype(np.float64))
        kl = float((p * (reference - scores[kv])).sum(axis=1).mean())
        top1 = float(np.mean(reference.argmax(axis=1) == scores[kv].argmax(axis=1)))
        nll = float(scores[kv][positions, ids[1:]].mean() - reference[positions, ids[1:]].mean())
        return kl, top1, nll

    kl8, top8, nll8 = compare("q8_0")
    assert 0 < kl8 < KV_Q8_0_MAX_KL and top8 >= KV_Q8_0_MIN_TOP1 and abs(nll8) < KV_Q8_0_MAX_NLL_DIFF
    kl4, _, _ = compare("q4_0")
    assert kl4 > 4 * kl8  # the cache's precision really changed


@pytest.mark.demo
def test_llama_crash_guard_matches_the_build(llama_runner):
    assert llama_runner.details["extra_buffers"] is (not build_has_amx())
    assert llama_runner.device == "cpu"


@pytest.mark.demo
def test_llama_reads_rather_than_maps_files_it_repacks(llama_runner):
    """Repack buffers on the CPU: the file is read, so repacked weights are not resident twice."""
    assert llama_runner.details["mmap"] is default_mmap(llama_runner.details["extra_buffers"], offload=False)
    assert default_mmap(extra_buffers=True, offload=False) is False
    assert default_mmap(extra_buffers=False, offload=False) is True  # AMX builds: nothing repacked
    assert default_mmap(extra_buffers=True, offload=True) is True  # weights live on the GPU


@pytest.mark.demo
def test_broken_gguf_files_are_clear_errors(demo_gguf_path, tmp_path):
    header = read_gguf_header(demo_gguf_path)
    assert header.architecture == "llama" and header.data_bytes_needed == demo_gguf_path.stat().st_size

    truncated = tmp_path / "truncated.gguf"
    with open(demo_gguf_path, "rb") as source:
        truncated.write_bytes(source.read(demo_gguf_path.stat().st_size // 2))
    with pytest.raises(RuntimeLoadError, match=r"truncated.gguf: truncated GGUF file \(49,181,216 bytes"):
        LlamaCppRunner().load(truncated, n_ctx=32)

    cut_header = tmp_path / "cut_header.gguf"
    with open(demo_gguf_path, "rb") as source:
        cut_header.write_bytes(source.read(4096))
    with pytest.raises(RuntimeLoadError, match="cut_header.gguf: truncated inside the GGUF header"):
        LlamaCppRunner().load(cut_header, n_ctx=32)

    not_gguf = tmp_path / "renamed.gguf"
    not_gguf.write_text("this is not a model")
    with pytest.raises(RuntimeLoadError, match="renamed.gguf: not a GGUF file"):
        load_runner(not_gguf, n_ctx=32)


@pytest.mark.demo
@pytest.mark.slow
def test_llama_scores_like_the_reference_checkpoint(llama_runner, demo_model_dir):
    """The demo checkpoint was dequantized from this GGUF: llama.cpp and torch must nearly agree."""
    ids = llama_runner.tokenize(CLINICAL_TEXT)
    with TorchRunner().load(demo_model_dir, n_ctx=256, n_threads=1, device="cpu") as reference:
        assert reference.tokenize(CLINICAL_TEXT) == ids
        expected = reference.logprobs_full(ids)
        reference_answer = reference.generate(MESSAGES, max_new_tokens=8).text
    actual = llama_runner.logprobs_full(ids)
    kl = np.sum(np.exp(expected) * (expected - actual), axis=1).mean()
    assert kl < 0.02
    assert np.mean(expected.argmax(axis=1) == actual.argmax(axis=1)) >= 0.9
    assert llama_runner.generate(MESSAGES, max_new_tokens=8).text == reference_answer


# -- measurement in a child process ---------------------------------------------------------------


@pytest.mark.demo
def test_measure_llama_in_a_child_fills_the_context(demo_gguf_path, tmp_path):
    """Also the AMX crash guard's proof: the child prefills 120 Q4_1 tokens in one batch.

    The parent holds 256 MB while it waits: the child's peak must not include it (getrusage's
    ru_maxrss would, since it survives exec).
    """
    parent_ballast = np.ones(32 * 2**20, dtype=np.float64)
    score_ids = list(range(100, 140))
    job = MeasureJob(
        context=128,
        decode_tokens=8,
        n_threads=1,
        device="cpu",
        score_ids=score_ids,
        score_full_path=str(tmp_path / "logprobs.npy"),
    )
    result = measure_in_child("llama.cpp", demo_gguf_path, job, timeout_s=600)
    assert result.runtime == "llama.cpp" and result.device == "cpu" and result.context == 128
    assert result.prefill_tokens == 120 and result.decode_tokens == 8
    assert result.load_seconds > 0 and result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert 0 < result.baseline_rss_bytes < result.loaded_rss_bytes <= result.peak_rss_bytes
    # The Q4_1 file is 98 MB and mapped in full once every layer has run.
    assert 90e6 < result.peak_rss_bytes - result.baseline_rss_bytes < 200e6
    assert result.peak_rss_bytes < parent_ballast.nbytes
    assert result.peak_vram_bytes is None
    assert len(result.score.token_logprobs) == len(score_ids) - 1
    assert all(math.isfinite(v) and v <= 0 for v in result.score.token_logprobs)
    full = np.load(result.score.full_logprobs_path)
    np.testing.assert_allclose(full[np.arange(39), score_ids[1:]], result.score.token_logprobs, atol=1e-5)
    round_trip = type(result).from_dict(json.loads(result.to_json()))
    assert round_trip.peak_rss_bytes == result.peak_rss_bytes


def test_measure_onnx_in_a_child(tiny_onnx):
    result = measure_in_child(
        "onnxruntime",
        tiny_onnx,
        MeasureJob(context=64, decode_tokens=4, n_threads=1, device="cpu"),
        timeout_s=300,
    )
    assert result.device == "cpu" and result.prefill_tokens == 60
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert result.peak_rss_bytes > result.baseline_rss_bytes > 0


def test_torch_and_onnx_score_the_same_windows_opened_by_bos(tiny_hf, tiny_onnx, tmp_path):
    """A tokenizer that adds a BOS (Gemma's <bos>) opens every scoring window with it, counted in the window
    length, on torch and ONNX Runtime alike (llama.cpp: tests/test_gemma.py); without one, windows stay plain
    slices of the text's ids."""
    from runtimes.measure import run_job

    hf_bos = _save_tiny_llama(tmp_path / "hf", add_bos=True)  # the same weights (seed 0)
    onnx_bos = Path(shutil.copytree(tiny_onnx, tmp_path / "onnx"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_bos / name).is_file():
            shutil.copy(hf_bos / name, onnx_bos / name)
    job = MeasureJob(
        context=64, decode_tokens=4, n_threads=1, device="cpu",
        score_texts=[CLINICAL_TEXT], score_seq_len=32, score_max_tokens=100,
    )  # fmt: skip
    plain = run_job("torch", tiny_hf, job).score
    on_torch = run_job("torch", hf_bos, job).score
    on_onnx = run_job("onnxruntime", onnx_bos, job).score
    with TorchRunner().load(tiny_hf, n_ctx=64, n_threads=1, device="cpu") as runner:
        text = runner.tokenize(CLINICAL_TEXT)[:100]
    assert plain.token_ids == text and plain.window_lengths == [32, 32, 32, 4]
    expected = [token for start in range(0, 100, 31) for token in [257, *text[start : start + 31]]]
    assert on_torch.token_ids == on_onnx.token_ids == expected
    assert on_torch.window_lengths == on_onnx.window_lengths == [32, 32, 32, 8]
    assert len(on_torch.token_logprobs) == 100  # every text token is predicted, the first from the BOS
    np.testing.assert_allclose(on_onnx.token_logprobs, on_torch.token_logprobs, atol=1e-4)


def test_a_crash_in_the_child_becomes_a_clear_error(tmp_path):
    artifact = tmp_path / "model.gguf"
    artifact.write_bytes(b"GGUF")
    with pytest.raises(RuntimeCrashError) as caught:
        measure_in_child("llama.cpp", artifact, MeasureJob(kind="crash-test"), timeout_s=120)
    message = str(caught.value)
    assert isinstance(caught.value, RuntimeLoadError)
    assert message.startswith(f"llama.cpp crashed (signal {int(signal.SIGSEGV)}, SIGSEGV) while running")
    assert "model.gguf" in message and "\n" not in message


def test_a_load_error_in_the_child_is_reraised(tmp_path):
    artifact = tmp_path / "broken.gguf"
    artifact.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(RuntimeLoadError, match="broken.gguf: truncated inside the GGUF header"):
        measure_in_child("llama.cpp", artifact, MeasureJob(context=32, decode_tokens=2), timeout_s=120)
