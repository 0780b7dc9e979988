"""Shared pytest fixtures. Keep this file small and generic: only what several test modules need."""

import os
from pathlib import Path

import pytest

# Tests run offline, like the product: nothing may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
