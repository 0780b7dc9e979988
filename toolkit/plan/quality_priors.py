"""Predicted quality loss of a compressed model: a prior table with sources, replaced by measurements.

The planner ranks candidates by predicted perplexity increase (percent over the uncompressed model):

    loss_pct = 100 * ((1 + q/100) * (1 + d/100) * (1 + v/100) - 1)

q: the quantization scheme's increase, d: removing `k` decoder layers, v: the vision tower's dtype. The factors
multiply because each is a perplexity ratio measured against its own uncompressed reference (an independence
assumption: the compression stage's measurements replace it).

Priors (used when no measurement exists):
  * quantization: llama.cpp's published Llama-3-8B scoreboard, tools/perplexity/README.md ("LLaMA 3 8b
    Scoreboard", wikitext-2, no imatrix; the same ΔPPL figures `llama-quantize --help` prints), as
    q = 100 * ΔPPL / PPL_ref with PPL_ref = 6.233160 - 0.001524 (the bf16 reference). Llama 3 is the more
    sensitive family (the README's LLaMA 2 vs 3 table: Q4_K_M ratio 1.014 on LLaMA-2-7B, 1.028 on Llama-3-8B), so
    the prior is conservative for Vicuna/LLaVA-1.5.
  * ONNX: fp16 = llama.cpp F16, int8 (MatMulNBits block 32) = Q8_0, int4_b32 (asymmetric block 32, scale +
    zero point) = Q4_1; int4_b128 = Q4_0 with its log-ratio scaled by 1.357, the ratio of block-128 asymmetric to
    block-32 symmetric RTN measured on the demo model (PPL 23.1 vs 21.5 over 17.58: docs/ENVIRONMENT.md, sections
    "ONNX export and int4 on the demo model" and "The demo model").
  * depth: ln(PPL ratio) = a(P) * x + b(P) * x^2 with x = k / L, fitted per model on published one-shot
    layer-removal perplexities of the Llama family (SLEB on Llama-2-7B/13B/70B) and the demo model's measurement,
    interpolated in log10(parameters) and clamped outside; a healed model (Bedside heals by default) scales both
    by the healing factor measured on the demo. Every point, its source and the table row it comes from, the fit
    and its limits: docs/PRIORS.md, "Depth pruning" (DEPTH_PRIOR_POINTS, depth_curve, depth_prior_pct).
  * vision: f16 = 0; q8_0 = the Q8_0 prior (no published perplexity figure for a quantized CLIP tower).
  * KV cache (llama.cpp -ctk/-ctv, one more factor kv in the product): f16/f32 = 0. q8_0 and q4_0 are interpolated
    like the depth prior, ln(1 + kv/100) linear in log10(parameters) between the 135M demo model (measured,
    `python -m bench.kv_cache`) and a 7-8B model (llama.cpp's pull requests), clamped outside:
      q8_0  demo +0.069 %; LLaMA-3-8B +0.035 % (PR #7412 "CUDA: quantized KV cache demo", f16 weights, K and V
            q8_0: wikitext-2 PPL 6.234369 vs 6.232196 with f16 K and V).
      q4_0  demo +5.02 %; Llama-2-7B +0.19 % (PR #21551, Llama-2-7B Q4_K_M, first 8 chunks of wikitext-2 at 512:
            PPL 6.3243 with q4_0 K and V rotated vs 6.3123 at f16).
    Both figures are with llama.cpp's Hadamard rotation of a quantized cache, which the bundled llama.cpp applies
    when the head size is a multiple of 64 (llama-kv-cache.cpp: attn_rot_k / attn_rot_v). Without it (other head
    sizes, or LLAMA_ATTN_ROT_DISABLE) q4_0 is far worse: demo +16.9 %, Llama-2-7B +2.42 % (PR #21551, PPL
    6.4648, rotation 0); q8_0 changes within noise. ONNX Runtime keeps its float cache: kv = 0.

Measurements (`Sensitivities`, written by the compression stage) replace the priors term by term: a measured
scheme loss replaces q, measured per-layer removal scores replace d (and name the layers to remove).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolkit.core.errors import BedsideError
from toolkit.model.architectures import ARCHITECTURES
from toolkit.model.facts import ModelFacts

# --- quantization priors ------------------------------------------------------------------------------------

LLAMA3_8B_REFERENCE_PPL = 6.233160 - 0.001524  # bf16 reference of the scoreboard (f16 row minus its ΔPPL)

# ΔPPL on Llama-3-8B, wikitext-2, llama.cpp tools/perplexity/README.md (revision f364eb6f), no imatrix.
LLAMA3_8B_DELTA_PPL: dict[str, float] = {
    "F16": 0.001524,
    "Q8_0": 0.002650,
    "Q6_K": 0.021748,
    "Q5_K_M": 0.056974,
    "Q4_K_M": 0.175482,
    "Q4_1": 0.451103,
    "Q4_0": 0.468514,
    "Q3_K_M": 0.656864,
    "Q2_K": 3.519934,  # row "q2_K | None"
}
# Same scoreboard, with a 10M-token wikitext importance matrix ("WT 10m"); rows "<scheme> | WT 10m".
LLAMA3_8B_DELTA_PPL_IMATRIX: dict[str, float] = {
    "Q4_K_M": 0.151303,
    "IQ4_XS": 0.228071,  # 4.14 GiB
    "Q3_K_M": 0.502622,
    "IQ3_M": 0.666694,  # 3.53 GiB
    "IQ3_XXS": 1.226803,  # 3.05 GiB
    "Q2_K": 2.416191,  # 2.96 GiB
    "IQ2_M": 2.369166,  # 2.74 GiB
}
# The scoreboard has no row without an importance matrix for the IQ file types (llama.cpp meant them to be
# used with one, and writes IQ3_XXS / IQ2_M's IQ2_S tensors only with one; Bedside's AWQ gathers it). Their
# no-imatrix prior is the WT 10m figure: optimistic for an IQ4_XS / IQ3_M export made without a matrix.
IQ_SCHEMES_IMATRIX_ONLY: tuple[str, ...] = ("IQ4_XS", "IQ3_M", "IQ3_XXS", "IQ2_M")

INT4_B128_OVER_B32_LOG_RATIO = math.log(23.1 / 17.58) / math.log(21.5 / 17.58)  # demo model, ORT RTN (docs/ENVIRONMENT.md)


def _pct(delta_ppl: float) -> float:
    return 100 * delta_ppl / LLAMA3_8B_REFERENCE_PPL


def _scaled_log(pct: float, factor: float) -> float:
    return 100 * (math.exp(factor * math.log1p(pct / 100)) - 1)


QUANT_PRIOR_PCT: dict[str, float] = {
    # gguf
    **{scheme: _pct(delta) for scheme, delta in LLAMA3_8B_DELTA_PPL.items() if scheme != "Q4_1"},
    **{scheme: _pct(LLAMA3_8B_DELTA_PPL_IMATRIX[scheme]) for scheme in IQ_SCHEMES_IMATRIX_ONLY},
    # onnx
    "fp32": 0.0,
    "fp16": _pct(LLAMA3_8B_DELTA_PPL["F16"]),
    "int8": _pct(LLAMA3_8B_DELTA_PPL["Q8_0"]),
    "int4_b32": _pct(LLAMA3_8B_DELTA_PPL["Q4_1"]),
    "int4_b128": _scaled_log(_pct(LLAMA3_8B_DELTA_PPL["Q4_0"]), INT4_B128_OVER_B32_LOG_RATIO),
}
QUANT_PRIOR_IMATRIX_PCT: dict[str, float] = {s: _pct(d) for s, d in LLAMA3_8B_DELTA_PPL_IMATRIX.items()}

VISION_PRIOR_PCT: dict[str, float] = {"f16": 0.0, "q8_0": QUANT_PRIOR_PCT["Q8_0"]}

# --- KV-cache precision prior ---------------------------------------------------------------------------------

# llama.cpp rotates a quantized K / V cache by a Walsh-Hadamard matrix when the head size is a multiple of this
# (llama-kv-cache.cpp in llama-cpp-python 0.3.36's llama.cpp: attn_rot_k = ggml_is_quantized(type_k) &&
# n_embd_head_k % 64 == 0; PR #21038 introduced the rotation).
LLAMA_CPP_KV_ROTATION_HEAD_DIM = 64
DEMO_KV_PPL = {"f16": 27.683480, "q8_0": 27.702634, "q4_0": 29.071973}  # bench/kv_cache.py, rotation on
DEMO_KV_PPL_NO_ROTATION = {"f16": 27.683480, "q8_0": 27.681856, "q4_0": 32.374126}  # LLAMA_ATTN_ROT_DISABLE=1


def _ratio_pct(quantized: float, reference: float) -> float:
    return 100 * (quantized / reference - 1)


# (parameters, percent) end points per (KV dtype, rotated); see the module docstring for every figure's source.
KV_PRIOR_POINTS: dict[tuple[str, bool], tuple[tuple[float, float], tuple[float, float]]] = {
    ("q8_0", True): (
        (1.35e8, _ratio_pct(DEMO_KV_PPL["q8_0"], DEMO_KV_PPL["f16"])),  # demo, measured
        (8.0e9, _ratio_pct(6.234369, 6.232196)),  # LLaMA-3-8B, llama.cpp PR #7412 (no rotation yet: conservative)
    ),
    ("q4_0", True): (
        (1.35e8, _ratio_pct(DEMO_KV_PPL["q4_0"], DEMO_KV_PPL["f16"])),  # demo, measured
        (6.7e9, _ratio_pct(6.3243, 6.3123)),  # Llama-2-7B Q4_K_M, llama.cpp PR #21551, rotation 1
    ),
    ("q4_0", False): (
        (1.35e8, _ratio_pct(DEMO_KV_PPL_NO_ROTATION["q4_0"], DEMO_KV_PPL_NO_ROTATION["f16"])),  # demo, measured
        (6.7e9, _ratio_pct(6.4648, 6.3123)),  # Llama-2-7B Q4_K_M, llama.cpp PR #21551, rotation 0
    ),
}
KV_PRIOR_POINTS[("q8_0", False)] = KV_PRIOR_POINTS[("q8_0", True)]  # within noise either way (module docstring)
FLOAT_KV_CACHE_DTYPES = ("f32", "f16")


def kv_prior_pct(facts: ModelFacts, kv_cache_dtype: str | None) -> float:
    """Prior perplexity increase of storing the KV cache as `kv_cache_dtype` (None, f16, f32: 0)."""
    if kv_cache_dtype is None or kv_cache_dtype in FLOAT_KV_CACHE_DTYPES:
        return 0.0
    rotated = facts.head_dim % LLAMA_CPP_KV_ROTATION_HEAD_DIM == 0
    points = KV_PRIOR_POINTS.get((kv_cache_dtype, rotated))
    if points is None:
        raise BedsideError(
            f"no quality prior for KV-cache dtype '{kv_cache_dtype}'; known: "
            f"{', '.join([*FLOAT_KV_CACHE_DTYPES, *dict.fromkeys(d for d, _ in KV_PRIOR_POINTS)])}"
        )
    (p0, pct0), (p1, pct1) = points
    params = facts.text_params
    t = min(1.0, max(0.0, (math.log10(max(params, 1)) - math.log10(p0)) / (math.log10(p1) - math.log10(p0))))
    log_ratio = (1 - t) * math.log1p(pct0 / 100) + t * math.log1p(pct1 / 100)
    return 100 * math.expm1(log_ratio)

# --- depth-pruning prior ------------------------------------------------------------------------------------

# Every point below, with the table row it was read from, is in docs/PRIORS.md ("Depth pruning").


@dataclass(frozen=True)
class DepthPoint:
    """One published (or measured) perplexity of a model with `removed` of its `layers` decoder layers taken out.

    group: the point set it belongs to (DEPTH_PRIOR_FAMILY_GROUP); params: text parameters as
    ModelFacts.text_params counts them; healed: whether the pruned model was fine-tuned (LoRA) before the
    perplexity was measured; metric: the evaluation text; ppl_ref / ppl_pruned: the two perplexities, both from
    the same source and setup; method: how the layers were chosen; source: paper (arXiv id, table) or file.
    """

    group: str
    model: str
    params: float
    layers: int
    removed: int
    healed: bool
    metric: str
    ppl_ref: float
    ppl_pruned: float
    method: str
    source: str

    @property
    def fraction(self) -> float:
        """x = removed / layers."""
        return self.removed / self.layers

    @property
    def log_ratio(self) -> float:
        """ln(ppl_pruned / ppl_ref)."""
        return math.log(self.ppl_pruned / self.ppl_ref)


_SLEB = "SLEB (Song et al. 2024, arXiv 2402.09025v5), Table 1"
_SLEB_REPRO = (
    "SLEB reproduction, Zephyr271828/llm-pruning-collection-fork pruning/SLEB/README.md (dense: "
    "pruning/SliceGPT/README.md of the same repository)"
)
_DEMO = "docs/BENCHMARKS.md, 'Compression methods (bench 1)' (docs/benchmarks/compression.json)"

DEPTH_PRIOR_POINTS: tuple[DepthPoint, ...] = (
    # SmolLM2-135M demo model (Bedside's own measurement: the default `activation` selection, layers 13-18).
    DepthPoint("llama", "SmolLM2-135M", 134_515_008, 30, 6, False, "demo medical eval", 17.6932, 35.4919,
               "activation", _DEMO),
    DepthPoint("llama", "SmolLM2-135M", 134_515_008, 30, 6, True, "demo medical eval", 17.6932, 26.5924,
               "activation + LoRA heal (32 steps)", _DEMO),
    # Llama-2-7B (Vicuna-7B v1.5, LLaVA-1.5-7B's language model, is a Llama-2-7B fine-tune), one-shot.
    DepthPoint("llama", "Llama-2-7B", 6_738_415_616, 32, 4, False, "c4", 7.26, 9.34, "SLEB", _SLEB),
    DepthPoint("llama", "Llama-2-7B", 6_738_415_616, 32, 7, False, "c4", 7.26, 12.32, "SLEB", _SLEB),
    DepthPoint("llama", "Llama-2-7B", 6_738_415_616, 32, 2, False, "wikitext-2", 5.47, 6.07, "SLEB", _SLEB_REPRO),
    DepthPoint("llama", "Llama-2-7B", 6_738_415_616, 32, 4, False, "wikitext-2", 5.47, 6.95, "SLEB", _SLEB_REPRO),
    DepthPoint("llama", "Llama-2-7B", 6_738_415_616, 32, 7, False, "wikitext-2", 5.47, 9.14, "SLEB", _SLEB_REPRO),
    DepthPoint("llama", "Llama-2-7B", 6_738_415_616, 32, 8, False, "wikitext-2", 5.47, 10.39, "SLEB", _SLEB_REPRO),
    # Llama-2-13B and Llama-2-70B, one-shot.
    DepthPoint("llama", "Llama-2-13B", 13_015_864_320, 40, 4, False, "c4", 6.73, 7.80, "SLEB", _SLEB),
    DepthPoint("llama", "Llama-2-13B", 13_015_864_320, 40, 8, False, "c4", 6.73, 9.42, "SLEB", _SLEB),
    DepthPoint("llama", "Llama-2-70B", 68_976_648_192, 80, 8, False, "c4", 5.71, 6.32, "SLEB", _SLEB),
    DepthPoint("llama", "Llama-2-70B", 68_976_648_192, 80, 16, False, "c4", 5.71, 7.31, "SLEB", _SLEB),
)

# Families whose own points are in DEPTH_PRIOR_POINTS. LLaMA, Llama 2, Vicuna, SmolLM2 and LLaVA-1.5's language
# model are all `llama`. The other families Bedside supports (toolkit.model.architectures.ARCHITECTURES) have no
# published depth-pruning perplexity we could read; they use DEPTH_PRIOR_STAND_IN_GROUP (docs/PRIORS.md).
DEPTH_PRIOR_FAMILY_GROUP: dict[str, str] = {"llama": "llama"}
DEPTH_PRIOR_STAND_IN_GROUP = "llama"
# Every fitted point is reproduced within this relative error of its perplexity ratio (tests/test_quality_priors.py).
DEPTH_FIT_TOLERANCE = 0.02


def _fit_curve(points: list[DepthPoint]) -> tuple[float, float]:
    """Least squares (a, b) >= 0 of ln(ratio) = a*x + b*x^2 over the points (one distinct x: b = 0)."""
    xs = [p.fraction for p in points]
    ys = [p.log_ratio for p in points]
    s11 = sum(x**2 for x in xs)
    s12 = sum(x**3 for x in xs)
    s22 = sum(x**4 for x in xs)
    t1 = sum(x * y for x, y in zip(xs, ys, strict=True))
    t2 = sum(x**2 * y for x, y in zip(xs, ys, strict=True))
    linear = (t1 / s11, 0.0)
    det = s11 * s22 - s12 * s12
    if len(set(xs)) < 2 or det <= 1e-12 * s11 * s22:
        return linear
    a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
    if a >= 0 and b >= 0:
        return a, b

    def sse(curve: tuple[float, float]) -> float:
        return sum((curve[0] * x + curve[1] * x * x - y) ** 2 for x, y in zip(xs, ys, strict=True))

    return min(linear, (0.0, t2 / s22), key=sse)


def _interpolate(anchors: tuple[tuple[float, ...], ...], params: float) -> tuple[float, ...]:
    """Values of the anchors (params, *values), sorted by params: linear in log10(params), clamped outside."""
    if params <= anchors[0][0]:
        return anchors[0][1:]
    for low, high in zip(anchors, anchors[1:], strict=False):
        if params <= high[0]:
            t = math.log10(params / low[0]) / math.log10(high[0] / low[0])
            return tuple(lo + t * (hi - lo) for lo, hi in zip(low[1:], high[1:], strict=True))
    return anchors[-1][1:]


_Curves = dict[str, tuple[tuple[float, float, float], ...]]  # group -> (params, a, b), sorted by params
_Healing = dict[str, tuple[tuple[float, float], ...]]  # group -> (params, h), sorted by params


def _build_depth_curves() -> tuple[_Curves, _Healing]:
    """Per group: unhealed (params, a, b) anchors, one per model; healing (params, h) anchors, one per healed model.

    h = mean over a model's healed points of ln(healed ratio) / ln(unhealed ratio predicted at that size and x).
    """
    curves: _Curves = {}
    healing: _Healing = {}
    for group in dict.fromkeys(p.group for p in DEPTH_PRIOR_POINTS):
        by_model: dict[str, list[DepthPoint]] = {}
        healed_by_model: dict[str, list[DepthPoint]] = {}
        for p in DEPTH_PRIOR_POINTS:
            if p.group == group:
                (healed_by_model if p.healed else by_model).setdefault(p.model, []).append(p)
        curves[group] = tuple(
            sorted((pts[0].params, *_fit_curve(pts)) for pts in by_model.values())
        )
        factors = []
        for pts in healed_by_model.values():
            a, b = _interpolate(curves[group], pts[0].params)
            ratios = [p.log_ratio / (a * p.fraction + b * p.fraction**2) for p in pts]
            factors.append((pts[0].params, sum(ratios) / len(ratios)))
        healing[group] = tuple(sorted(factors))
    return curves, healing


# group -> unhealed anchors (params, a, b) and healing anchors (params, h); computed once from the table.
DEPTH_CURVES, DEPTH_HEALING = _build_depth_curves()


def depth_prior_group(facts: ModelFacts) -> str:
    """The point set for this model's family: its own, or the stand-in for a supported family without one."""
    if facts.family in DEPTH_PRIOR_FAMILY_GROUP:
        return DEPTH_PRIOR_FAMILY_GROUP[facts.family]
    if facts.family in ARCHITECTURES:
        return DEPTH_PRIOR_STAND_IN_GROUP
    raise BedsideError(
        f"no depth-pruning prior for model family '{facts.family}'; known: {', '.join(ARCHITECTURES)}"
    )


def depth_curve(params: float, group: str = "llama", healed: bool = True) -> tuple[float, float]:
    """(a, b) with ln(PPL ratio) = a*x + b*x^2, x = removed / layers, for a model of `params` text parameters.

    a and b are fitted per model on its one-shot points and interpolated linearly in log10(params) between the
    group's models, clamped outside; healed multiplies both by the healing factor h(params), interpolated and
    clamped the same way between the models that have healed points.
    """
    if group not in DEPTH_CURVES:
        raise BedsideError(f"no depth-pruning points for group '{group}'; known: {', '.join(DEPTH_CURVES)}")
    if not params > 0:
        raise BedsideError(f"parameter count must be positive, got {params}")
    a, b = _interpolate(DEPTH_CURVES[group], params)
    if healed:
        if not DEPTH_HEALING[group]:
            raise BedsideError(f"no healed depth-pruning points for group '{group}'")
        (h,) = _interpolate(DEPTH_HEALING[group], params)
        a, b = h * a, h * b
    return a, b


def depth_coefficient(params: float, fraction: float, group: str = "llama", healed: bool = True) -> float:
    """Effective c = ln(PPL ratio) / x at removed fraction x (0 < x < 1): a + b*x (depth_curve)."""
    if not 0 < fraction < 1:
        raise BedsideError(f"removed fraction must be between 0 and 1, got {fraction}")
    a, b = depth_curve(params, group, healed)
    return a + b * fraction


def depth_prior_pct(facts: ModelFacts, layers_removed: int, healed: bool = True) -> float:
    """Prior perplexity increase of removing `layers_removed` of L layers: 100 * (exp(a*x + b*x^2) - 1), x = k/L.

    `healed`: whether the pruned model is fine-tuned before use (Bedside's pipeline heals by default).
    """
    if not 0 <= layers_removed < facts.num_layers:
        raise BedsideError(
            f"layers removed must be between 0 and {facts.num_layers - 1}, got {layers_removed}"
        )
    if layers_removed == 0:
        return 0.0
    a, b = depth_curve(facts.text_params, depth_prior_group(facts), healed)
    x = layers_removed / facts.num_layers
    return 100 * math.expm1(a * x + b * x * x)


# --- measured sensitivities ---------------------------------------------------------------------------------


class Sensitivities(BaseModel):
    """Measured quality losses, written by the compression stage (e.g. sensitivities.json next to its weights).

    All values are perplexity increases in percent against the uncompressed model on the calibration/eval text.
      layer_removal_pct: original layer index -> increase when that layer alone is removed (e.g. after healing).
      removal_order / removal_curve_pct: optional iterative measurement: the layers in the order they are removed
        and, for k layers removed that way, the measured increase (it beats composing single-layer scores).
      scheme_loss_pct: scheme name (Q4_K_M, int4_b32, ...) -> measured increase of that scheme on the full model.
      vision_loss_pct: vision dtype (f16, q8_0) -> measured increase.
      kv_loss_pct: KV-cache dtype (q8_0, q4_0) -> measured increase over an f16 cache.
    Any term that is missing falls back to its prior.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    model: str | None = None
    source: str = ""
    metric: Literal["perplexity_increase_pct"] = "perplexity_increase_pct"
    layer_removal_pct: dict[int, float] = Field(default_factory=dict)
    removal_order: list[int] = Field(default_factory=list)
    removal_curve_pct: dict[int, float] = Field(default_factory=dict)
    scheme_loss_pct: dict[str, float] = Field(default_factory=dict)
    vision_loss_pct: dict[str, float] = Field(default_factory=dict)
    kv_loss_pct: dict[str, float] = Field(default_factory=dict)

    @property
    def has_layer_data(self) -> bool:
        """Whether depth losses are measured (then the planner ranks depth and precision by loss alone)."""
        return bool(self.layer_removal_pct or self.removal_order or self.removal_curve_pct)

    def layers_to_remove(self, k: int) -> list[int] | None:
        """The k layers to remove: the first k of removal_order, else the k lowest single-layer scores."""
        if k <= 0:
            return []
        if len(self.removal_order) >= k:
            return sorted(self.removal_order[:k])
        if len(self.layer_removal_pct) >= k:
            ranked = sorted(self.layer_removal_pct.items(), key=lambda item: (item[1], item[0]))
            return sorted(index for index, _ in ranked[:k])
        return None

    def depth_loss_pct(self, k: int) -> float | None:
        """Measured increase for k layers: removal_curve_pct[k], else prod(1 + s_i/100) - 1 over the chosen layers."""
        if k <= 0:
            return 0.0
        if k in self.removal_curve_pct:
            return self.removal_curve_pct[k]
        layers = self.layers_to_remove(k)
        if layers is None or not all(i in self.layer_removal_pct for i in layers):
            return None
        ratio = 1.0
        for index in layers:
            ratio *= 1 + self.layer_removal_pct[index] / 100
        return 100 * (ratio - 1)


def load_sensitivities(path: str | Path) -> Sensitivities:
    """Read a sensitivities JSON file; a missing or malformed file is a BedsideError naming the problem."""
    file = Path(path)
    if not file.is_file():
        raise BedsideError(f"sensitivities file '{file}' not found")
    try:
        return Sensitivities.model_validate(json.loads(file.read_text()))
    except json.JSONDecodeError as error:
        raise BedsideError(f"sensitivities file '{file}' is not valid JSON: {error}") from error
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BedsideError(f"sensitivities file '{file}': {where}: {first['msg']}") from error


# --- prediction ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QualityPrediction:
    """A predicted perplexity increase with its terms and where each came from ("prior" or "measured")."""

    total_pct: float
    quant_pct: float
    depth_pct: float
    vision_pct: float
    layers: list[int] | None
    quant_source: str
    depth_source: str
    kv_pct: float = 0.0
    kv_source: str = "prior"


def combine_pct(*terms: float) -> float:
    """100 * (prod(1 + t/100) - 1): perplexity ratios multiply."""
    ratio = 1.0
    for term in terms:
        ratio *= 1 + term / 100
    return 100 * (ratio - 1)


def predict_quality(
    facts: ModelFacts,
    quant: str,
    layers_removed: int,
    sensitivities: Sensitivities | None = None,
    vision_dtype: str | None = None,
    imatrix: bool = False,
    kv_cache_dtype: str | None = None,
    healed: bool = True,
) -> QualityPrediction:
    """Predicted perplexity increase (percent) with its terms; measured values replace priors where given.

    `kv_cache_dtype`: the KV-cache element type (None, f16, f32: no loss; q8_0, q4_0: kv_prior_pct).
    `healed`: whether the pruned model is fine-tuned after layer removal (the depth prior: depth_prior_pct).
    """
    if quant not in QUANT_PRIOR_PCT:
        raise BedsideError(f"no quality prior for scheme '{quant}'; known: {', '.join(QUANT_PRIOR_PCT)}")
    if not 0 <= layers_removed < facts.num_layers:
        raise BedsideError(
            f"layers removed must be between 0 and {facts.num_layers - 1}, got {layers_removed}"
        )
    sens = sensitivities or Sensitivities()

    if quant in sens.scheme_loss_pct:
        quant_pct, quant_source = sens.scheme_loss_pct[quant], "measured"
    elif imatrix and quant in QUANT_PRIOR_IMATRIX_PCT:
        quant_pct, quant_source = QUANT_PRIOR_IMATRIX_PCT[quant], "prior (imatrix)"
    else:
        quant_pct, quant_source = QUANT_PRIOR_PCT[quant], "prior"

    bad = [i for i in [*sens.layer_removal_pct, *sens.removal_order] if not 0 <= i < facts.num_layers]
    if bad:
        raise BedsideError(f"sensitivities name layer {bad[0]}, but the model has {facts.num_layers} layers")
    measured_depth = sens.depth_loss_pct(layers_removed) if sens.has_layer_data else None
    if measured_depth is not None:
        depth_pct, depth_source = measured_depth, "measured"
        layers = sens.layers_to_remove(layers_removed)
    else:
        depth_pct, depth_source, layers = depth_prior_pct(facts, layers_removed, healed), "prior", None
        if layers_removed == 0:
            layers = []

    vision_pct = 0.0
    if vision_dtype is not None:
        vision_pct = sens.vision_loss_pct.get(vision_dtype, VISION_PRIOR_PCT.get(vision_dtype, 0.0))

    if kv_cache_dtype in sens.kv_loss_pct:
        kv_pct, kv_source = sens.kv_loss_pct[kv_cache_dtype], "measured"
    else:
        kv_pct, kv_source = kv_prior_pct(facts, kv_cache_dtype), "prior"

    return QualityPrediction(
        total_pct=combine_pct(quant_pct, depth_pct, vision_pct, kv_pct),
        quant_pct=quant_pct,
        depth_pct=depth_pct,
        vision_pct=vision_pct,
        layers=layers,
        quant_source=quant_source,
        depth_source=depth_source,
        kv_pct=kv_pct,
        kv_source=kv_source,
    )


def predict_quality_loss(
    facts: ModelFacts,
    quant: str,
    layers_removed: int,
    sensitivities: Sensitivities | None = None,
    vision_dtype: str | None = None,
) -> float:
    """Predicted perplexity increase in percent: combine_pct(quant, depth, vision); see predict_quality."""
    return predict_quality(facts, quant, layers_removed, sensitivities, vision_dtype).total_pct
