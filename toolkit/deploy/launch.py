"""A bundle's launch files in the target runtime's own terms: how to run it, and its model card.

Why: hospital IT runs the bundle with the runtime it was validated on, so the README, the launch files and
the settings they carry must name that runtime and agree with runtime.json, the one source of the settings:
- llama.cpp (GGUF): a `llama-server` command (-c, -t, -ngl, the KV cache precision -ctk/-ctv, flash attention
  -fa, --no-kv-offload, --no-mmap, as runtime.json says) and an Ollama `Modelfile` (FROM the model file, TEMPLATE
  the model's chat template in Go-template form when it is a known family, PARAMETER num_ctx / stop / temperature
  / num_thread / num_gpu from runtime.json; Ollama sets the KV cache type and flash attention for its whole
  server, OLLAMA_KV_CACHE_TYPE and OLLAMA_FLASH_ATTENTION, and cannot keep the KV cache in host memory while the
  layers run on the GPU: the Modelfile says so in comments);
- onnxruntime (ONNX): a short ONNX Runtime Python snippet (greedy decoding with the export's KV cache);
- both: MODEL_CARD.md with Hugging Face style YAML front matter (license, base_model, tags, quantized_by)
  and the validation figures of the report (perplexity increase, KL divergence, peak memory vs budget).

Everything here reads runtime.json's content as a dict (`RuntimeConfig.model_dump`), never the other way
round: what the files say is what runtime.json says.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from runtimes.runner import render_chat_template
from toolkit.validate.checks import Check, format_number

MODELFILE = "Modelfile"
MODEL_CARD = "MODEL_CARD.md"
TEMPERATURE = 0.0  # validation and verify decode greedily; the launch files keep that
QUESTION = "\x00question\x00"  # placeholder rendered through the chat template for the ONNX snippet


@dataclass(frozen=True)
class ChatFormat:
    """A chat-template family that Ollama's Go templates can express exactly."""

    name: str
    marker: str  # text of the Jinja template that identifies the family
    template: str  # the Ollama TEMPLATE (Go text/template over .Messages)
    stop: tuple[str, ...]


CHAT_FORMATS = (
    ChatFormat(
        "Llama 3",
        "<|start_header_id|>",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>",),
    ),
    ChatFormat(
        "ChatML",
        "<|im_start|>",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        ("<|im_end|>",),
    ),
    ChatFormat(
        "Gemma",
        "<start_of_turn>",
        '{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model{{ else }}user{{ end }}\n'
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        ("<end_of_turn>",),
    ),
)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class ChatInfo:
    """What the launch files need of a tokenizer folder: its Jinja chat template, special tokens, family."""

    template: str | None
    bos_token: str
    eos_token: str
    family: ChatFormat | None

    @property
    def stop(self) -> list[str]:
        """Stop strings: the family's end-of-turn token, then the tokenizer's EOS if it differs."""
        stop = list(self.family.stop) if self.family else []
        if self.eos_token and self.eos_token not in stop:
            stop.append(self.eos_token)
        return stop


def chat_info(folder: Path) -> ChatInfo:
    """The chat template (chat_template.jinja or tokenizer_config.json) and special tokens of `folder`."""
    config = _read_json(folder / "tokenizer_config.json")
    template_file = folder / "chat_template.jinja"
    template: Any = (
        template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
    )
    if isinstance(template, list):  # several named templates: the default one
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    template = template if isinstance(template, str) and template.strip() else None
    family = next((f for f in CHAT_FORMATS if template and f.marker in template), None)
    return ChatInfo(
        template=template,
        bos_token=_token_text(config.get("bos_token")) or "",
        eos_token=_token_text(config.get("eos_token")) or "",
        family=family,
    )


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(runtime: dict[str, Any], chat: ChatInfo, name: str) -> str:
    """Ollama's Modelfile of a GGUF bundle: FROM, TEMPLATE and PARAMETERs of runtime.json."""
    lines = [
        f"# Ollama Modelfile of {name}: settings from runtime.json (context, stop tokens, temperature).",
        f"# In this folder: ollama create {name} -f {MODELFILE} && ollama run {name}",
        f"FROM ./{runtime['model']}",
    ]
    if chat.family is not None:
        lines.append(
            f"# TEMPLATE: the model's {chat.family.name} chat template (tokenizer/) in Go-template form"
        )
        lines.append(f'TEMPLATE """{chat.family.template}"""')
    elif chat.template is not None:
        lines += [
            "# TEMPLATE: the model's chat template (tokenizer/chat_template.jinja or tokenizer_config.json) is not",
            "# a family Bedside translates (ChatML, Llama 3, Gemma); Ollama takes the template stored in the GGUF",
            "# when it recognises it. Otherwise write a TEMPLATE line here by hand before `ollama create`.",
        ]
    else:
        lines.append(
            "# TEMPLATE: the model has no chat template (a base model): prompts are sent as they are."
        )
    lines.append(f"PARAMETER num_ctx {runtime['context']}")
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in runtime.get("stop") or []]
    lines.append(f"PARAMETER temperature {runtime['temperature']:g}")
    if runtime.get("threads"):
        lines.append(f"PARAMETER num_thread {runtime['threads']}")
    layers = runtime.get("gpu_layers")
    if isinstance(layers, int) and layers > 0:
        lines.append(f"# num_gpu: the layers Ollama sends to the GPU (llama.cpp -ngl {layers}), as validated")
        lines.append(f"PARAMETER num_gpu {layers}")
    kv = runtime.get("kv_cache_dtype")
    if kv and kv != "f16":
        lines.append(
            f"# KV cache {kv}: Ollama sets it for the whole server, not here: start it with "
            f"OLLAMA_KV_CACHE_TYPE={kv} OLLAMA_FLASH_ATTENTION=1 ollama serve"
        )
    if runtime.get("kv_offload") is False:
        lines.append(
            "# KV cache in host memory (llama.cpp --no-kv-offload): Ollama has no such setting; use llama-server "
            "(README) to run as validated"
        )
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """PARAMETER values of a Modelfile by name (quoted values unquoted), for tests and checks."""
    parameters: dict[str, list[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^PARAMETER\s+(\S+)\s+(.+)$", line)
        if match:
            value = match.group(2).strip()
            if value.startswith('"') and value.endswith('"'):
                value = json.loads(value)
            parameters.setdefault(match.group(1), []).append(value)
    return parameters


def llama_cpp_flags(runtime: dict[str, Any]) -> str:
    """llama-server / llama-cli flags of runtime.json's settings, each followed by a space:
    -t threads, -ngl (99 = every layer, N = the head and N - 1 layers), -ctk/-ctv KV cache type, -fa on/off,
    --no-kv-offload, --no-mmap."""
    flags = []
    if runtime.get("threads"):
        flags.append(f"-t {runtime['threads']}")
    layers = runtime.get("gpu_layers")
    if isinstance(layers, int) and layers != 0:
        flags.append(f"-ngl {99 if layers < 0 else layers}")
    kv = runtime.get("kv_cache_dtype")
    if kv and kv != "f16":
        flags.append(f"-ctk {kv} -ctv {kv}")
    if isinstance(runtime.get("flash_attn"), bool):
        flags.append(f"-fa {'on' if runtime['flash_attn'] else 'off'}")
    if runtime.get("kv_offload") is False:
        flags.append("--no-kv-offload")
    if runtime.get("mmap") is False:
        flags.append("--no-mmap")
    return "".join(f"{flag} " for flag in flags)


def _kv_note(runtime: dict[str, Any]) -> str:
    notes = []
    kv = runtime.get("kv_cache_dtype")
    if kv and kv != "f16":
        notes.append(
            f"`-ctk {kv} -ctv {kv}`: the KV cache is stored as {kv}, as validated (a quantized V cache needs flash "
            "attention, `-fa on`)."
        )
    if runtime.get("kv_offload") is False:
        notes.append("`--no-kv-offload`: the KV cache stays in host memory while the layers run on the GPU.")
    layers = runtime.get("gpu_layers")
    if isinstance(layers, int) and layers > 0:
        notes.append(
            f"`-ngl {layers}`: the output head and {max(0, layers - 1)} layers on the GPU, the rest in host memory "
            "(what fits the GPU's budget)."
        )
    return "".join(f"\n{note}\n" for note in notes)


def _vision_note(runtime: dict[str, Any]) -> str:
    """How to ask about an image with llama.cpp, and the libmtmd defect a target's own build may have."""
    if not runtime.get("mmproj"):
        return ""
    return f"""
Images: `{runtime["mmproj"]}` is the vision tower and projector. One question about one image:

```bash
llama-mtmd-cli -m {runtime["model"]} --mmproj {runtime["mmproj"]} --image scan.png -p "Is there a fracture?" --temp 0
```

Check the llama.cpp build first. Builds without the fix for llama.cpp issue #25814 (pull request #25844) put
CLIP's class token after the image patches in LLaVA-1.5-style graphs. Such a build answers image questions
differently from the validated model, with no error. `bedside run`/`verify` correct the order at run time;
llama-server, llama-mtmd-cli and Ollama need a build with the fix.
"""


def llama_cpp_section(runtime: dict[str, Any], name: str, mmap_note: str) -> str:
    """README section 2 of a GGUF bundle: llama-server, then Ollama with the Modelfile."""
    flags = llama_cpp_flags(runtime)
    mmproj = runtime.get("mmproj")
    projector = f"--mmproj {mmproj} " if mmproj else ""
    return f"""With llama.cpp (`llama-server` or `llama-cli` of a recent release):

```bash
llama-server -m {runtime["model"]} {projector}-c {runtime["context"]} {flags}--temp {runtime["temperature"]:g} --port 8080
```
{mmap_note}{_kv_note(runtime)}{_vision_note(runtime)}
With Ollama, from this folder (`{MODELFILE}` holds the model file, chat template, context, stop tokens and
temperature of `runtime.json`):

```bash
ollama create {name} -f {MODELFILE}
ollama run {name}
```
"""


def onnx_snippet(runtime: dict[str, Any], chat: ChatInfo) -> str:
    """A short ONNX Runtime program: greedy answer to one question with the export's KV cache."""
    try:
        rendered = render_chat_template(
            chat.template,
            [{"role": "user", "content": QUESTION}],
            bos_token=chat.bos_token,
            eos_token=chat.eos_token,
        )
        before, after = rendered.split(QUESTION, 1)
    except Exception:  # a template that cannot be rendered here: the plain question, and say so
        before, after = "", ""
    model = runtime["model"].rstrip("/")
    providers = (
        '["CUDAExecutionProvider", "CPUExecutionProvider"]'
        if runtime.get("gpu_layers")
        else '["CPUExecutionProvider"]'
    )  # ONNX Runtime: the whole graph on one provider, its float KV cache with it
    options = f"options.intra_op_num_threads = {runtime['threads']}\n" if runtime.get("threads") else ""
    return f"""```python
# pip install onnxruntime tokenizers numpy   (onnxruntime-gpu on a CUDA device)
import json
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

options = ort.SessionOptions()
{options}session = ort.InferenceSession("{model}/model.onnx", options, providers={providers})
tokenizer = Tokenizer.from_file("{model}/tokenizer.json")
config = json.load(open("{model}/config.json"))
eos = config.get("eos_token_id")
stop = {{tokenizer.token_to_id(t) for t in {json.dumps(runtime.get("stop") or [])}}} | set(eos if isinstance(eos, list) else [eos])
inputs = {{i.name: i for i in session.get_inputs()}}
outputs = [o.name for o in session.get_outputs()]
heads = config.get("num_key_value_heads") or config["num_attention_heads"]
head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
past = {{n: np.zeros((1, heads, 0, head_dim), np.float16 if "float16" in i.type else np.float32)
        for n, i in inputs.items() if n.startswith("past_key_values.")}}
question = "Summarise in one sentence: Heart size is normal. The lungs are clear."
prompt = {json.dumps(before)} + question + {json.dumps(after)}  # the model's chat template
ids, done, answer = tokenizer.encode(prompt, add_special_tokens=False).ids, 0, []
while done + len(ids) < {runtime["context"]} and len(answer) < 256:  # context {runtime["context"]} tokens, greedy
    feed = {{"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, done + len(ids)), np.int64),
            "position_ids": np.arange(done, done + len(ids), dtype=np.int64)[None, :],
            "use_cache_branch": np.array([done > 0]), **past}}
    out = dict(zip(outputs, session.run(outputs, {{k: v for k, v in feed.items() if k in inputs}})))
    past = {{n.replace("present", "past_key_values", 1): v for n, v in out.items() if n.startswith("present")}}
    done, token = done + len(ids), int(out["logits"][0, -1].argmax())
    if token in stop:
        break
    answer, ids = answer + [token], [token]
print(tokenizer.decode(answer))
```
"""


def onnx_section(runtime: dict[str, Any], chat: ChatInfo) -> str:
    """README section 2 of an ONNX bundle: the ONNX Runtime snippet."""
    return f"""With ONNX Runtime from Python (the model is the ONNX export in `{runtime["model"].rstrip("/")}/`,
with its KV-cache inputs; temperature {runtime["temperature"]:g}, i.e. greedy decoding, as validated):

{onnx_snippet(runtime, chat)}"""


# ---------------------------------------------------------------- model card


def _front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a README.md (Hugging Face model card), or {}."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def source_facts(folders: Sequence[Path], model_name: str) -> tuple[str, str]:
    """(license, base_model) of the source model, from its README front matter, config.json or demo recipe.

    License "unknown" when no file says; base_model a hub id where one is recorded (the README's
    `base_model` is the source's own parent, so it is not used), else the recipe's or folder's name.
    """
    license_name: str | None = None
    base_model: str | None = None
    for folder in folders:
        card = _front_matter(folder / "README.md")
        config = _read_json(folder / "config.json")
        recipe = _read_json(folder / "bedside-demo.json")
        for value in (card.get("license"), config.get("license"), recipe.get("license")):
            if license_name is None and isinstance(value, str) and value.strip():
                license_name = value.strip().lower()
        hub = re.search(r"models--([^/]+)--([^/]+)", folder.as_posix())
        name_or_path = config.get("_name_or_path")
        for value in (
            f"{hub.group(1)}/{hub.group(2)}" if hub else None,
            name_or_path
            if isinstance(name_or_path, str) and re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path)
            else None,
            recipe.get("model"),
        ):
            if base_model is None and isinstance(value, str) and value.strip():
                base_model = value.strip()
    if base_model is None:
        base_model = Path(model_name).name if model_name not in ("", ".") else "unknown"
    return license_name or "unknown", base_model


def _figure(checks: Sequence[Check], name: str) -> str:
    check = next((c for c in checks if c.name == name), None)
    if check is None:
        return "not measured"
    verdict = "PASS" if check.passed else "FAIL"
    return f"{format_number(check.value, check.unit)} (limit {check.comparison} {format_number(check.threshold, check.unit)}, {verdict})"


def model_card(
    *,
    name: str,
    runtime: dict[str, Any],
    license_name: str,
    base_model: str,
    profile: str,
    layers_removed: int,
    checks: Sequence[Check],
    budget_bytes: int,
    peak_bytes: float | None,
    version: str,
) -> str:
    """MODEL_CARD.md: YAML front matter (license, base_model, tags, quantized_by) and the validation figures."""
    fmt = str(runtime["format"]).lower()
    tags = ["medical", "quantized", fmt, str(runtime["runtime"]), str(runtime["quant"]), "bedside"]
    front = {
        "license": license_name,
        "base_model": base_model,
        "tags": list(dict.fromkeys(tags)),
        "quantized_by": "Bedside",
        "pipeline_tag": "text-generation",
    }
    rows = "\n".join(
        f"| {c.name} | {format_number(c.value, c.unit)} | {c.comparison} {format_number(c.threshold, c.unit)} "
        f"| {'PASS' if c.passed else 'FAIL'}{'' if c.blocking else ' (reported only)'} |"
        for c in checks
    )
    return f"""---
{yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip()}
---

# {name}

`{base_model}` compressed by Bedside {version} for the device profile `{profile}`: {runtime["format"]}
{runtime["quant"]} on {runtime["runtime"]}, {layers_removed} decoder layers removed, context {runtime["context"]} tokens.

## Validation (from report.json)

- Perplexity increase over the original model: {_figure(checks, "perplexity_increase_pct")}
- KL divergence from the original model: {_figure(checks, "kl_divergence")}
- Peak memory: {format_number(peak_bytes, "bytes")} measured against a budget of {format_number(budget_bytes, "bytes")}
  with the KV cache filled to {runtime["context"]} tokens

| check | value | threshold | result |
| --- | --- | --- | --- |
{rows}

## Intended use

A decision-support aid for clinicians; outputs must be reviewed by a qualified person. It is not a medical
device. The license of the base model applies to this compressed copy.
"""
