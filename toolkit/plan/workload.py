"""What one forward step of a deployment touches: per-layer weight bytes, FLOPs, KV geometry (simulator input).

Sources of the tensor table, most exact first:
  * a GGUF file: every tensor's stored type and bytes as the file holds them (its header), the
    model's dimensions from the file's metadata (`{arch}.block_count`, `.embedding_length`, ...);
  * an ONNX export folder: its config.json and export.json's scheme, typed by the memory estimator's tables
    (toolkit.plan.memory.text_weights: MatMulNBits, the exporter's 8-bit head and embedding);
  * a plan.json: the chosen candidate, typed by the same tables from the model's config.json;
  * a bundle: its runtime.json names the model file or folder inside it (then as above).
The same facts, deployment and tensor list feed toolkit.plan.memory.estimate_memory, so the simulator's
capacity checks and the planner's memory estimate agree.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.core.errors import BedsideError
from toolkit.core.formats import FORMATS, GGUF_FTYPES, KV_CACHE_DTYPES, ONNX_SCHEMES
from toolkit.core.gguf_header import GGUFHeader, read_gguf_header
from toolkit.core.paths import path_inside
from toolkit.core.records import EXPORT_RECORD
from toolkit.model.facts import ModelFacts, facts_from_config, read_facts
from toolkit.model.storage_types import ONNX_FLOAT_BYTES, StoredTensor
from toolkit.plan.memory import (
    ORT_PREFILL_CHUNK,
    Deployment,
    RuntimeSettings,
    deployment_of,
    kv_cache_dtype_of,
    runtime_for,
    text_weights,
)
from toolkit.plan.schema import Plan
from toolkit.target.profiles import DeviceProfile

FLOAT_DTYPES = frozenset({"F32", "F16", "BF16", "fp32", "fp16", "bf16"})
# llama.h `enum llama_ftype` (llama-cpp-python 0.3.36): general.file_type -> the scheme names Bedside uses.
LLAMA_FTYPES: dict[int, str] = {number: scheme for scheme, number in GGUF_FTYPES.items()}
RUNTIME_CONFIG = "runtime.json"  # the bundle's runtime settings (toolkit/deploy/bundle.py RUNTIME_CONFIG)


@dataclass(frozen=True)
class Workload:
    """A deployment as the epoch model sees it (bytes at stored types, FLOPs per token, KV geometry)."""

    label: str
    runtime: str
    format: str
    quant: str
    facts: ModelFacts
    deployment: Deployment
    tensors: tuple[StoredTensor, ...]
    kv_element_bytes: float
    prefill_chunk: int  # tokens per forward call of a long prompt (llama.cpp n_batch 512, OnnxRunner 128)
    head_rows_all: bool  # True: the head runs for every row of a call (the ONNX export); False: last row only
    source: str  # where the tensor table came from
    # True for a plan or a bundle (runtime.json): their placement, all on the device when they placed nothing
    # elsewhere, is the one simulated under "auto"; False for a bare export, whose placement "auto" chooses
    placement_given: bool = False
    layer_bytes: tuple[int, ...] = field(init=False)
    layer_matmul_params: int = field(
        init=False
    )  # elements of one layer's 2-D weights: FLOPs = 2 x this / token
    embedding_row_bytes: float = field(init=False)
    head_bytes: int = field(init=False)  # the output head (tied: the embedding table read in full)
    head_params: int = field(init=False)
    other_bytes: int = field(init=False)  # final norm and anything else read once per step
    quantized: bool = field(init=False)  # layer matrices in an integer format (int8 dot-product kernels)

    def __post_init__(self) -> None:
        layers = self.num_layers
        per_layer = [0] * layers
        matmul = [0] * layers
        float_bytes = quant_bytes = 0
        embd_row = 0.0
        head = head_params = other = 0
        embedding: StoredTensor | None = None
        for tensor in self.tensors:
            numel = 1
            for dim in tensor.shape:
                numel *= dim
            if tensor.layer is not None and 0 <= tensor.layer < layers:
                per_layer[tensor.layer] += tensor.nbytes
                if len(tensor.shape) == 2:
                    matmul[tensor.layer] += numel
                    if tensor.dtype in FLOAT_DTYPES:
                        float_bytes += tensor.nbytes
                    else:
                        quant_bytes += tensor.nbytes
            elif tensor.role == "token_embd":
                embedding = tensor
                embd_row = tensor.nbytes / max(1, tensor.shape[0])
            elif tensor.role == "output":
                head, head_params = tensor.nbytes, numel
            else:
                other += tensor.nbytes
        if not head and embedding is not None:  # tied: the head multiplies by the embedding table
            head, head_params = embedding.nbytes, embedding.shape[0] * embedding.shape[-1]
        object.__setattr__(self, "layer_bytes", tuple(per_layer))
        object.__setattr__(self, "layer_matmul_params", max(matmul) if matmul else 0)
        object.__setattr__(self, "embedding_row_bytes", embd_row)
        object.__setattr__(self, "head_bytes", head)
        object.__setattr__(self, "head_params", head_params)
        object.__setattr__(self, "other_bytes", other)
        object.__setattr__(self, "quantized", quant_bytes > float_bytes)

    @property
    def kv_copied_per_call(self) -> bool:
        """Whether each call copies the whole KV cache: optimum's ONNX graph concatenates past and new K/V into a
        freshly allocated `present`; llama.cpp appends in place (its ring buffer)."""
        return self.format == "onnx"

    @property
    def num_layers(self) -> int:
        return self.facts.num_layers - self.deployment.layers_removed

    @property
    def max_context(self) -> int:
        return self.facts.max_position_embeddings

    def kv_bytes_per_token_layer(self) -> float:
        """K and V of one token in one layer: 2 x kv_heads x head_dim x element bytes."""
        return 2 * self.facts.num_kv_heads * self.facts.head_dim * self.kv_element_bytes

    def weight_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)


def make_workload(
    facts: ModelFacts,
    deployment: Deployment,
    profile: DeviceProfile,
    *,
    tensors: list[StoredTensor] | None = None,
    label: str = "",
    source: str = "memory estimator tables (toolkit.plan.memory.text_weights)",
    placement_given: bool = False,
) -> Workload:
    """A Workload from facts and a deployment; `tensors` (e.g. read from a GGUF) replace the estimator's table."""
    if deployment.format not in FORMATS:
        raise BedsideError(f"unknown format '{deployment.format}'; known: {', '.join(FORMATS)}")
    runtime = deployment.runtime or runtime_for(deployment.format, profile)
    deployment = dataclasses.replace(deployment, runtime=runtime)
    table = tensors if tensors is not None else text_weights(facts, deployment)
    if deployment.format == "onnx":
        scheme = ONNX_SCHEMES.get(deployment.quant)
        if scheme is None:
            raise BedsideError(f"unknown ONNX scheme '{deployment.quant}'; known: {', '.join(ONNX_SCHEMES)}")
        kv_bytes: float = ONNX_FLOAT_BYTES[scheme.float_dtype]
        chunk, rows_all = ORT_PREFILL_CHUNK, True
    else:
        kv_bytes = KV_CACHE_DTYPES[kv_cache_dtype_of(deployment, profile)]  # the plan's KV precision
        chunk, rows_all = RuntimeSettings().n_batch, False
    return Workload(
        label=label or f"{deployment.format} {deployment.quant}",
        runtime=runtime,
        format=deployment.format,
        quant=deployment.quant,
        facts=facts,
        deployment=deployment,
        tensors=tuple(table),
        kv_element_bytes=kv_bytes,
        prefill_chunk=chunk,
        head_rows_all=rows_all,
        source=source,
        placement_given=placement_given,
    )


# ---------------------------------------------------------------------------------------------
# From files


def workload_from_plan(plan: Plan, profile: DeviceProfile, label: str = "") -> Workload:
    """The plan's chosen candidate, typed by the estimator's tables from the model's config.json."""
    if plan.chosen is None:
        raise BedsideError("the plan has no chosen candidate to simulate (nothing fit when it was made)")
    chosen = plan.chosen
    facts = read_facts(plan.model)
    deployment = deployment_of(chosen)  # with the plan's KV precision and placement
    return make_workload(
        facts,
        deployment,
        profile,
        label=label or f"plan: {plan.model} {chosen.format} {chosen.quant}",
        placement_given=True,
    )


def _gguf_scalar(header: GGUFHeader, key: str) -> object | None:
    """A metadata value; an array's first item (a per-layer setting such as some models' head counts)."""
    value = header.values.get(key)
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _gguf_role(name: str) -> tuple[str, int | None]:
    """'blk.3.attn_q.weight' -> ('attn_q', 3); 'token_embd.weight' -> ('token_embd', None)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 3 and parts[1].isdigit():
        return parts[2], int(parts[1])
    return parts[0], None


# llama.cpp's `general.architecture` where it differs from the Hugging Face model_type of the same family.
GGUF_ARCH_MODEL_TYPE = {"gemma3": "gemma3_text"}


def read_gguf_workload(
    path: Path, profile: DeviceProfile, quant: str | None = None, settings: dict[str, Any] | None = None
) -> Workload:
    """Tensor table and dimensions of a GGUF file (its own bytes per tensor), for llama.cpp; `settings` (a
    bundle's runtime.json) gives the KV precision and placement the bundle runs with."""
    reader = read_gguf_header(path)  # GgufHeaderError (a BedsideError) names the file and the fault
    arch = _gguf_scalar(reader, "general.architecture")
    if not isinstance(arch, str):
        raise BedsideError(f"{path}: the GGUF file names no general.architecture")

    def number(key: str, required: bool = True) -> int | None:
        value = _gguf_scalar(reader, f"{arch}.{key}")
        if value is None and required:
            raise BedsideError(f"{path}: GGUF metadata has no {arch}.{key}")
        return None if value is None else int(value)  # type: ignore[arg-type]

    tensors: list[StoredTensor] = []
    for tensor in reader.tensors:
        if tensor.n_bytes is None:
            raise BedsideError(f"{path}: tensor {tensor.name} has {tensor.type_name}, unknown to this gguf package")
        role, layer = _gguf_role(tensor.name)
        shape = tuple(reversed(tensor.shape))  # ggml ne -> torch order
        tensors.append(StoredTensor(tensor.name, role, layer, shape, tensor.type_name, tensor.n_bytes))
    embedding = next((t for t in tensors if t.role == "token_embd"), None)
    if embedding is None:
        raise BedsideError(f"{path}: the GGUF file has no token_embd tensor")
    heads = number("attention.head_count")
    config = {
        "model_type": GGUF_ARCH_MODEL_TYPE.get(arch, arch),
        "hidden_size": number("embedding_length"),
        "intermediate_size": number("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": number("attention.head_count_kv", False) or heads,
        "head_dim": number("attention.key_length", False),
        "num_hidden_layers": number("block_count"),
        "vocab_size": embedding.shape[0],
        "max_position_embeddings": number("context_length"),
        "tie_word_embeddings": not any(t.role == "output" for t in tensors),
    }
    facts = facts_from_config(config)
    if quant is None:
        # general.file_type is what llama.cpp wrote; bedside.quant survives re-quantizing a kept F16, so it is second
        file_type = _gguf_scalar(reader, "general.file_type")
        named = _gguf_scalar(reader, "bedside.quant")
        quant = LLAMA_FTYPES.get(int(file_type)) if file_type is not None else None  # type: ignore[arg-type]
        quant = quant or (named if isinstance(named, str) else None)
    if quant not in FORMATS["gguf"]:
        raise BedsideError(
            f"{path}: cannot tell the GGUF scheme ({quant or 'no bedside.quant or known general.file_type'}); "
            f"Bedside simulates {', '.join(FORMATS['gguf'])}"
        )
    deployment = _with_runtime_settings(Deployment("gguf", quant, 0, None, "llama.cpp"), settings, facts)
    return make_workload(facts, deployment, profile, tensors=tensors, label=f"{path.name} ({quant})",
                         source=f"tensor table of {path.name} (its GGUF header)",
                         placement_given=settings is not None)  # fmt: skip


def _with_runtime_settings(
    deployment: Deployment, settings: dict[str, Any] | None, facts: ModelFacts
) -> Deployment:
    """The deployment with runtime.json's KV precision and placement (toolkit.deploy.bundle.RuntimeConfig)."""
    if not settings:
        return deployment
    kv = settings.get("kv_cache_dtype")
    layers = settings.get("gpu_layers")
    kept = facts.num_layers - deployment.layers_removed
    gpu_layers = (
        layers if isinstance(layers, int) and 0 < layers <= kept else None
    )  # -1 / 0: the runtime's all
    return dataclasses.replace(
        deployment,
        kv_cache_dtype=kv if isinstance(kv, str) and kv in KV_CACHE_DTYPES else None,
        kv_on_host=settings.get("kv_offload") is False,
        gpu_layers=gpu_layers,
    )


def read_onnx_workload(folder: Path, profile: DeviceProfile) -> Workload:
    """An ONNX export folder: config.json + export.json's scheme, typed by the estimator's tables."""
    record_path = folder / EXPORT_RECORD
    if not (folder / "config.json").is_file() or not record_path.is_file():
        raise BedsideError(
            f"{folder}: an ONNX export folder needs config.json and {EXPORT_RECORD} to simulate"
        )
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise BedsideError(f"{folder}: cannot read {EXPORT_RECORD} or config.json ({error})") from None
    quant = record.get("quant")
    if quant not in FORMATS["onnx"]:
        raise BedsideError(
            f"{record_path}: unknown ONNX scheme {quant!r} (known: {', '.join(FORMATS['onnx'])})"
        )
    facts = facts_from_config(config)
    removed = record.get("layers_removed") or []
    deployment = Deployment(
        "onnx", quant, len(removed) if isinstance(removed, list) else int(removed), None, "onnxruntime"
    )
    return make_workload(facts, deployment, profile, label=f"{folder.name} (onnx {quant})")


def read_artifact_workload(
    path: Path, profile: DeviceProfile, settings: dict[str, Any] | None = None
) -> Workload:
    """A bundle folder (runtime.json: its KV precision and placement too), an export folder, or a .gguf file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BedsideError(f"{path}: no such bundle, export folder or .gguf file")
    if path.is_dir() and (path / RUNTIME_CONFIG).is_file():
        try:
            runtime_config = json.loads((path / RUNTIME_CONFIG).read_text(encoding="utf-8"))
            name = runtime_config["model"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise BedsideError(f"{path / RUNTIME_CONFIG}: not a bundle's runtime.json ({error})") from None
        model = path_inside(path, name, f"{path / RUNTIME_CONFIG}'s model")
        return read_artifact_workload(model, profile, runtime_config)
    if path.is_file() and path.suffix == ".gguf":
        quant = None
        record = path.parent / EXPORT_RECORD
        if record.is_file():
            try:
                data = json.loads(record.read_text(encoding="utf-8"))
                quant = data.get("quant") if data.get("file") == path.name else None
            except (OSError, json.JSONDecodeError):
                quant = None
        return read_gguf_workload(path, profile, quant, settings)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return read_onnx_workload(path, profile)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return read_artifact_workload(ggufs[0], profile, settings)
        if len(ggufs) > 1:
            raise BedsideError(
                f"{path}: several GGUF files ({', '.join(g.name for g in ggufs)}); name the one to simulate"
            )
    raise BedsideError(
        f"{path}: not a bundle (runtime.json), an export folder (model.onnx or one .gguf) or a .gguf file"
    )
