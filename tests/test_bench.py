"""The benchmark scripts' own logic: scoring, byte counting, doc sections, checkpoints (fast, no demo model)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.common import markdown_table, replace_section, score_model, write_json_atomic
from bench.compression import config_name
from bench.runtimes import bandwidth_fraction, kv_bytes_per_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]


class _FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are a fixed function of the current token."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, input_ids: torch.Tensor) -> object:
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_score_model_perplexity_and_agreement_match_a_hand_computation() -> None:
    vocab = 5
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(vocab, vocab, generator=generator)
    blocks = torch.randint(0, vocab, (3, 7), generator=generator)
    model = _FixedLogits(table)
    log_probs = torch.log_softmax(table, dim=-1)
    nll = [-float(log_probs[row[t], row[t + 1]]) for row in blocks for t in range(blocks.shape[1] - 1)]
    scores = score_model(model, blocks, batch_size=2)
    assert scores.tokens == 3 * 6
    assert scores.perplexity == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert scores.argmax.shape == (3, 6)
    # Against itself agreement is 1; against a model whose argmax differs everywhere it is 0.
    assert score_model(model, blocks, scores.argmax).top1_agreement == 1.0
    shifted = table.clone()
    shifted[torch.arange(vocab), table.argmax(dim=-1)] = -100.0
    assert score_model(_FixedLogits(shifted), blocks, scores.argmax).top1_agreement == 0.0


def test_kv_bytes_and_bandwidth_fraction() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, F16 cache, 2032 positions read.
    kv = kv_bytes_per_token(30, 3, 64, 2032.0, 2)
    assert kv == pytest.approx(2 * 30 * 3 * 64 * 2032 * 2)
    assert kv == pytest.approx(46.8e6, rel=1e-2)
    # 10 GB/s and 100 MB per token bound decoding at 100 tok/s; 25 tok/s is a quarter of it.
    assert bandwidth_fraction(25.0, 10e9, 100e6) == pytest.approx(0.25)


def test_replace_section_rewrites_only_its_own_block() -> None:
    document = "# Benchmarks\n\nintro\n"
    first = replace_section(document, "a", "table A v1")
    both = replace_section(first, "b", "table B")
    updated = replace_section(both, "a", "table A v2")
    assert updated.count("<!-- a:start -->") == 1 and "table A v1" not in updated
    assert "table A v2" in updated and "table B" in updated and updated.startswith("# Benchmarks\n\nintro")
    assert updated.index("table A v2") < updated.index("table B")


def test_markdown_table_and_config_names() -> None:
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 2 |"]
    assert config_name(None, False, None) == "original/float"
    assert config_name("activation", True, "awq") == "activation/healed/awq"


def test_write_json_atomic_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_json_atomic(target, {"configs": {"x": 1}})
    write_json_atomic(target, {"configs": {"x": 2}})
    assert json.loads(target.read_text()) == {"configs": {"x": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_quant_methods_report_has_one_table_with_the_pruned_rows_and_their_targets() -> None:
    from bench.quant_methods import BASELINE_VARIANT, BEDSIDE_VARIANT, _pruned_key, report

    def row(kl: float, method: str = "awq", layers: list[int] | None = None) -> dict:
        return {
            "kl": kl, "perplexity": 20.0, "top1_agreement": 0.8, "quantize_seconds": 50.0, "pipeline_method": method,
            "process_peak_bytes": 2e9, "compress_timer": {"seconds": 90.0}, "layers_removed": layers,
        }  # fmt: skip

    rows = {
        _pruned_key(BASELINE_VARIANT, "unhealed"): row(1.0, "rtn", [12, 13, 14, 15, 16, 17]),
        _pruned_key(BEDSIDE_VARIANT, "unhealed"): row(0.75, layers=[13, 14, 15, 16, 17, 18]),
        _pruned_key(BEDSIDE_VARIANT, "healed"): {
            **row(0.55, layers=[13, 14, 15, 16, 17, 18]),
            "heal": {"objective": "kd", "steps": 200, "rank": 16, "learning_rate": 1e-3, "loss_tokens": 408800},
        },
        _pruned_key(BASELINE_VARIANT, "healed"): {  # measured before rank and lr were recorded
            **row(0.9, "rtn", [12, 13, 14, 15, 16, 17]), "heal": {"objective": "kd", "steps": 40},
        },
    }
    text = report({"rows": rows, "threads": 2})
    table = [line for line in text.splitlines() if line.startswith("| Q4_0 | 6 (")]
    assert len(table) == 4 and "| 6 (12, 13, 14, 15, 16, 17) | block influence (ShortGPT) + RTN, unhealed |" in table[0]
    assert "| - | 90 |" in table[0]  # RTN has no quantize stage; the compress column is there
    assert "Bedside's KL / block influence + RTN = 0.75 (target <= 0.7: missed)" in text
    assert "healed: Bedside's KL 0.550 nats (target <= 0.6: met)" in text
    assert "block influence (ShortGPT) + RTN, healed (kd, 40 steps) |" in table[1]
    assert "activation + linear replacement + AWQ + GPTQ, healed (kd, 200 steps, rank 16, lr 0.001, 408,800 positions) |" in table[3]
    assert "healed alike" not in text  # the baseline healed with other settings: no ratio between them
    rows[_pruned_key(BASELINE_VARIANT, "healed")]["heal"] = dict(rows[_pruned_key(BEDSIDE_VARIANT, "healed")]["heal"])
    assert "(target <= 0.6: met); 0.61 x block influence + RTN healed alike." in report({"rows": rows, "threads": 2})


def test_quant_methods_report_marks_rows_whose_clipping_searched_a_sample() -> None:
    """Rows measured before the clipping search used every calibration token (no ``clip_tokens`` in their knobs, or
    512) carry a dagger; rows since, and RTN rows, do not; awq and awq-gptq are both held to the targets."""
    from bench.quant_methods import report

    def row(method: str, clip_tokens: int | None, kl: float) -> dict:
        knobs = None if method == "rtn" else {"n_grid": 10, **({"clip_tokens": clip_tokens} if clip_tokens else {})}
        return {
            "kl": kl, "perplexity": 19.0, "top1_agreement": 0.8, "quantize_seconds": 50.0, "pipeline_method": method,
            "process_peak_bytes": 1.4e9, "compress_timer": {"seconds": 90.0}, "awq_knobs": knobs,
        }  # fmt: skip

    rows = {
        "Q4_0/plain": row("rtn", None, 0.3),
        "Q4_0/imatrix": {**row("imatrix", None, 0.2), "awq_knobs": None},
        "Q4_0/awq": row("awq", None, 0.1),
        "Q4_0/awq-gptq": row("awq-gptq", 32768, 0.09),
    }
    lines = {line.split(" | ")[2]: line for line in report({"rows": rows, "threads": 2}).splitlines() if line.startswith("| Q4_0 | 0 |")}
    assert set(lines) == {"plain", "imatrix", "awq †", "awq-gptq"}
    text = report({"rows": rows, "threads": 2})
    assert "- Q4_0: awq KL / imatrix KL = 0.50 (target <= 0.7: met)" in text
    assert "- Q4_0: awq-gptq KL / imatrix KL = 0.45 (target <= 0.7: met)" in text
    assert "quantize stage 50 s (AWQ with the re-rank on libggml + matrix, GPTQ, load and save)" in text
    budget = json.loads((REPO / "docs" / "benchmarks" / "awq_budget.json").read_text())  # bench 2's result, cited
    assert f"- AWQ's time (bench 2, `{budget['command']}`" in text and f": {budget['awq_seconds']:.0f} s (target" in text
