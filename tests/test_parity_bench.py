"""The parity benchmarks' own logic (bench/imatrix_parity.py, bench/runtime_parity.py): fast, no tools, no model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.common import short_command
from bench.imatrix_parity import chunk_ids, compare_imatrix, relative_errors
from bench.runtime_parity import bench_row, mean_rate, parse_llama_bench
from exporters.gguf_imatrix import gguf_tensor_names, read_imatrix_sums, write_imatrix
from toolkit.core.errors import BedsideError


def test_gguf_tensor_names_maps_hf_llava_and_gguf_names() -> None:
    names = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.language_model.layers.1.mlp.down_proj.weight",  # a LLaVA's text model
        "model.layers.5.self_attn.q_proj.weight",  # beyond block_count: still mapped (a pruned model's entry)
        "blk.3.ffn_up.weight",  # already a GGUF name
        "vision_tower.whatever.weight",
    ]
    mapped = gguf_tensor_names(names, "llama", 2)
    assert mapped == {
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
        "model.layers.0.self_attn.v_proj.weight": "blk.0.attn_v.weight",
        "model.layers.0.self_attn.o_proj.weight": "blk.0.attn_output.weight",
        "model.layers.1.mlp.gate_proj.weight": "blk.1.ffn_gate.weight",
        "model.layers.1.mlp.up_proj.weight": "blk.1.ffn_up.weight",
        "model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
        "model.language_model.layers.1.mlp.down_proj.weight": "blk.1.ffn_down.weight",
        "model.layers.5.self_attn.q_proj.weight": "blk.5.attn_q.weight",
        "blk.3.ffn_up.weight": "blk.3.ffn_up.weight",
        "vision_tower.whatever.weight": None,
    }
    assert gguf_tensor_names(["model.layers.0.self_attn.q_proj.weight"], "no-such-arch", 1) == {
        "model.layers.0.self_attn.q_proj.weight": None
    }


def test_read_imatrix_sums_returns_what_was_written(tmp_path: Path) -> None:
    sums = {"blk.0.attn_q.weight": np.array([2.0, 4.0, 6.0], np.float32)}
    path = write_imatrix(
        tmp_path / "m.gguf", sums, {"blk.0.attn_q.weight": 8}, datasets=["d"], chunk_count=2, chunk_size=4
    )
    raw = read_imatrix_sums(path)
    np.testing.assert_array_equal(raw.in_sum2["blk.0.attn_q.weight"], [2.0, 4.0, 6.0])
    np.testing.assert_array_equal(raw.counts["blk.0.attn_q.weight"], [8.0])
    assert (raw.datasets, raw.chunk_count, raw.chunk_size) == (["d"], 2, 4)


def test_relative_errors_follow_their_formulas() -> None:
    reference = np.array([1.0, 2.0, 4.0])
    bedside = np.array([1.001, 2.0, 3.996])
    errors = relative_errors(bedside, reference)
    assert errors["max_rel"] == pytest.approx(1e-3)  # max(0.001/1, 0, 0.004/4)
    assert errors["rel_l2"] == pytest.approx(np.sqrt(0.001**2 + 0.004**2) / np.sqrt(21))
    # a zero reference column is measured against 1e-6 of the largest, not divided by zero
    assert relative_errors(np.array([1e-6, 1.0]), np.array([0.0, 1.0]))["max_rel"] == pytest.approx(1.0)
    assert errors["worst_reference"] == 4.0 and errors["median_reference"] == 2.0
    same = relative_errors(reference, reference)
    assert same["max_rel"] == 0.0 and same["rel_l2"] == 0.0
    with pytest.raises(BedsideError, match="lengths differ"):
        relative_errors(np.ones(2), np.ones(3))


def test_compare_imatrix_maps_names_checks_counts_and_lists_the_unmatched() -> None:
    bedside = {
        "model.layers.0.self_attn.q_proj.weight": np.array([1.0, 2.0], np.float32),
        "model.layers.0.mlp.down_proj.weight": np.array([3.0, 4.0, 5.0], np.float32),
        "model.layers.1.mlp.up_proj.weight": np.array([1.0], np.float32),  # llama-imatrix has none
    }
    counts = dict.fromkeys(bedside, 512)
    reference = {
        "blk.0.attn_q.weight": np.array([1.0, 2.002], np.float32),
        "blk.0.ffn_down.weight": np.array([3.0, 4.0, 5.0], np.float32),
        "output.weight": np.array([1.0], np.float32),  # Bedside has none
    }
    reference_counts = {
        "blk.0.attn_q.weight": np.array([512.0]),
        "blk.0.ffn_down.weight": np.array([256.0]),
        "output.weight": np.array([512.0]),
    }
    result = compare_imatrix(bedside, counts, reference, reference_counts, "llama", 2)
    assert result["compared"] == 2
    assert result["only_bedside"] == ["blk.1.ffn_up.weight"]
    assert result["only_llama"] == ["output.weight"]
    q = result["tensors"]["blk.0.attn_q.weight"]
    assert q["bedside_name"] == "model.layers.0.self_attn.q_proj.weight"
    assert q["counts_equal"] and q["count_llama"] == 512.0
    assert q["max_rel"] == pytest.approx(0.002 / 2.002, rel=1e-4)
    assert not result["tensors"]["blk.0.ffn_down.weight"]["counts_equal"]
    assert not result["counts_equal"]
    assert result["max_rel"] == pytest.approx(q["max_rel"])
    assert result["worst_tensor"] == "blk.0.attn_q.weight"
    assert result["median_max_rel"] == pytest.approx(q["max_rel"] / 2)
    with pytest.raises(BedsideError, match="matches no llama tensor"):
        compare_imatrix({"vision.x.weight": np.ones(1)}, {"vision.x.weight": 1}, {}, {}, "llama", 1)


def test_short_command_keeps_file_names() -> None:
    command = "/c/llama-tools/bin/llama-imatrix -m /x/model-F16.gguf -c 512 --no-ppl"
    assert short_command(command) == "llama-imatrix -m model-F16.gguf -c 512 --no-ppl"


def test_chunk_ids_cuts_like_llama_imatrix() -> None:
    ids = list(range(100, 125))
    assert chunk_ids(ids, 2, 10, None) == [list(range(100, 110)), list(range(110, 120))]
    assert chunk_ids(ids, 2, 10, 1) == [[1, *range(101, 110)], [1, *range(111, 120)]]
    with pytest.raises(BedsideError, match="fewer than 3 chunks of 10"):
        chunk_ids(ids, 3, 10, None)
    with pytest.raises(BedsideError, match="at least two"):
        chunk_ids(list(range(15)), 1, 10, None)  # llama-imatrix needs 2 * n_ctx tokens


LLAMA_BENCH_JSON = """[
  {
    "build_commit": "abc", "model_filename": "m.gguf", "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
    "flash_attn": -1, "repack": true, "n_prompt": 992, "n_gen": 0, "n_depth": 0,
    "avg_ns": 1000000000, "stddev_ns": 0, "avg_ts": 992.0, "stddev_ts": 1.5,
    "samples_ns": [ 1000000000 ], "samples_ts": [ 992.0 ]
  },
  {
    "build_commit": "abc", "model_filename": "m.gguf", "n_batch": 2048, "n_ubatch": 512, "n_threads": 2,
    "flash_attn": -1, "repack": true, "n_prompt": 0, "n_gen": 32, "n_depth": 992,
    "avg_ns": 400000000, "stddev_ns": 0, "avg_ts": 80.0, "stddev_ts": 0.5,
    "samples_ns": [ 400000000 ], "samples_ts": [ 80.0 ]
  }
]"""


def test_parse_llama_bench_and_pick_rows() -> None:
    rows = parse_llama_bench(LLAMA_BENCH_JSON)
    assert bench_row(rows, 992, 0, 0)["avg_ts"] == 992.0
    assert bench_row(rows, 0, 32, 992)["avg_ts"] == 80.0
    with pytest.raises(BedsideError, match="0 rows for pp992/tg0 at depth 992"):
        bench_row(rows, 992, 0, 992)
    with pytest.raises(BedsideError, match="printed no JSON"):
        parse_llama_bench("main: error: failed to load model\n")
    with pytest.raises(BedsideError, match="lacks avg_ts"):
        parse_llama_bench(json.dumps([{"n_prompt": 1, "n_gen": 0, "n_depth": 0, "samples_ts": []}]))
    with pytest.raises(BedsideError, match="not a list"):
        parse_llama_bench(json.dumps({"n_prompt": 1}))


def test_mean_rate_is_the_mean_of_per_run_rates() -> None:
    assert mean_rate(100, [1.0, 0.5]) == pytest.approx((100 + 200) / 2)
    with pytest.raises(BedsideError):
        mean_rate(100, [])


def test_only_keeps_the_earlier_runs_other_files_in_order() -> None:
    """`--only Q4_K_M` re-measures one file: the earlier record's other files and rows stay, marked as earlier."""
    from bench.runtime_parity import merge_earlier

    def row(key: str, ratio: float) -> dict:
        return {"artifact": key, "setting": "s", "prefill_ratio": ratio, "decode_ratio": ratio}

    earlier = {
        "command": "python -m bench.runtime_parity --reps 5", "started": "t0", "finished": "t1", "reps": 5,
        "artifacts": {"gguf/Q8_0": {"a": 1}, "gguf/Q4_K_M": {"a": 2}, "onnx/int4_b32": {"a": 3}},
        "comparisons": [row("gguf/Q8_0", 1.0), row("gguf/Q4_K_M", 0.9), row("onnx/int4_b32", 1.3)],
    }  # fmt: skip
    new = {"reps": 9, "artifacts": {"gguf/Q4_K_M": {"a": 4}}, "comparisons": [row("gguf/Q4_K_M", 1.0)]}
    merged = merge_earlier(new, earlier)
    assert list(merged["artifacts"]) == ["gguf/Q8_0", "gguf/Q4_K_M", "onnx/int4_b32"]
    assert merged["artifacts"]["gguf/Q4_K_M"] == {"a": 4}
    assert [(r["artifact"], r["prefill_ratio"]) for r in merged["comparisons"]] == [
        ("gguf/Q8_0", 1.0), ("gguf/Q4_K_M", 1.0), ("onnx/int4_b32", 1.3)
    ]  # fmt: skip
    assert merged["earlier_run"]["artifacts"] == ["gguf/Q8_0", "onnx/int4_b32"]
    assert merged["earlier_run"]["reps"] == 5
    assert merge_earlier(new, {"artifacts": {"gguf/Q4_K_M": {}}}) is new  # nothing else to keep


def _timed_row(key: str, bedside_seconds: list[float], reference_rates: list[float]) -> dict:
    """A comparison row as the interleaved GGUF run records it (prefill 992 and decode 32 alike here)."""
    from bench.runtime_parity import DECODE, PREFILL, add_paired

    rounds = [{"prefill_tok_s": r, "decode_tok_s": r / 10, "prefill_tok_s_n_batch_512": r} for r in reference_rates]
    bedside = {
        "prefill_seconds": bedside_seconds, "decode_seconds": [s * DECODE / PREFILL * 10 for s in bedside_seconds],
        "prefill_tok_s": mean_rate(PREFILL, bedside_seconds),
        "decode_tok_s": mean_rate(DECODE, [s * DECODE / PREFILL * 10 for s in bedside_seconds]),
    }  # fmt: skip
    reference = {
        "per_round": rounds, "prefill_tok_s": float(np.mean(reference_rates)),
        "decode_tok_s": float(np.mean(reference_rates)) / 10, "prefill_tok_s_n_batch_512": float(np.mean(reference_rates)),
    }  # fmt: skip
    return add_paired({"artifact": key, "setting": "s", "bedside": bedside, "reference": reference}, PREFILL, DECODE)


def test_paired_ratio_is_the_geometric_mean_of_the_rounds_ratios() -> None:
    from bench.runtime_parity import PREFILL, paired_round_ratio

    # Bedside runs at 0.9x, 1.0x and 1.1x of llama-bench's rate in the same round while the host drifts 2x
    rates = [200.0, 400.0, 300.0]
    seconds = [PREFILL / (rate * factor) for rate, factor in zip(rates, (0.9, 1.0, 1.1), strict=True)]
    paired = paired_round_ratio(seconds, PREFILL, rates)
    assert paired is not None and paired["rounds"] == 3
    assert paired["ratio"] == pytest.approx((0.9 * 1.0 * 1.1) ** (1 / 3))
    assert 0.9 <= paired["low"] <= paired["ratio"] <= paired["high"] <= 1.1
    assert paired_round_ratio(seconds, PREFILL, rates[:2]) is None  # runs that do not pair up
    row = _timed_row("gguf/Q4_K_M", seconds, rates)
    assert row["prefill_paired"]["ratio"] == pytest.approx(paired["ratio"])
    assert row["decode_paired"]["ratio"] == pytest.approx(paired["ratio"])
    assert row["prefill_ratio"] == pytest.approx(row["bedside"]["prefill_tok_s"] / np.mean(rates))


def test_pooling_joins_two_runs_rounds_of_the_same_file_only() -> None:
    from bench.runtime_parity import pool_rounds

    settings = {"threads": 2, "context": 1024, "prefill_tokens": 992, "decode_tokens": 32}
    earlier = {**settings, "command": "old", "started": "t0", "finished": "t1", "reps": 2, "comparisons": [
        _timed_row("gguf/Q4_K_M", [4.0, 5.0], [200.0, 210.0]), _timed_row("gguf/Q8_0", [4.0, 4.0], [250.0, 250.0])]}
    record = {**settings, "earlier_run": {"artifacts": ["gguf/Q8_0"]}, "comparisons": [
        _timed_row("gguf/Q4_K_M", [4.5], [220.0]), earlier["comparisons"][1]]}  # fmt: skip
    pooled = pool_rounds(record, earlier, "git show abc")
    q4, q8 = pooled["comparisons"]
    assert q4["bedside"]["prefill_seconds"] == [4.0, 5.0, 4.5]
    assert q4["reference"]["prefill_tok_s"] == pytest.approx(210.0)
    assert q4["prefill_paired"]["rounds"] == 3
    assert q8 is record["comparisons"][1]  # measured by the earlier run itself: not pooled twice
    assert pooled["pooled_with"]["artifacts"] == ["gguf/Q4_K_M"]
    with pytest.raises(BedsideError, match="already pooled"):
        pool_rounds(pooled, earlier, "again")
    with pytest.raises(BedsideError, match="differ in threads"):
        pool_rounds(record, {**earlier, "threads": 4}, "other")
