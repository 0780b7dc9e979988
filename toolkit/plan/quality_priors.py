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
  * depth: ln(PPL ratio) = c(P) * k / L. c = 1.7 for a 7B model: Kim et al. 2024, "Shortened LLaMA" (arXiv
    2402.02834), one-shot block removal of LLaMA-7B with LoRA healing, about +40 % wikitext-2 perplexity at 20 %
    of blocks removed and about +85 % at 35 % (ln 1.40 / 0.20 = 1.68, ln 1.85 / 0.35 = 1.76). c = 4.7 for the
    135M demo model: docs/ENVIRONMENT.md, section "Depth pruning on the demo model", block-influence (ShortGPT,
    Men et al. 2024, arXiv 2403.03853) removal of 6 of 30 layers gave +155 % (ln 2.55 / 0.2 = 4.68): small models are far less depth-redundant.
    c is interpolated linearly in log10(parameters) between the two and clamped outside; Gromov et al. 2024
    ("The Unreasonable Ineffectiveness of the Deeper Layers", arXiv 2403.17887) show larger models tolerate
    more removal with healing, so clamping at 1.7 above 7B is conservative. The 2025 medical LLaVA study
    (arXiv 2507.21976) prunes, fine-tunes and AWQ-quantizes LLaVA-7B to 4 GB of VRAM (70 % less memory), the
    pipeline Bedside follows; its per-layer numbers come in as measured sensitivities.
  * vision: f16 = 0; q8_0 = the Q8_0 prior (no published perplexity figure for a quantized CLIP tower).

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
}
# Same scoreboard, with a 10M-token wikitext importance matrix ("WT 10m").
LLAMA3_8B_DELTA_PPL_IMATRIX: dict[str, float] = {
    "Q4_K_M": 0.151303,
    "Q3_K_M": 0.502622,
}

INT4_B128_OVER_B32_LOG_RATIO = math.log(23.1 / 17.58) / math.log(21.5 / 17.58)  # demo model, ORT RTN (docs/ENVIRONMENT.md)


def _pct(delta_ppl: float) -> float:
    return 100 * delta_ppl / LLAMA3_8B_REFERENCE_PPL


def _scaled_log(pct: float, factor: float) -> float:
    return 100 * (math.exp(factor * math.log1p(pct / 100)) - 1)


QUANT_PRIOR_PCT: dict[str, float] = {
    # gguf
    **{scheme: _pct(delta) for scheme, delta in LLAMA3_8B_DELTA_PPL.items() if scheme != "Q4_1"},
    # onnx
    "fp32": 0.0,
    "fp16": _pct(LLAMA3_8B_DELTA_PPL["F16"]),
    "int8": _pct(LLAMA3_8B_DELTA_PPL["Q8_0"]),
    "int4_b32": _pct(LLAMA3_8B_DELTA_PPL["Q4_1"]),
    "int4_b128": _scaled_log(_pct(LLAMA3_8B_DELTA_PPL["Q4_0"]), INT4_B128_OVER_B32_LOG_RATIO),
}
QUANT_PRIOR_IMATRIX_PCT: dict[str, float] = {s: _pct(d) for s, d in LLAMA3_8B_DELTA_PPL_IMATRIX.items()}

VISION_PRIOR_PCT: dict[str, float] = {"f16": 0.0, "q8_0": QUANT_PRIOR_PCT["Q8_0"]}

# --- depth-pruning prior ------------------------------------------------------------------------------------

# (parameters, c) with ln(PPL ratio) = c * removed / layers; see the module docstring for both sources.
DEPTH_PRIOR_POINTS: tuple[tuple[float, float], ...] = (
    (1.35e8, 4.7),  # SmolLM2-135M demo, ShortGPT block influence, 6 of 30 layers, +155 % (docs/ENVIRONMENT.md)
    (6.7e9, 1.7),  # LLaMA-7B, Shortened LLaMA + LoRA, +40 % at 20 %, +85 % at 35 % (Kim et al. 2024)
)


def depth_coefficient(params: int) -> float:
    """c(P): linear in log10(P) between DEPTH_PRIOR_POINTS, clamped to the end points."""
    (p0, c0), (p1, c1) = DEPTH_PRIOR_POINTS
    if params <= p0:
        return c0
    if params >= p1:
        return c1
    t = (math.log10(params) - math.log10(p0)) / (math.log10(p1) - math.log10(p0))
    return c0 + t * (c1 - c0)


def depth_prior_pct(facts: ModelFacts, layers_removed: int) -> float:
    """Prior perplexity increase of removing `layers_removed` of L layers: 100 * (exp(c(P) * k / L) - 1)."""
    if layers_removed <= 0:
        return 0.0
    c = depth_coefficient(facts.text_params)
    return 100 * math.expm1(c * layers_removed / facts.num_layers)


# --- measured sensitivities ---------------------------------------------------------------------------------


class Sensitivities(BaseModel):
    """Measured quality losses, written by the compression stage (e.g. sensitivities.json next to its weights).

    All values are perplexity increases in percent against the uncompressed model on the calibration/eval text.
      layer_removal_pct: original layer index -> increase when that layer alone is removed (e.g. after healing).
      removal_order / removal_curve_pct: optional iterative measurement: the layers in the order they are removed
        and, for k layers removed that way, the measured increase (it beats composing single-layer scores).
      scheme_loss_pct: scheme name (Q4_K_M, int4_b32, ...) -> measured increase of that scheme on the full model.
      vision_loss_pct: vision dtype (f16, q8_0) -> measured increase.
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
) -> QualityPrediction:
    """Predicted perplexity increase (percent) with its terms; measured values replace priors where given."""
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
        depth_pct, depth_source, layers = depth_prior_pct(facts, layers_removed), "prior", None
        if layers_removed == 0:
            layers = []

    vision_pct = 0.0
    if vision_dtype is not None:
        vision_pct = sens.vision_loss_pct.get(vision_dtype, VISION_PRIOR_PCT.get(vision_dtype, 0.0))

    return QualityPrediction(
        total_pct=combine_pct(quant_pct, depth_pct, vision_pct),
        quant_pct=quant_pct,
        depth_pct=depth_pct,
        vision_pct=vision_pct,
        layers=layers,
        quant_source=quant_source,
        depth_source=depth_source,
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
