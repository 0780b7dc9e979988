"""Block-by-block compression (toolkit.compress.sequential) gives the in-memory path's numbers.

The demo model, re-stored in bf16 over four shards (so the lazy reader crosses shard boundaries and the
writer keeps 16-bit storage), on a small calibration set: perplexity, the importance matrix, the
activation scores (with a quantizer), block influence, angular distances, the ReplaceMe fit and the
pruned weights, AWQ's alphas, weights and matrix, each against the in-memory function on the same ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters.gguf_imatrix import read_imatrix
from toolkit.compress.prune import remove_layers, select_layers
from toolkit.compress.prune.replace import replace_removed_layers
from toolkit.compress.quant.awq import awq
from toolkit.compress.quant.imatrix import gather_imatrix
from toolkit.compress.sequential.checkpoint import ShardedCheckpoint, ShardWriter, write_shards
from toolkit.compress.sequential.model import LazyModel
from toolkit.compress.sequential.scoring import (
    sequential_activation,
    sequential_angular,
    sequential_block_influence,
    sequential_imatrix,
    sequential_perplexity,
)
from toolkit.compress.sequential.writing import sequential_awq, sequential_replacement, write_pruned
from toolkit.compress.stages import load_causal_lm, perplexity
from toolkit.model.source import resolve_model_dir

pytestmark = pytest.mark.heavy
LAYERS = 8  # the demo's first 8 of 30 decoder layers: the same code paths at a quarter of the time


@pytest.fixture(scope="module")
def bf16_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo checkpoint's first LAYERS layers stored in bf16 over several shards (tied head: only the
    embedding is stored)."""
    demo = resolve_model_dir("demo", need_weights=True)
    folder = tmp_path_factory.mktemp("bf16-demo")
    source = ShardedCheckpoint(demo)
    kept = {f"model.layers.{index}." for index in range(LAYERS)}
    specs = {
        name: (entry.shape, torch.bfloat16)
        for name, entry in source.tensors.items()
        if not name.startswith("model.layers.") or any(name.startswith(prefix) for prefix in kept)
    }
    write_shards(folder, specs, source.read, 20 << 20)
    config = json.loads((demo / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = "bfloat16"
    config["num_hidden_layers"] = LAYERS
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    for path in demo.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and path.name != "config.json":
            shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def ids() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 49152, (6, 32), generator=generator), torch.randint(0, 49152, (3, 32), generator=generator)


def _bf16_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.to(torch.bfloat16) for name, value in model.state_dict().items()}


def test_shards_roundtrip_and_unchanged_shards_are_linked(bf16_demo: Path, tmp_path: Path) -> None:
    source = ShardedCheckpoint(bf16_demo)
    assert len(source.files) >= 3
    assert all(source.read(name).dtype == torch.bfloat16 for name in list(source.tensors)[:5])
    last = f"model.layers.{LAYERS - 1}.mlp.down_proj.weight"
    writer = ShardWriter(source, tmp_path, lambda name: name, {last})
    writer.put(last, torch.zeros(source.tensors[last].shape))
    writer.finish()
    written = ShardedCheckpoint(tmp_path)
    assert torch.equal(written.read(last), torch.zeros(source.tensors[last].shape, dtype=torch.bfloat16))
    linked = [path for path in source.files if (tmp_path / path.name).stat().st_ino == path.stat().st_ino]
    assert len(linked) == len(source.files) - 1  # only the shard holding the changed tensor was rewritten
    other = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(written.read(other), source.read(other))


def test_perplexity_imatrix_and_scores_match_in_memory(
    bf16_demo: Path, ids: tuple[torch.Tensor, torch.Tensor]
) -> None:
    calib, evaluation = ids
    lazy = LazyModel(bf16_demo)
    model = load_causal_lm(bf16_demo)
    assert lazy.model.config._attn_implementation == model.config._attn_implementation

    assert sequential_perplexity(lazy, evaluation) == pytest.approx(perplexity(model, evaluation), rel=1e-6)

    streamed = sequential_imatrix(lazy, calib)
    in_memory = gather_imatrix(model, calib)
    assert set(streamed.in_sum2) == set(in_memory.in_sum2)
    for name, sums in in_memory.in_sum2.items():
        np.testing.assert_allclose(streamed.in_sum2[name], sums, rtol=1e-6)

    knobs = {"quant_scheme": "Q4_0", "max_sequences": 6, "max_tokens": 32}
    fast = sequential_activation(lazy, calib, 2, **knobs)
    slow = select_layers("activation", model, calib, 2, **knobs)
    assert fast.layers_to_remove == slow.layers_to_remove
    np.testing.assert_allclose(fast.scores, slow.scores, rtol=1e-6, atol=1e-9)
    assert fast.details["quant"]["full_model_kl"] == pytest.approx(slow.details["quant"]["full_model_kl"], rel=1e-6)
    for streamed_round, memory_round in zip(fast.details["rounds"], slow.details["rounds"], strict=True):
        assert streamed_round.keys() == memory_round.keys()
        np.testing.assert_allclose(list(streamed_round.values()), list(memory_round.values()), rtol=1e-6)

    for streamed_method, name in ((sequential_block_influence, "block-influence"), (sequential_angular, "angular")):
        fast = streamed_method(lazy, calib, 3)
        slow = select_layers(name, model, calib, 3)
        assert fast.layers_to_remove == slow.layers_to_remove
        np.testing.assert_allclose(fast.scores, slow.scores, rtol=1e-6, atol=1e-9)


def test_replacement_prune_and_awq_write_the_in_memory_weights(
    bf16_demo: Path, ids: tuple[torch.Tensor, torch.Tensor], tmp_path: Path
) -> None:
    calib, evaluation = ids
    removed = [2, 3, 5]
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    lazy = LazyModel(bf16_demo)
    folds, record = sequential_replacement(lazy, removed, calib, eval_input_ids=evaluation)
    write_pruned(lazy, pruned, removed, folds, dtype=torch.bfloat16)
    model = load_causal_lm(bf16_demo)
    expected = replace_removed_layers(model, removed, calib, eval_input_ids=evaluation, strict=False)
    remove_layers(model, removed)
    assert record == expected.record
    written = ShardedCheckpoint(pruned)
    state = _bf16_state(model)
    stored = {name for name in state if name in written}
    assert stored == set(state) - {"lm_head.weight"}  # tied head, not stored (as save_pretrained does)
    assert all(torch.equal(written.read(name), state[name]) for name in stored)
    config = json.loads((pruned / "config.json").read_text(encoding="utf-8"))
    assert config["num_hidden_layers"] == LAYERS - 3 and config["dtype"] == "bfloat16"

    quantized = tmp_path / "awq"
    quantized.mkdir()
    streamed = sequential_awq(
        LazyModel(pruned), quantized, calib, "Q4_0", imatrix_path=quantized / "imatrix.gguf",
        dtype=torch.bfloat16,
    )
    model = load_causal_lm(pruned)
    result = awq(model, calib, "Q4_0", imatrix_path=tmp_path / "imatrix.gguf", progress=False)
    alphas = [[group.get("alpha") for group in layer["groups"]] for layer in streamed["layers"]]
    assert alphas == [[group.get("alpha") for group in layer["groups"]] for layer in result.record["layers"]]
    written = ShardedCheckpoint(quantized)
    state = _bf16_state(result.model)
    assert all(torch.equal(written.read(name), state[name]) for name in state if name in written)
    matrix = read_imatrix(quantized / "imatrix.gguf").values
    for name, values in read_imatrix(tmp_path / "imatrix.gguf").values.items():
        np.testing.assert_allclose(matrix[name], values, rtol=1e-6)
    assert load_causal_lm(quantized).config.num_hidden_layers == LAYERS - 3


def test_a_streamed_bf16_model_heals_in_bf16_with_gradient_checkpointing(bf16_demo: Path, tmp_path: Path) -> None:
    """compress --sequential on a bf16 checkpoint: the pruned model heals in bf16 (the weights' own precision,
    half of float32) with gradient checkpointing, the healed checkpoint stays bf16 and differs from the
    pruned one, and the stage records its precision and its peak (load and save included)."""
    from toolkit.compress.pipeline import compress
    from toolkit.compress.record import CompressOptions

    notes = Path(__file__).parent / "fixtures" / "eval" / "clinical_notes.txt"
    options = CompressOptions(
        prune_layers=2, method="last", replace="none", heal_steps=2, calib=str(notes),
        calib_sequences=4, seq_len=32, eval_sequences=2, sequential="on",
    )  # fmt: skip
    record = compress(str(bf16_demo), tmp_path / "out", options, progress=False).record
    assert record["sequential"] is True and len(record["layers_removed"]) == 2
    assert (record["heal"]["weights_dtype"], record["heal"]["gradient_checkpointing"]) == ("bfloat16", True)
    assert record["heal"]["steps"] == 2 and all(np.isfinite(record["heal"]["losses"]))
    assert record["heal"]["objective"] == "ce" and "16 bits" in record["heal"]["objective_note"]  # no teacher copy
    stage = record["stages"]["heal"]
    assert stage["peak_rss_bytes"] > 0 and stage["sequential"] is False  # healing holds the whole model
    healed = ShardedCheckpoint(tmp_path / "out" / stage["folder"])
    pruned = ShardedCheckpoint(tmp_path / "out" / record["stages"]["prune"]["folder"])
    assert {entry.dtype for entry in healed.tensors.values()} == {"BF16"}
    name = "model.layers.0.self_attn.q_proj.weight"
    assert healed.read(name).dtype == torch.bfloat16 and not torch.equal(healed.read(name), pruned.read(name))
    # saved shard by shard from the bf16 model (no whole-file serialization): the pruned layout, loadable
    assert [path.name for path in healed.files] == [path.name for path in pruned.files] and len(healed.files) > 1
    assert set(healed.tensors) == set(pruned.tensors)
    reloaded = load_causal_lm(tmp_path / "out" / stage["folder"], torch.bfloat16)
    assert torch.equal(reloaded.state_dict()[name], healed.read(name))
    assert np.isfinite(record["quality"]["healed"])
