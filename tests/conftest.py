"""Shared pytest fixtures. Keep this file small and generic: only what several test modules need."""

import json
import os
from pathlib import Path

import pytest

# Tests run offline, like the product: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One timed pass per runtime measurement (runtimes.measure.WARM_PASS_ENV): speeds are benchmarks, not test results,
# and the warm pass doubles each measurement; tests of the warm pass itself ask for it explicitly.
os.environ.setdefault("BEDSIDE_MEASURE_WARM_PASS", "0")
# Under pytest-xdist (`make test` runs two workers on a 2-core machine) each worker gets one BLAS/OpenMP thread:
# two workers with two threads each would spin against each other.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Modules that share the session's demo exports: their GGUF tests run in one xdist group and their ONNX tests in
# another, so each export is made once and the two export families are made (and scored) in parallel.
SHARED_EXPORT_MODULES = ("test_evaluate.py", "test_exporters.py", "test_quant_methods.py")
ONNX_DEMO_SCHEMES = ("fp32", "int4_b32")


def xdist_group(nodeid: str) -> str:
    """A test's xdist group from its node id: its module (module fixtures are built once per worker), or for the
    modules sharing the demo exports, "demo-onnx" (ONNX tests) or "demo-gguf" (the rest)."""
    path, _, name = nodeid.partition("::")
    module = path.rsplit("/", 1)[-1]
    if module not in SHARED_EXPORT_MODULES:
        return module
    params = name.partition("[")[2]
    onnx = "onnx" in name.partition("[")[0] or any(scheme in params for scheme in ONNX_DEMO_SCHEMES)
    return "demo-onnx" if onnx else "demo-gguf"


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`-n N --dist loadgroup` hands out whole xdist groups (see xdist_group). pytest-xdist 3.8 marks a group by
    appending "@group" to an item's private `_nodeid`, which pytest 9.2's node ids no longer read (measured: one
    module's tests were spread over both workers and rebuilt their fixtures), so the scheduler asks xdist_group."""
    if config.getoption("dist", default="no") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist's workers (which collect), order the groups with the most heavy tests first, so the long
    groups start at once instead of finishing last on one worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    heavy: dict[str, int] = {}
    for item in items:
        group = xdist_group(item.nodeid)
        heavy[group] = heavy.get(group, 0) + (item.get_closest_marker("heavy") is not None)
    items.sort(key=lambda item: -heavy[xdist_group(item.nodeid)])  # stable: a module keeps its order


@pytest.fixture(scope="module")
def one_torch_thread() -> object:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on a
    shared 2-core machine, 2 threads spin against other work (10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """Factory: build(texts, chat_template) -> a byte-level BPE tokenizer (vocabulary 320) trained on `texts`,
    with ChatML-style special tokens and `chat_template`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def build(texts: list[str], chat_template: str) -> PreTrainedTokenizerFast:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            eos_token="<|im_end|>",
            bos_token="<|im_start|>",
            unk_token="<|endoftext|>",
        )
        tokenizer.chat_template = chat_template
        return tokenizer

    return build


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo checkpoint folder (`--model demo`); skips the test when set-up has not built it."""
    from toolkit.core import paths
    from toolkit.model.demo import REQUIRED_FILES

    folder = paths.demo_model_dir()
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"demo model not built at {folder} (missing {', '.join(missing)}): run `make setup`")
    return folder


@pytest.fixture(scope="session")
def demo_gguf_path() -> Path:
    """The original Q4_1 GGUF of the demo model; skips the test when set-up has not extracted it."""
    from toolkit.core import paths

    path = paths.demo_gguf_path()
    if not path.is_file():
        pytest.skip(f"demo GGUF not found at {path}: run `make setup`")
    return path


# ------------------------------------------------------------------------------------------------
# Demo exports, made once per session and shared by every module that reads them (test_exporters,
# test_evaluate). Read-only: a test that changes an export copies it first. Tests that use them are
# marked `heavy` (`make test-fast` skips them).


@pytest.fixture(scope="session")
def demo_gguf_export(demo_model_dir, tmp_path_factory):
    """The demo model converted once: Q4_K_M with the F16 kept (the source of every other GGUF scheme), with
    plan metadata (`bedside.plan`) for the metadata tests. An `exporters.ExportResult`."""
    from exporters import export

    return export(
        demo_model_dir,
        "gguf",
        "Q4_K_M",
        tmp_path_factory.mktemp("demo-gguf"),
        metadata={"plan": {"profile": "test", "scheme": "Q4_K_M"}, "layers_removed": []},
        keep_f16=True,
    )


@pytest.fixture(scope="session")
def demo_gguf_file(demo_gguf_export):
    """Factory: scheme -> the demo GGUF in that scheme, beside the export (F16 and Q4_K_M from the export,
    any other scheme quantized from the F16 on first use)."""
    from exporters.gguf_exporter import quantize

    folder = demo_gguf_export.model_file.parent
    files = {"F16": folder / "model-F16.gguf", "Q4_K_M": demo_gguf_export.model_file}

    def get(scheme: str) -> Path:
        if scheme not in files:
            target = folder / f"model-{scheme}.gguf"
            quantize(files["F16"], target, scheme, threads=1)
            files[scheme] = target
        return files[scheme]

    return get


@pytest.fixture(scope="session")
def demo_gguf_iq(demo_gguf_export):
    """The session's one IQ export of the demo: IQ4_XS quantized from the shared F16 with a constant (all-ones)
    importance matrix, beside the export. (GGUF path, imatrix path). On the 576-wide rows llama.cpp writes
    IQ4_NL instead (tensor_type_fallback); only ffn_down (1536 wide) holds IQ4_XS."""
    from exporters.gguf_exporter import _gguf_tensor_widths, quantize
    from exporters.gguf_imatrix import constant_imatrix, write_imatrix

    folder = demo_gguf_export.model_file.parent
    f16 = folder / "model-F16.gguf"
    _, _, widths = _gguf_tensor_widths(f16)
    sums, counts = constant_imatrix(
        {name: width for name, width in widths.items() if name.startswith("blk.")}
    )
    matrix = write_imatrix(
        folder / "imatrix-ones.gguf", sums, counts, datasets=["ones"], chunk_count=1, chunk_size=1
    )
    target = folder / "model-IQ4_XS.gguf"
    quantize(f16, target, "IQ4_XS", imatrix=matrix, threads=1)
    return target, matrix


@pytest.fixture(scope="session")
def demo_onnx_export(demo_model_dir, tmp_path_factory):
    """Factory: scheme -> the `exporters.ExportResult` of the demo model's ONNX export in that scheme (default
    options), exported on first use; optimum's own export (the float graph every scheme starts from) runs once."""
    import shutil

    from exporters import export, onnx_exporter

    results = {}
    graphs = tmp_path_factory.mktemp("demo-optimum-graphs")
    run_optimum_export = onnx_exporter.run_optimum_export

    def optimum_once(model_dir: Path, output: Path, dtype: str) -> None:
        """optimum's graph of the demo checkpoint is the same for every scheme (quantization rewrites it after):
        export it once per dtype and hand later exports a copy."""
        graph = graphs / dtype
        if not graph.is_dir():
            run_optimum_export(model_dir, output, dtype)
            shutil.copytree(output, graph)
        else:
            shutil.copytree(graph, output)

    def get(scheme: str):
        if scheme not in results:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(onnx_exporter, "run_optimum_export", optimum_once)
                results[scheme] = export(
                    demo_model_dir, "onnx", scheme, tmp_path_factory.mktemp(f"demo-onnx-{scheme}")
                )
        return results[scheme]

    return get


@pytest.fixture(scope="session")
def fake_checkpoint():
    """Factory: build(folder, tokenizer=True) -> a tiny Llama checkpoint folder whose config.json and
    model.safetensors agree (zero weights, for tests that resolve a checkpoint but never run it), with an
    empty tokenizer.json unless `tokenizer` is False."""
    import numpy as np
    from safetensors.numpy import save_file

    from toolkit.model.checkpoint import expected_tensors
    from toolkit.model.facts import facts_from_config

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 32,
        "max_position_embeddings": 64,
    }

    def build(folder: Path, tokenizer: bool = True) -> Path:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config))
        shapes = expected_tensors(facts_from_config(config))
        weights = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
        save_file(weights, str(folder / "model.safetensors"))
        if tokenizer:
            (folder / "tokenizer.json").write_text("{}")
        return folder

    return build


@pytest.fixture
def minimal_compression_record():
    """Factory: a valid compression.json content (toolkit.compress.record.CompressionRecord), to edit per test."""
    import dataclasses

    from toolkit.compress.record import CompressOptions

    def build(**changes) -> dict:
        record = {
            "bedside_version": "0.1.0",
            "model": {"name": "demo", "source": "/x", "source_sha256": "ab" * 32, "num_layers": 30},
            "options": dataclasses.asdict(CompressOptions(prune_layers=2, layers=(12, 13), quant="Q4_0")),
            "plan": None,
            "layers_removed": [12, 13],
            "num_layers_after": 28,
            "layer_scores": None,
            "selection": None,
            "quant": None,
            "awq": None,
            "heal": None,
            "calibration": {},
            "eval": {},
            "data_split": None,
            "quality": {"metric": "perplexity"},
            "stages": {},
            "checkpoint": {"path": "/x/checkpoint", "sha256": "cd" * 32},
            "imatrix": None,
            "seconds": 1.5,
        }
        record.update(changes)
        return record

    return build


@pytest.fixture(scope="session")
def tiny_llava(demo_model_dir, tmp_path_factory) -> Path:
    """The tiny random LLaVA checkpoint folder of tests/llava_fixture.py (llava-hf layout, processor included)."""
    from tests.llava_fixture import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava") / "checkpoint")


@pytest.fixture(scope="session")
def test_images(tmp_path_factory) -> list[Path]:
    """Three deterministic RGB PNGs of different sizes and aspect ratios."""
    from tests.llava_fixture import write_test_image

    folder = tmp_path_factory.mktemp("images")
    sizes = [(80, 72), (50, 130), (300, 200)]
    return [write_test_image(folder / f"image{i}.png", seed=i, size=size) for i, size in enumerate(sizes)]


@pytest.fixture(scope="session")
def image_qa_file(test_images, tmp_path_factory) -> Path:
    """A small image-QA JSONL in the SLAKE / VQA-RAD layout (image paths relative to the file), 60 items."""
    import json

    folder = test_images[0].parent
    organs = ["liver", "lung", "heart", "kidney", "spleen"]
    lines = []
    for number in range(60):
        image = test_images[number % len(test_images)]
        organ = organs[number % len(organs)]
        closed = number % 2 == 0
        lines.append({
            "id": str(number),
            "image": image.name,
            "question": f"Does the picture contain {organ}?" if closed else f"Which organ is abnormal near the {organ}?",
            "answer": ("Yes" if number % 3 else "No") if closed else organs[(number + 1) % len(organs)],
            "answer_type": "CLOSED" if closed else "OPEN",
        })
    path = folder / "qa.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
