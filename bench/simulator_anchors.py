"""Public anchors for the simulator's GPU predictions (issue 15): published decode speeds, predictions, a fit.

Run from the repository root (no device, no download: the models are config.json files, the boards profiles):

    .venv/bin/python -m bench.simulator anchors   # docs/benchmarks/simulator_anchors.json + docs/SIMULATOR.md

ANCHORS holds each published figure with its source (URL, the quoted line, date), the device profile, the model's
config folder, the GGUF scheme and the job (prompt and generated tokens). Bedside runs no GPU here, so these are
the only check of DEFAULTS["cuda"] (toolkit/plan/calibration.py): figures others measured, not our measurements.

Prediction of an anchor, the same call `bedside simulate` makes (toolkit/cli/simulate.py):

    workload  = make_workload(read_facts(model folder), Deployment("gguf", scheme, runtime="llama.cpp",
                              kv_cache_dtype="f16"), profile)       (the memory estimator's tensor table, as the
                                                                     planner types a candidate)
    predicted = simulate(workload, profile, C, "device", decode_tokens=G).decode_tokens_per_s
    C = prompt tokens + G generated tokens,   ratio = predicted / measured

i.e. `bedside simulate --profile P --plan PLAN --context C --decode-tokens G --placement device` for a plan of that
model and scheme with an f16 KV cache (the test checks the two agree).

Fit of the CUDA efficiencies that decide decode (bandwidth efficiency e_bw and step overhead c). Per anchor i the
simulator's seconds per decoded token are the mean of its first and last decode step (the trapezoid of
toolkit.plan.simulator._decode_rate):

    t_i(e_bw, c) = (s_i(first) + s_i(last)) / 2 + c x n_i,    s(step) = sum over segments max(m / e_bw, f / e_c)

with m and f a segment's memory and compute seconds at efficiency 1 (Segment.memory_units, compute_units) and
n_i = 1 (the epoch model's overhead per step) or the anchor's layer count (an overhead per layer, reported beside
it for comparison). (e_bw, c) minimise

    sum over the fitted anchors of ln(t_i / t_measured_i)^2,      t_measured_i = 1 / measured tok/s

over a grid (e_bw geometric in 0.05..2, c linear in 0..50 ms / min n_i), then a 40 x 40 grid between the best
point's neighbours; e_c stays at DEFAULTS["cuda"].compute (decode at batch 1 reads every weight once per token:
the compute term is far below the memory term in every segment, so decode does not constrain it; the JSON keeps
the largest ratio). Leave-one-out: each anchor predicted by the fit on the others.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import REPO_ROOT, markdown_table
from toolkit.model.facts import read_facts
from toolkit.plan.calibration import DEFAULTS, Efficiency, read_calibration
from toolkit.plan.memory import Deployment
from toolkit.plan.simulator import Placement, decode_epochs, epoch, make_target, simulate
from toolkit.plan.workload import Workload, make_workload
from toolkit.target.profiles import DeviceProfile, Figure, load_profile

RUNTIME = "llama.cpp"
KV_CACHE_DTYPE = "f16"  # llama.cpp's default cache type (-ctk / -ctv f16)
# DEFAULTS["cuda"] before the anchors were fitted (an assumption: 60 % of peak bandwidth, 30 % of compute, 0.5 ms
# per step); kept to show what the anchors changed.
EARLIER_CUDA = Efficiency(0.6, 0.3, 0.0005, "assumption before the anchor fit: 60 % of peak bandwidth, 0.5 ms per step")


@dataclass(frozen=True)
class Source:
    """Where a published figure comes from: the page, the line quoted from it, its date and author."""

    url: str
    quote: str
    date: str
    author: str


@dataclass(frozen=True)
class Anchor:
    """One published decode speed and the job behind it, as the simulator is given it."""

    key: str
    device: str  # the board and power mode the figure was measured on
    profile: str  # device_profiles/<profile>.yaml
    model: str  # folder with the model's config.json, relative to the repository root
    model_name: str
    scheme: str  # GGUF scheme (toolkit.core.formats)
    scheme_note: str  # how the scheme was read from the source
    prompt_tokens: int
    generated_tokens: int
    job_note: str  # how prompt and generated tokens were read from the source
    measured_tokens_per_s: float
    source: Source
    # The profile's model-tier bandwidth and GPU peaks replaced (a power mode the shipped profile does not
    # describe), with where the figures come from; None keeps the profile's.
    bandwidth_gbs: float | None = None
    int8_tops: float | None = None
    profile_note: str = ""
    fit: bool = True  # among the anchors DEFAULTS["cuda"] is fitted on

    @property
    def context(self) -> int:
        """Tokens in the KV cache after the job: the prompt and every generated token (the simulated context)."""
        return self.prompt_tokens + self.generated_tokens


HOLOHUB = Source(
    url="https://github.com/nvidia-holoscan/holohub/issues/170",
    quote="comment by NigelNelson, 2024-01-23: 'Here are some benchmark numbers for IGX (IGX iGPU numbers are "
    "identical to AGX benchmarks from my LLM testing)'; table 'Models | Prompt | # of parameters | iGPU (Orin) "
    "(llama.cpp) | ...': 'Llama2 | \u201cOnce upon a time, \u201c | 7B 4-bit | 22.5', '... | 13B 4-bit | 13.3', "
    "'... | 70B 4-bit | 3.0'",
    date="2024-01-23",
    author="NigelNelson (NVIDIA Holoscan)",
)
HOLOHUB_SCHEME = (
    "'4-bit' in the source; Q4_0 assumed: llama.cpp's plain 4-bit type and the usual '4-bit' GGUF of "
    "Llama-2 in January 2024 (a Q4_K_M file would be ~7 % larger and predict ~7 % slower)"
)
HOLOHUB_JOB = (
    "prompt 'Once upon a time, ' = 7 tokens with BOS (Llama-2 tokenizer); generated tokens not given, 128 assumed "
    "(llama-bench's tg128); at <= 135 cached tokens the f16 KV cache is < 2 % of the weights' bytes, so the "
    "prediction barely depends on this; power mode not given, MAXN assumed"
)
AGX = "Jetson AGX Orin 64GB (IGX Orin iGPU figures, 'identical to AGX'), llama.cpp CUDA, January 2024"

def _holohub(size: str, measured_tokens_per_s: float) -> Anchor:
    """One Llama-2 row of the holohub table (same board, job and source; only the size and the speed differ)."""
    return Anchor(
        key=f"agx-orin/llama-2-{size.lower()}/Q4_0",
        device=AGX,
        profile="jetson-agx-orin-64gb",
        model=f"tests/fixtures/llama-2-{size.lower()}",
        model_name=f"Llama-2-{size}",
        scheme="Q4_0",
        scheme_note=HOLOHUB_SCHEME,
        prompt_tokens=7,
        generated_tokens=128,
        job_note=HOLOHUB_JOB,
        measured_tokens_per_s=measured_tokens_per_s,
        source=HOLOHUB,
    )


ANCHORS: tuple[Anchor, ...] = (
    _holohub("7B", 22.5),
    _holohub("13B", 13.3),
    _holohub("70B", 3.0),
    Anchor(
        key="orin-nano-super/smollm2-135m/Q4_K_M",
        device="Jetson Orin Nano Super 8GB, 25 W mode, llama.cpp CUDA (-ngl 99), JetPack R36.4.7, 2026",
        profile="jetson-orin-nano-8gb",
        model="tests/fixtures/smollm2-135m",
        model_name="SmolLM2-135M",
        scheme="Q4_K_M",
        scheme_note="the source names a 101 MB file, the size of SmolLM2-135M's Q4_K_M GGUF (Bedside's own Q4_K_M "
        "export of the demo model: 105,454,336 bytes = 100.6 MiB); Q4_K_M assumed",
        prompt_tokens=2048,
        generated_tokens=256,
        job_note="the source's headline cell 'ctx=2048, gen=256' of its sweep 'prompt in {128, 512, 1024, 2048} tok x "
        "gen in {64, 128, 256} tok': 2048 prompt tokens, 256 generated; the figure is the page's output tok/s "
        "(aiperf, single user): if it counts the prompt's prefill too, the decode rate is higher",
        measured_tokens_per_s=165.2,
        source=Source(
            url="https://www.smolhub.com/posts/jetson-nano-super-benchmark-non-reasoning/",
            quote="'Backend: llama.cpp CUDA, -ngl 99 (all layers on GPU), --no-cache-prompt'; 'Throughput winner "
            "at each mode (ctx=2048, gen=256, highest sweep point)'; SmolLM2-135M at 25W: 165 tok/s, 101 MB "
            "(summarised as 'SmolLM2-135M reaching 165.2 tok/s at 25W', wpnews.pro/news/"
            "tiny-llm-benchmark-jetson-orin-nano-super-8gb)",
            date="2026-06-28",
            author="Yuvraj Singh (smolhub)",
        ),
        bandwidth_gbs=102,
        int8_tops=33.5,
        profile_note="jetson-orin-nano-8gb describes the original 15 W clocks (68 GB/s, 20 dense INT8 TOPS); the "
        "Super's 25 W mode is simulated on a copy of it with 102 GB/s and 67 / 2 = 33.5 dense INT8 TOPS (FP16 half "
        "of that), the figures the profile's own assumption cites (docs.nvidia.com/jetson/orin-nano-devkit/"
        "user-guide, Key Highlights: 102 GB/s, 67 sparse INT8 TOPS); made in code, no second YAML",
    ),
)


# ---------------------------------------------------------------------------------------------
# Predictions


def anchor_profile(anchor: Anchor) -> DeviceProfile:
    """The anchor's device profile, with its bandwidth and INT8 / FP16 peaks replaced where the anchor says so."""
    profile = load_profile(anchor.profile)
    if anchor.bandwidth_gbs is not None:
        figure = Figure(value=anchor.bandwidth_gbs, source=f"anchor {anchor.key}: {anchor.profile_note}")
        tiers = [
            tier.model_copy(update={"bandwidth_gbs": figure, "sustained_bandwidth_gbs": None})
            if tier.name == profile.model_tier
            else tier
            for tier in profile.memory_tiers
        ]
        profile = profile.model_copy(update={"memory_tiers": tiers})
    if anchor.int8_tops is not None:
        note = f"anchor {anchor.key}: {anchor.profile_note}"
        compute = profile.compute.model_copy(
            update={
                "int8_tops": Figure(value=anchor.int8_tops, source=note),
                "fp16_tflops": Figure(value=anchor.int8_tops / 2, source=note),
            }
        )
        profile = profile.model_copy(update={"compute": compute})
    return profile


def anchor_workload(anchor: Anchor, profile: DeviceProfile) -> Workload:
    """The model's config.json at the anchor's scheme, typed by the memory estimator's tables (as the planner
    types a candidate), for llama.cpp with an f16 KV cache."""
    facts = read_facts(REPO_ROOT / anchor.model)
    deployment = Deployment("gguf", anchor.scheme, 0, None, RUNTIME, kv_cache_dtype=KV_CACHE_DTYPE)
    return make_workload(facts, deployment, profile, label=f"{anchor.model_name} {anchor.scheme}",
                         placement_given=True)  # fmt: skip


def record_with_cuda(efficiency: Efficiency, record: dict | None = None) -> dict:
    """A calibration record (the host's by default) whose llama.cpp entry for CUDA is `efficiency`."""
    record = read_calibration() if record is None else record
    runtimes = dict(record.get("runtimes", {}))
    entry = dict(runtimes.get(RUNTIME, {}))
    entry["cuda"] = {
        "bandwidth_efficiency": efficiency.bandwidth,
        "compute_efficiency": efficiency.compute,
        "step_overhead_s": efficiency.step_overhead_s,
    }
    runtimes[RUNTIME] = entry
    return {**record, "runtimes": runtimes}


def predict(anchor: Anchor, record: dict | None = None) -> tuple[float, dict[str, Any]]:
    """Decode tokens/s the simulator predicts for the anchor's job, every layer on the GPU, and the efficiency
    figures (with their source) it used; `record` None: the simulator's own (host record, else DEFAULTS)."""
    profile = anchor_profile(anchor)
    workload = anchor_workload(anchor, profile)
    result = simulate(workload, profile, anchor.context, "device", decode_tokens=anchor.generated_tokens,
                      record=record)  # fmt: skip
    return result.decode_tokens_per_s, result.efficiency["cuda"]


# ---------------------------------------------------------------------------------------------
# Fit


@dataclass(frozen=True)
class FitPoint:
    """One anchor as the fit sees it: per segment, memory and compute seconds at efficiency 1 of its first and
    last decode step, the overhead's multiplier n (1 per step, the layer count per layer), the measured seconds
    per token."""

    key: str
    memory: tuple[np.ndarray, np.ndarray]
    compute: tuple[np.ndarray, np.ndarray]
    layers: int
    measured_s: float

    def step_seconds(self, bandwidth: np.ndarray, compute_efficiency: float) -> np.ndarray:
        """(s(first) + s(last)) / 2 for every bandwidth efficiency in `bandwidth`, without the overhead."""
        total = np.zeros(len(bandwidth))
        for memory, compute in zip(self.memory, self.compute, strict=True):
            total += np.maximum(
                memory[None, :] / bandwidth[:, None], compute[None, :] / compute_efficiency
            ).sum(axis=-1)
        return total / 2


UNIT_CUDA = Efficiency(1.0, 1.0, 0.0, "efficiency 1, no overhead")


def fit_point(anchor: Anchor) -> FitPoint:
    """The anchor's segments at efficiency 1 (the first and last of its decode steps, all on the GPU)."""
    profile = anchor_profile(anchor)
    workload = anchor_workload(anchor, profile)
    target = make_target(profile, RUNTIME, None, record_with_cuda(UNIT_CUDA, {}), anchor.scheme)
    placement = Placement("device", workload.num_layers)
    steps = decode_epochs(anchor.prompt_tokens, anchor.generated_tokens)
    memory, compute = [], []
    for call in (steps[0], steps[-1]):
        segments = epoch(workload, target, placement, *call).segments
        memory.append(np.array([segment.memory_units() for segment in segments]))
        compute.append(np.array([segment.compute_units() for segment in segments]))
    return FitPoint(anchor.key, (memory[0], memory[1]), (compute[0], compute[1]), workload.num_layers,
                    1.0 / anchor.measured_tokens_per_s)  # fmt: skip


@dataclass(frozen=True)
class Fit:
    """Fitted bandwidth efficiency and overhead (seconds per step, or per layer when per_layer)."""

    bandwidth: float
    overhead_s: float
    compute: float
    per_layer: bool
    rms_log_error: float

    def seconds(self, point: FitPoint) -> float:
        """The fit's seconds per decoded token for `point`."""
        steps = point.step_seconds(np.array([self.bandwidth]), self.compute)[0]
        return float(steps + self.overhead_s * (point.layers if self.per_layer else 1))

    def efficiency(self, source: str) -> Efficiency:
        """As DEFAULTS holds it (an overhead per step only)."""
        if self.per_layer:
            raise ValueError("the epoch model has an overhead per step, not per layer")
        return Efficiency(self.bandwidth, self.compute, self.overhead_s, source)


def fit_efficiency(
    points: Sequence[FitPoint], compute_efficiency: float, per_layer: bool = False
) -> Fit:
    """(e_bw, c) minimising sum ln(t_i(e_bw, c) / t_measured_i)^2 (module docstring); rounded to 3 decimals of
    e_bw and 0.01 ms of c (per layer: 0.001 ms), the figures DEFAULTS would hold."""
    if len(points) < 2:
        raise ValueError(f"two figures need at least two anchors, got {len(points)}")
    counts = np.array([point.layers if per_layer else 1 for point in points], dtype=float)
    measured = np.array([point.measured_s for point in points])

    def errors(bandwidth: np.ndarray, overhead: np.ndarray) -> np.ndarray:
        total = np.zeros((len(bandwidth), len(overhead)))
        for point, count, seconds in zip(points, counts, measured, strict=True):
            steps = point.step_seconds(bandwidth, compute_efficiency)
            total += np.log((steps[:, None] + overhead[None, :] * count) / seconds) ** 2
        return total

    bandwidth = np.geomspace(0.05, 2.0, 401)
    overhead = np.linspace(0.0, 0.05 / counts.min(), 501)
    for _ in range(2):  # the grid, then a finer one between the best point's neighbours
        error = errors(bandwidth, overhead)
        i, j = np.unravel_index(np.argmin(error), error.shape)
        low_b, high_b = bandwidth[max(0, i - 1)], bandwidth[min(len(bandwidth) - 1, i + 1)]
        low_o, high_o = overhead[max(0, j - 1)], overhead[min(len(overhead) - 1, j + 1)]
        best = (float(bandwidth[i]), float(overhead[j]))
        bandwidth, overhead = np.linspace(low_b, high_b, 41), np.linspace(low_o, high_o, 41)
    digits = 6 if per_layer else 5
    result = Fit(round(best[0], 3), round(best[1], digits), compute_efficiency, per_layer, 0.0)
    rms = math.sqrt(statistics.fmean(math.log(result.seconds(p) / p.measured_s) ** 2 for p in points))
    return dataclasses.replace(result, rms_log_error=rms)


def speed_error_pct(predicted_s: float, measured_s: float) -> float:
    """predicted / measured tok/s - 1, in %, from seconds per token."""
    return (measured_s / predicted_s - 1) * 100


def fit_summary(fit: Fit, points: Sequence[FitPoint]) -> dict[str, Any]:
    """The fit's figures, its in-sample errors and its leave-one-out errors over `points`."""
    in_sample = {p.key: round(speed_error_pct(fit.seconds(p), p.measured_s), 1) for p in points}
    loo = {}
    for index, point in enumerate(points):
        others = [p for i, p in enumerate(points) if i != index]
        held = fit_efficiency(others, fit.compute, fit.per_layer)
        loo[point.key] = {
            "bandwidth_efficiency": held.bandwidth,
            "overhead_s": held.overhead_s,
            "predicted_tok_s": round(1 / held.seconds(point), 3),
            "error_pct": round(speed_error_pct(held.seconds(point), point.measured_s), 1),
        }
    return {
        "overhead": "per layer" if fit.per_layer else "per step",
        "bandwidth_efficiency": fit.bandwidth,
        "overhead_s": fit.overhead_s,
        "compute_efficiency": fit.compute,
        "rms_log_error": round(fit.rms_log_error, 4),
        "in_sample_error_pct": in_sample,
        "in_sample_median_abs_error_pct": round(statistics.median(abs(v) for v in in_sample.values()), 1),
        "in_sample_max_abs_error_pct": round(max(abs(v) for v in in_sample.values()), 1),
        "leave_one_out": loo,
        "leave_one_out_median_abs_error_pct": round(statistics.median(abs(v["error_pct"]) for v in loo.values()), 1),
        "leave_one_out_max_abs_error_pct": round(max(abs(v["error_pct"]) for v in loo.values()), 1),
    }


FIT_SOURCE = (
    "assumption, not calibrated on a GPU here: fitted to public llama.cpp decode speeds on Jetson Orin (Llama-2 "
    "7B/13B/70B 4-bit on AGX Orin, SmolLM2-135M on Orin Nano Super; docs/benchmarks/simulator_anchors.json, "
    "`.venv/bin/python -m bench.simulator anchors`)"
)


# ---------------------------------------------------------------------------------------------
# The benchmark


def run(command: str, computed: str) -> dict[str, Any]:
    """Predict every anchor (the simulator's current CUDA efficiency, the earlier assumption, the fit and the
    leave-one-out fits), fit DEFAULTS["cuda"]'s bandwidth efficiency and step overhead; the JSON record."""
    host = read_calibration()
    fitted = [anchor for anchor in ANCHORS if anchor.fit]
    points = {anchor.key: fit_point(anchor) for anchor in ANCHORS}
    compute = DEFAULTS["cuda"].compute
    per_step = fit_efficiency([points[a.key] for a in fitted], compute)
    per_layer = fit_efficiency([points[a.key] for a in fitted], compute, per_layer=True)
    step_summary = fit_summary(per_step, [points[a.key] for a in fitted])
    fit_record = record_with_cuda(per_step.efficiency(FIT_SOURCE), host)
    earlier_record = record_with_cuda(EARLIER_CUDA, host)
    current = DEFAULTS["cuda"]
    rows = []
    for anchor in ANCHORS:
        predicted, used = predict(anchor)
        earlier, _ = predict(anchor, earlier_record)
        with_fit, _ = predict(anchor, fit_record)
        point = points[anchor.key]
        memory = np.concatenate(point.memory) / per_step.bandwidth
        compute_s = np.concatenate(point.compute) / compute
        profile = anchor_profile(anchor)
        rows.append(
            {
                "key": anchor.key,
                "device": anchor.device,
                "profile": anchor.profile,
                "profile_note": anchor.profile_note,
                "model_bandwidth_gbs": profile.model_memory_tier.bandwidth_gbs.value,
                "model": anchor.model,
                "model_name": anchor.model_name,
                "scheme": anchor.scheme,
                "scheme_note": anchor.scheme_note,
                "prompt_tokens": anchor.prompt_tokens,
                "generated_tokens": anchor.generated_tokens,
                "context": anchor.context,
                "job_note": anchor.job_note,
                "layers": point.layers,
                "weight_bytes": anchor_workload(anchor, profile).weight_bytes(),
                "measured_tok_s": anchor.measured_tokens_per_s,
                "predicted_tok_s": round(predicted, 3),
                "ratio": round(predicted / anchor.measured_tokens_per_s, 3),
                "efficiency": used,
                "predicted_earlier_tok_s": round(earlier, 3),
                "ratio_earlier": round(earlier / anchor.measured_tokens_per_s, 3),
                "predicted_fit_tok_s": round(with_fit, 3),
                "ratio_fit": round(with_fit / anchor.measured_tokens_per_s, 3),
                "leave_one_out_tok_s": step_summary["leave_one_out"].get(anchor.key, {}).get("predicted_tok_s"),
                "max_compute_over_memory": round(float((compute_s / memory).max()), 4),
                "fitted": anchor.fit,
                "source": dataclasses.asdict(anchor.source),
                "command": f"bedside simulate --profile {anchor.profile} --plan PLAN --context {anchor.context} "
                f"--decode-tokens {anchor.generated_tokens} --placement device (PLAN: {anchor.model}, gguf "
                f"{anchor.scheme}, KV cache {KV_CACHE_DTYPE}"
                + (f"; profile copy with {anchor.bandwidth_gbs:g} GB/s" if anchor.bandwidth_gbs else "")
                + ")",
            }
        )
    defaults_match = (current.bandwidth, current.step_overhead_s) == (per_step.bandwidth, per_step.overhead_s)
    return {
        "schema_version": 1,
        "kind": "simulator_anchors",
        "command": command,
        "computed": computed,
        "what": "published llama.cpp decode speeds on Jetson Orin boards (others' measurements, not ours) beside "
        "the simulator's predictions for the same model, scheme, board and job; bench/simulator_anchors.py",
        "method": "prediction: simulate(make_workload(config.json, gguf scheme, f16 KV), profile, context = prompt + "
        "generated, placement device, decode_tokens = generated); fit: least squares of ln(predicted / measured "
        "seconds per token) over the fitted anchors, grid then finer grid; bandwidth efficiency and overhead "
        "fitted, compute efficiency held at DEFAULTS['cuda']; leave-one-out: each anchor predicted by the fit "
        "on the others",
        "efficiency_used": {
            "bandwidth": current.bandwidth,
            "compute": current.compute,
            "step_overhead_s": current.step_overhead_s,
            "source": current.source,
            "where": "toolkit/plan/calibration.py DEFAULTS['cuda'], the calibration record having no CUDA entry",
        },
        "earlier_assumption": dataclasses.asdict(EARLIER_CUDA),
        "fit": step_summary,
        "fit_per_layer": fit_summary(per_layer, [points[a.key] for a in fitted]),
        "defaults_are_the_fit": defaults_match,
        "rows": rows,
    }


def _pct(value: float) -> str:
    return f"{value:+.0f} %"


def doc_body(summary: dict[str, Any]) -> str:
    """The anchors' table and the fit's figures, for docs/SIMULATOR.md between the simulator-anchors markers."""
    fit, layer = summary["fit"], summary["fit_per_layer"]
    earlier = summary["earlier_assumption"]
    used = summary["efficiency_used"]
    table = markdown_table(
        ["anchor (source)", "board, profile", "model, scheme", "prompt + generated", "measured tok/s",
         f"predicted, earlier ({earlier['bandwidth'] * 100:g} % bw, {earlier['step_overhead_s'] * 1000:g} ms)",
         f"predicted, now ({used['bandwidth'] * 100:g} % bw, {used['step_overhead_s'] * 1000:g} ms)",
         "leave-one-out"],
        [
            [f"[{row['key']}]({row['source']['url']}) ({row['source']['date']})",
             f"{row['profile']}" + (f" at {row['model_bandwidth_gbs']:g} GB/s" if row["profile_note"] else ""),
             f"{row['model_name']} {row['scheme']}", f"{row['prompt_tokens']} + {row['generated_tokens']}",
             f"{row['measured_tok_s']:.1f}",
             f"{row['predicted_earlier_tok_s']:.1f} ({_pct((row['ratio_earlier'] - 1) * 100)})",
             f"{row['predicted_tok_s']:.1f} ({_pct((row['ratio'] - 1) * 100)})",
             "-" if row["leave_one_out_tok_s"] is None else
             f"{row['leave_one_out_tok_s']:.1f} ({_pct(fit['leave_one_out'][row['key']]['error_pct'])})"]
            for row in summary["rows"]
        ],
    )  # fmt: skip
    in_sample = ", ".join(f"{_pct(v)}" for v in fit["in_sample_error_pct"].values())
    loo = ", ".join(f"{_pct(v['error_pct'])}" for v in fit["leave_one_out"].values())
    layer_errors = ", ".join(f"{_pct(v)}" for v in layer["in_sample_error_pct"].values())
    layer_loo = ", ".join(f"{_pct(v['error_pct'])}" for v in layer["leave_one_out"].values())
    match = "DEFAULTS['cuda'] holds this fit" if summary["defaults_are_the_fit"] else (
        "**DEFAULTS['cuda'] differs from this fit**")
    return (
        f"Command: `{summary['command']}` (no device, nothing downloaded; raw: "
        "`docs/benchmarks/simulator_anchors.json`, anchors and sources: `bench/simulator_anchors.py`). Others' "
        "published llama.cpp decode speeds, not our measurements. Prediction: `bedside simulate` for the model's "
        "config.json at the scheme, f16 KV cache, every layer on the GPU, context = prompt + generated tokens, "
        "the generated tokens decoded; in brackets predicted / measured - 1. *Earlier*: the CUDA assumption before "
        f"this fit; *now*: the simulator's CUDA efficiency, from {used['where']} (source: \"{used['source']}\"); "
        "*leave-one-out*: the fit on the other anchors.\n\n"
        f"{table}\n\n"
        f"Fit (least squares on log time over the {len(fit['in_sample_error_pct'])} Orin anchors, compute "
        f"efficiency held at {fit['compute_efficiency']:g}): bandwidth efficiency **{fit['bandwidth_efficiency']:g}**, "
        f"step overhead **{fit['overhead_s'] * 1000:g} ms**; {match}. In-sample errors {in_sample} (median "
        f"|error| {fit['in_sample_median_abs_error_pct']:g} %, max {fit['in_sample_max_abs_error_pct']:g} %); "
        f"leave-one-out {loo} (median {fit['leave_one_out_median_abs_error_pct']:g} %, max "
        f"{fit['leave_one_out_max_abs_error_pct']:g} %). An overhead per layer instead of per step fits no better: "
        f"bandwidth efficiency {layer['bandwidth_efficiency']:g}, {layer['overhead_s'] * 1000:.3g} ms per layer, "
        f"in-sample {layer_errors} (median {layer['in_sample_median_abs_error_pct']:g} %), leave-one-out "
        f"{layer_loo} (median {layer['leave_one_out_median_abs_error_pct']:g} %, max "
        f"{layer['leave_one_out_max_abs_error_pct']:g} %).\n"
    )
