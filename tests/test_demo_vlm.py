"""The demo VLM builder's parts (toolkit/model/demo_vlm.py) on small synthetic inputs.

The build itself (about 20 minutes) is measured by bench/demo_vlm.py, not here; these tests check what
its figures rest on: the per-image labels and label words, the packed sequences' block mask (equal to
single-turn prompts), the projector's word alignment, the LoRA merge, the record check and the
one-line error without the shared data.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from toolkit.core.errors import BedsideError
from toolkit.data.documents import Document
from toolkit.model import demo_vlm
from toolkit.model.demo_vlm import (
    RECIPE,
    TrainingData,
    image_label_words,
    label_heads,
    label_token_ids,
    pretrain_projector,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qa(image: Path, question: str, answer: str, kind: str) -> Document:
    return Document(text=f"{question}\n{answer}", question=question, answer=answer, image=image, answer_type=kind)


@pytest.fixture
def synthetic_data(tmp_path: Path) -> TrainingData:
    ct, mri, xray = tmp_path / "ct.jpg", tmp_path / "mri.jpg", tmp_path / "xray.jpg"
    documents = [
        _qa(ct, "Does the picture contain liver?", "Yes", "CLOSED"),
        _qa(ct, "What modality is used?", "CT", "OPEN"),
        _qa(ct, "Which organ is the largest, in 2 words?", "Left lung", "OPEN"),
        _qa(mri, "Does the picture contain liver?", "No", "CLOSED"),
        _qa(mri, "Is there a tumor in this image?", "yes", "CLOSED"),
        _qa(mri, "What modality is used?", "MRI", "OPEN"),
        _qa(xray, "Does the picture contain liver?", "No", "CLOSED"),
        _qa(xray, "What modality is used?", "X-Ray", "OPEN"),
    ]
    labels = {
        str(ct): {"modality": "ct", "location": "abdomen"},
        str(mri): {"modality": "mri", "location": "brain"},
        str(xray): {"organ": "chest"},
    }
    return TrainingData(documents=documents, images=[ct, mri, xray], labels=labels)


def test_label_heads_take_labels_regions_and_frequent_questions(synthetic_data: TrainingData) -> None:
    heads = label_heads(synthetic_data, min_questions=3)
    names = heads.names
    assert names[:3] == ["label:modality", "label:location", "label:region"]
    # "Does the picture contain liver?" is asked 3 times but "yes" only once: fewer than two answers seen twice
    assert all(not name.startswith("question:") for name in names)
    modality = heads.classes[0]
    assert modality == ["ct", "mri"]
    ct, mri, xray = heads.targets
    assert ct[0] == modality.index("ct") and mri[0] == modality.index("mri")
    assert xray[0] == -100  # VQA-RAD-like image: no modality label
    region = heads.classes[2]
    assert [region[t] if t >= 0 else None for t in (ct[2], mri[2], xray[2])] == ["abdomen", "head", "chest"]

    more = replace(synthetic_data, documents=synthetic_data.documents * 2)
    question = "question:does picture contain liver"  # normalised: articles dropped
    heads = label_heads(more, min_questions=3)
    assert question in heads.names
    h = heads.names.index(question)
    assert heads.classes[h] == ["no", "yes"]
    assert [row[h] for row in heads.targets] == [1, 0, 0]


def test_image_label_words_come_from_labels_open_answers_and_yes_presence_questions(
    synthetic_data: TrainingData,
) -> None:
    words = image_label_words(synthetic_data)
    ct, mri, xray = synthetic_data.images
    # labels (ct, abdomen), open answers (ct, left, lung), presence answered yes (liver); "2", "in" left out
    assert words[ct] == ["abdomen", "ct", "left", "liver", "lung"]
    # "Is there a tumor in this image?" yes -> "a tumor"; "a" is one letter and left out
    assert words[mri] == ["brain", "mri", "tumor"]
    assert words[xray] == ["chest", "ray"]  # "X-Ray" normalises to "x ray"; one-letter words are left out


class _Tokenizer:
    """Each surface form maps to a fixed id list (its "tokens")."""

    def __init__(self, table: dict[str, list[int]]) -> None:
        self.table = table

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.table[text]}


def test_label_token_ids_take_the_form_with_fewest_tokens_then_the_most_used() -> None:
    tokenizer = _Tokenizer({" ct": [1, 2], " Ct": [3, 4], " CT": [5], " liver": [6], " Liver": [7], " LIVER": [8, 9]})
    assert label_token_ids(tokenizer, "ct", Counter()) == [5]
    usage = Counter({"Liver": 3, "liver": 1})
    assert label_token_ids(tokenizer, "liver", usage) == [7]
    assert label_token_ids(tokenizer, "liver", Counter({"liver": 5})) == [6]


def _projector(features_dim: int, hidden: int) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=features_dim),
        text_config=LlamaConfig(hidden_size=hidden),
    )
    return LlavaMultiModalProjector(config)


def test_projector_pretraining_makes_image_tokens_read_as_the_images_words() -> None:
    torch.manual_seed(0)
    vocab, hidden, dim, tokens = 64, 32, 24, 6
    embeddings = torch.randn(vocab, hidden) * 0.05
    words = {"alpha": [10], "beta": [20], "gamma": [30], "delta": [40]}
    table = {f" {form}": ids for word, ids in words.items() for form in (word, word.capitalize())}
    tokenizer = _Tokenizer(table | {f" {word.upper()}": [ids[0], 63] for word, ids in words.items()})
    centres = torch.randn(2, dim) * 3
    features = torch.cat([centres[i % 2] + 0.3 * torch.randn(1, tokens, dim) for i in range(16)])
    image_words = [["alpha", "beta"] if i % 2 == 0 else ["gamma", "delta"] for i in range(16)]
    projector = _projector(dim, hidden)
    demo_vlm.init_projector(projector, features, embeddings, seed=1)
    recipe = replace(RECIPE, verbal_epochs=60, verbal_negatives=vocab)
    figures = pretrain_projector(recipe, projector, features, image_words, Counter(), tokenizer, embeddings, False)

    losses = figures["epoch_word_loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert figures["label_tokens"] == 4
    bank = torch.nn.functional.normalize(embeddings, dim=-1)
    with torch.no_grad():
        read = (torch.nn.functional.normalize(projector(features), dim=-1) @ bank.T).argmax(-1)
        norms = projector(features).norm(dim=-1)
    for i in range(16):
        expected = {10, 20} if i % 2 == 0 else {30, 40}
        assert expected <= set(read[i].tolist()), (i, read[i].tolist())
    median = embeddings.norm(dim=-1).median()
    assert torch.allclose(norms.mean(), median, rtol=0.2)


def test_init_projector_puts_image_tokens_at_the_embeddings_mean_and_spread() -> None:
    torch.manual_seed(1)
    embeddings = torch.randn(500, 48) * 0.02 + 0.01
    features = torch.randn(40, 9, 16) * 150 + 30  # raw tower states: far from the embeddings' scale
    projector = _projector(16, 48)
    demo_vlm.init_projector(projector, features, embeddings, seed=2)
    with torch.no_grad():
        out = projector(features).reshape(-1, 48)
    assert out.mean().item() == pytest.approx(embeddings.mean().item(), abs=0.005)
    assert out.std().item() == pytest.approx(embeddings.std().item(), rel=0.25)


def _tiny_llama(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def test_packed_sequence_block_mask_equals_single_turn_prompts(demo_model_dir: Path, tmp_path: Path) -> None:
    """Three questions packed behind one image prefix give each answer the logits of its own single-turn prompt."""
    from transformers import AutoTokenizer

    from toolkit.core.vision import IMAGE_MARKER

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    language = _tiny_llama(len(tokenizer))
    image = tmp_path / "a.jpg"
    documents = [
        _qa(image, "Is this a CT?", "Yes", "CLOSED"),
        _qa(image, "Which organ is shown on the left side?", "Liver", "OPEN"),
        _qa(image, "Is it normal?", "No", "CLOSED"),
    ]
    data = TrainingData(documents=documents, images=[image])
    parts = demo_vlm.prompt_parts(tokenizer, image_tokens=4)
    packed = demo_vlm.pack_sequences(data, tokenizer, parts, 8, torch.Generator().manual_seed(0))
    assert len(packed) == 1
    batch = demo_vlm.collate(packed, pad_id=0)
    language.model.embed_tokens.weight.data[parts.image_token_id] = torch.randn(32)
    with torch.no_grad():
        embeds = language.model.embed_tokens(batch["input_ids"])
        hidden = demo_vlm._run_layers(language.model, list(language.model.layers), embeds, batch)
        packed_logits = language.lm_head(language.model.norm(hidden))[0]
    item = packed[0]
    prefix = len(parts.prefix)
    for k in (1, 2, 3):
        where = [i for i, s in enumerate(item.segments) if s == k]
        single = torch.tensor([parts.prefix + [item.input_ids[i] for i in where]])
        with torch.no_grad():
            logits = language(input_ids=single).logits[0]
        assert item.positions[where[0]] == prefix
        assert torch.allclose(packed_logits[where], logits[prefix:], atol=1e-4), k
        answer = [i for i in where if item.labels[i] >= 0]
        assert answer, "every segment has answer tokens in the loss"


def test_lora_merge_adds_the_delta_to_the_float32_originals() -> None:
    from peft import LoraConfig, get_peft_model

    language = _tiny_llama(50).model
    original = {name: tensor.detach().clone() for name, tensor in language.state_dict().items()}
    language.to(torch.bfloat16)
    peft_model = get_peft_model(
        language, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0)
    )
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0, 0.1)
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight.float(), module.lora_B["default"].weight.float()
            deltas[f"{name}.weight"] = b @ a * module.scaling["default"]
    merged = demo_vlm._merge_lora(peft_model, original)
    state = merged.state_dict()
    assert all(tensor.dtype == torch.float32 for tensor in state.values())
    assert len(deltas) == 6
    for name, tensor in original.items():
        expected = tensor + deltas[name] if name in deltas else tensor
        assert torch.equal(state[name], expected), name


def test_the_record_must_match_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "demo-vlm"
    folder.mkdir()
    monkeypatch.setattr(demo_vlm.paths, "demo_vlm_dir", lambda: folder)
    for name in demo_vlm.REQUIRED_FILES:
        (folder / name).write_text("{}")
    record = {"recipe_version": demo_vlm.RECIPE_VERSION, "recipe": json.loads(json.dumps(asdict(RECIPE)))}
    (folder / demo_vlm.RECORD_NAME).write_text(json.dumps(record))
    assert demo_vlm.is_demo_vlm_valid()
    record["recipe"]["lm_epochs"] = RECIPE.lm_epochs + 1
    (folder / demo_vlm.RECORD_NAME).write_text(json.dumps(record))
    assert not demo_vlm.is_demo_vlm_valid()
    record["recipe"]["lm_epochs"] = RECIPE.lm_epochs
    (folder / demo_vlm.RECORD_NAME).write_text(json.dumps(record))
    (folder / "model.safetensors").unlink()
    assert not demo_vlm.is_demo_vlm_valid()


def test_without_the_shared_data_the_build_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BEDSIDE_SHARED_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(BedsideError, match="SLAKE and VQA-RAD"):
        demo_vlm.data_files()
    assert demo_vlm.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "BEDSIDE_SHARED_DATA" in err and "Traceback" not in err
