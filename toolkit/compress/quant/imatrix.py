"""llama.cpp's importance matrix, gathered on the torch model: the `imatrix` quantization method.

llama.cpp's own method for low-bit GGUF files (tools/imatrix, then llama-quantize --imatrix): no change to the
weights; the quantizer rounds each tensor ``W`` with one weight per input column,

    imatrix_W[j] = in_sum2_j / counts_W,      in_sum2_j = sum_t x_tj^2,   counts_W = number of tokens t

where ``x_t`` is the input of ``W``'s matmul at token ``t`` over the calibration text (llama-imatrix's
``collect_imatrix``: every ``blk.*`` weight, one count per token row; the output head is left out, as
llama-imatrix does by default). ``gather_imatrix`` sums the same quantities with forward hooks on every
``nn.Linear`` of the decoder layers (float64 sums), running only the base model (no output head) in
mini-batches, so the matrix is gathered on exactly the model that is exported. exporters/gguf_imatrix.py writes
it in llama-imatrix's GGUF format, and the GGUF export passes it to ``llama_model_quantize``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from toolkit.compress.quant.rtn import decoder_linears, resolve_text_family
from toolkit.core.errors import BedsideError

DATASET_NAME = "bedside-calibration"


@dataclass
class ImatrixStats:
    """Summed squared inputs per decoder linear (``in_sum2``, full weight names), tokens summed, how it ran."""

    in_sum2: dict[str, np.ndarray]
    counts: dict[str, int]
    sequences: int
    seq_len: int
    seconds: float

    @classmethod
    def from_sums(cls, sums: dict[str, torch.Tensor], calib_ids: torch.Tensor, seconds: float) -> ImatrixStats:
        """The stats of float64 sums gathered over every token of `calib_ids` (each weight saw them all)."""
        tokens = int(calib_ids.numel())
        return cls(
            in_sum2={name: total.cpu().numpy().astype(np.float32) for name, total in sums.items()},
            counts=dict.fromkeys(sums, tokens),
            sequences=int(calib_ids.shape[0]),
            seq_len=int(calib_ids.shape[1]),
            seconds=seconds,
        )

    def means(self) -> dict[str, np.ndarray]:
        """``in_sum2 / counts`` per weight: what the quantizer receives (float32)."""
        return {
            name: (sums / max(self.counts[name], 1)).astype(np.float32) for name, sums in self.in_sum2.items()
        }

    def write(self, path: str | Path, dataset: str = DATASET_NAME) -> Path:
        """Write the matrix in llama-imatrix's GGUF format (exporters/gguf_imatrix.py)."""
        from exporters.gguf_imatrix import write_imatrix

        return write_imatrix(
            path,
            self.in_sum2,
            self.counts,
            datasets=[dataset],
            chunk_count=self.sequences,
            chunk_size=self.seq_len,
        )

    def record(self) -> dict[str, Any]:
        """What compression.json keeps: the definition, the tokens, the tensors and the time."""
        return {
            "method": "imatrix",
            "definition": "in_sum2_j / counts = mean_t x_tj^2 per input column j of every decoder linear",
            "gathered_on": "the model as exported (no scales)",
            "sequences": self.sequences,
            "seq_len": self.seq_len,
            "tokens": self.sequences * self.seq_len,
            "tensors": len(self.in_sum2),
            "seconds": round(self.seconds, 3),
        }


@torch.no_grad()
def gather_imatrix(model: nn.Module, calib_ids: torch.Tensor, *, batch_size: int = 8) -> ImatrixStats:
    """Sum ``x_tj^2`` over every calibration token at the input of every decoder linear (module docstring).

    Args:
        calib_ids: ``[n_sequences, seq_len]`` token ids, each sequence run on its own (no cross-sequence context).
        batch_size: sequences per forward pass (memory, not the result, depends on it).
    """
    if calib_ids.ndim != 2 or calib_ids.shape[0] < 1:
        raise BedsideError(f"calibration ids must be [n_sequences, seq_len], got {tuple(calib_ids.shape)}")
    start = time.perf_counter()
    family = resolve_text_family(model)
    base = model.get_submodule(family.base_model_path)
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
            total = x.pow(2).sum(0, dtype=torch.float64)
            sums[name] = sums[name] + total if name in sums else total

        return hook

    for name, linear in decoder_linears(model, family):
        handles.append(linear.register_forward_hook(hook_for(f"{name}.weight")))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for first in range(0, calib_ids.shape[0], max(1, batch_size)):
            base(input_ids=calib_ids[first : first + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        if was_training:
            model.train()
    return ImatrixStats.from_sums(sums, calib_ids, time.perf_counter() - start)
