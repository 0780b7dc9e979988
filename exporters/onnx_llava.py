"""ONNX export of a LLaVA checkpoint: a vision graph, an embedding graph and a decoder graph with a KV cache.

`bedside export --format onnx` on a LlavaForConditionalGeneration folder (llava-hf layout) writes three
graphs into the export folder, so that ONNX Runtime answers image questions without torch:

- `vision_encoder.onnx`: pixel_values [1, 3, H, W] (CLIPImageProcessor's pixels) -> image_features
  [1, image_tokens, hidden]: the CLIP tower's hidden state at `vision_feature_layer` (several layers
  concatenated when it is a list), the CLS position dropped under strategy "default", then the projector
  (the same steps as transformers' `LlavaModel.get_image_features`);
- `embed_tokens.onnx`: input_ids [1, seq] -> inputs_embeds [1, seq, hidden] (one Gather of the language
  model's token embedding);
- `model.onnx`: the decoder, inputs_embeds [1, seq, hidden] + attention_mask [1, past + seq] + position_ids
  [1, seq] + past_key_values.N.key/value [1, kv_heads, past, head_dim] -> logits [1, seq, vocab] +
  present.N.key/value: optimum's KV-cache names and layout, so runtimes/onnx_runner.py drives text and
  image exports with one KV loop, and the folder is an ONNX artifact to every reader that looks for model.onnx.

A runner embeds text through embed_tokens.onnx and images through vision_encoder.onnx and feeds either to
the decoder at positions n_past..; the `<image>` placeholder token itself never reaches a graph (the runner
splits the prompt at it, runtimes/runner.py `prompt_parts`).

WHY torch.onnx.export of two small wrappers, not optimum. optimum-onnx has no LLaVA export at any version
(measured with optimum-onnx 0.1.0, the newest). Its text path (`text-generation-with-past`) could export the
language model alone after saving it as a LlamaForCausalLM folder (a second copy of the weights on disk),
but its graph takes input_ids only: feeding image features would need surgery on the graph (cut the
embedding Gather, make its output an input, re-plumb the shape ops optimum derives from input_ids), which
breaks with every optimum graph change. Exporting the decoder ourselves takes one load of the checkpoint and
gives the inputs_embeds interface directly. The wrapper builds the 4-D additive causal mask itself from
attention_mask (transformers passes a 4-D mask through untouched), so neither of the patches the notes
needed for a whole-LLaVA export (optimum's vmap-free sdpa mask, `find_packed_sequence_indices`) nor the
`get_placeholder_mask` patch is needed: the exported code has no data-dependent branch. Attention is
exported "eager" (plain MatMul / Softmax, which every ONNX Runtime build runs).

WHICH torch exporter. The torch.export-based exporter (`dynamo=True`, the default since torch 2.9) is used.
The TorchScript one (`dynamo=False`, deprecated) also exports these wrappers without patches and is faster
(measured on the tiny test LLaVA, 2 busy cores: child process 5 s against 15-20 s), with the same numbers
(ORT within 2e-6 of torch for both), but its decoder graph has 1,057 nodes against 290 (chains of Shape /
Gather / Constant that ORT must fold at every load) and it may be removed from torch. torch.export
specialises dimensions of size 0 or 1, so the example inputs use 2 new tokens after 3 cached ones; batch
stays 1 (the runner's one sequence). The export runs in a child process: its torch model and tracing memory
end with it, and the parent (a test session, a deploy) never imports torch for it.

Schemes (toolkit/core/formats.py ONNX_SCHEMES): fp32 keeps the three graphs as exported; fp16 converts all
three (onnxruntime.transformers.float16, inputs and outputs fp16, as text fp16 exports); int8 / int4
quantize the decoder only (MatMulNBits, onnx_exporter.quantize_weights: lm_head int8 by default) and give the
embedding graph the text exports' embedding treatment (int8 GatherBlockQuantized by default): the vision
graph stays float in every weight-only scheme (a small share of the bytes: CLIP ViT-L/14 is about 4 % of
LLaVA-1.5-7B's parameters). A tied lm_head is stored in both the decoder and the embedding graph (the
decoder has no Gather to share it with).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.core.vision import ONNX_EMBEDDING_FILE, ONNX_VISION_FILE

if TYPE_CHECKING:
    import torch

VISION_FILE = ONNX_VISION_FILE
EMBEDDING_FILE = ONNX_EMBEDDING_FILE
DECODER_FILE = "model.onnx"  # onnx_exporter.MODEL_FILE: what makes the folder an ONNX artifact
# Graph role -> file, in the order an export moves them into place (the decoder last).
GRAPH_FILES: dict[str, str] = {"vision": VISION_FILE, "embedding": EMBEDDING_FILE, "decoder": DECODER_FILE}
OPSET = 18
IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 10 (onnx_exporter.MAX_IR_VERSION)
# protobuf's 2 GiB limit with a margin (onnx_exporter.EXTERNAL_DATA_THRESHOLD)
LARGE_GRAPH_BYTES = 1_800_000_000

# ----------------------------------------------------------------------------------------------
# The child process: torch -> float ONNX graphs


def main(argv: list[str]) -> int:
    """Child-process entry: `export_float_graphs(model_dir, output)`; on failure the traceback, then one last
    line naming the root cause (torch.export wraps it in several layers), which the parent reports."""
    import traceback

    try:
        export_float_graphs(argv[0], argv[1])
    except Exception as error:
        traceback.print_exc()
        root: BaseException = error
        while root.__cause__ is not None:
            root = root.__cause__
        lines = str(root).strip().splitlines() or [""]
        print(f"LLaVA export error: {type(root).__name__}: {lines[0]}", file=sys.stderr)
        return 1
    return 0


def export_float_graphs(model_dir: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Load the LLaVA in fp32 and write the three float graphs into `output` (runs in the child process).

    Heavy: imports torch and transformers; onnx_exporter.run_llava_export runs it in a child process. Each
    graph is `<name>.onnx`, with its tensors in `<name>.onnx.data` when they pass protobuf's 2 GB.
    """
    import torch
    from transformers import LlavaForConditionalGeneration

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = LlavaForConditionalGeneration.from_pretrained(
        model_dir,
        dtype=torch.float32,
        attn_implementation="eager",
        local_files_only=True,
        trust_remote_code=False,
    ).eval()
    with torch.no_grad():
        export_vision_graph(model, output / VISION_FILE)
        write_embedding_graph(model.get_input_embeddings().weight.detach(), output / EMBEDDING_FILE)
        export_decoder_graph(model, output / DECODER_FILE)


def _vision_module(model: Any) -> torch.nn.Module:
    """pixel_values -> projected image features, as LlavaModel.get_image_features computes them."""
    import torch

    class VisionGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = model.model.vision_tower
            self.projector = model.model.multi_modal_projector
            self.layer = model.config.vision_feature_layer
            self.strategy = model.config.vision_feature_select_strategy
            if self.strategy not in ("default", "full"):
                raise ValueError(f"unsupported vision_feature_select_strategy {self.strategy!r}")

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
            layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
            selected = [
                hidden[index][:, 1:] if self.strategy == "default" else hidden[index] for index in layers
            ]
            return self.projector(selected[0] if len(selected) == 1 else torch.cat(selected, dim=-1))

    return VisionGraph().eval()


def export_vision_graph(model: Any, path: Path) -> None:
    """vision_encoder.onnx: pixel_values [1, 3, H, W] -> image_features [1, image_tokens, hidden] (static shapes)."""
    import torch

    vision = model.config.vision_config
    pixels = torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size)
    _torch_onnx_export(
        _vision_module(model), (pixels,), path, input_names=["pixel_values"], output_names=["image_features"]
    )


def write_embedding_graph(weight: torch.Tensor, path: Path) -> None:
    """embed_tokens.onnx: input_ids [1, seq] -> inputs_embeds [1, seq, hidden], one Gather of the embedding table."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(weight.float().cpu().numpy(), "embed_tokens.weight")
    rows, hidden = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node(
                "Gather", ["embed_tokens.weight", "input_ids"], ["inputs_embeds"], name="embed_tokens"
            )
        ],
        "embed_tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "sequence_length"])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, [1, "sequence_length", hidden])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="bedside")
    model.ir_version = IR_VERSION
    large = table.ByteSize() > LARGE_GRAPH_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data")


def _decoder_module(model: Any) -> torch.nn.Module:
    """(inputs_embeds, attention_mask, position_ids, *past) -> (logits, *present) around the language model."""
    import torch
    from transformers import DynamicCache

    layers = model.config.text_config.num_hidden_layers

    class DecoderGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.language_model = model.model.language_model
            self.lm_head = model.lm_head

        def forward(
            self,
            inputs_embeds: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            *past: torch.Tensor,
        ) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)])
            new, total = inputs_embeds.shape[1], attention_mask.shape[1]
            # 4-D additive mask: query i (at position total - new + i) sees keys 0..that position, unpadded.
            rows = torch.arange(new, device=inputs_embeds.device)[:, None] + (total - new)
            columns = torch.arange(total, device=inputs_embeds.device)[None, :]
            allowed = (columns <= rows)[None, None] & attention_mask[:, None, None, :].bool()
            mask = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
            mask = mask.masked_fill(~allowed, torch.finfo(inputs_embeds.dtype).min)
            output = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present: list[torch.Tensor] = []
            for layer in output.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (self.lm_head(output.last_hidden_state), *present)

    return DecoderGraph().eval()


def export_decoder_graph(model: Any, path: Path) -> None:
    """model.onnx: the language model + lm_head with inputs_embeds and optimum's past/present names and layout."""
    import torch
    from torch.export import Dim

    text = model.config.text_config
    layers = text.num_hidden_layers
    kv_heads = text.num_key_value_heads or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    past_length, new = 3, 2  # torch.export specialises sizes 0 and 1: example with neither
    past = tuple(torch.zeros(1, kv_heads, past_length, head_dim) for _ in range(2 * layers))
    inputs = (
        torch.zeros(1, new, text.hidden_size),
        torch.ones(1, past_length + new, dtype=torch.long),
        torch.arange(past_length, past_length + new)[None],
        *past,
    )
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    sequence, total, cached = Dim("sequence_length"), Dim("total_length"), Dim("past_sequence_length")
    # One entry per forward() parameter; *past is one tuple of specs.
    dynamic_shapes = ({1: sequence}, {1: total}, {1: sequence}, tuple({2: cached} for _ in past_names))
    _torch_onnx_export(
        _decoder_module(model),
        inputs,
        path,
        input_names=["inputs_embeds", "attention_mask", "position_ids", *past_names],
        output_names=["logits", *(name.replace("past_key_values", "present") for name in past_names)],
        dynamic_shapes=dynamic_shapes,
    )


def _torch_onnx_export(
    module: torch.nn.Module,
    inputs: tuple[Any, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple[Any, ...] | None = None,
) -> None:
    """torch.onnx.export with the torch.export-based exporter (opset OPSET), saved to `path`."""
    import torch

    program = torch.onnx.export(
        module,
        inputs,
        dynamo=True,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        opset_version=OPSET,
        optimize=True,
        verbose=False,
    )
    program.save(str(path))  # tensors in <path>.data past 2 GB; the exporter re-saves every graph
