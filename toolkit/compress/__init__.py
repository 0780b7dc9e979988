"""Compression: prune -> LoRA heal -> AWQ/RTN into export-ready float weights (pipeline, stages,
`prune/`, heal, `quant/`)."""
