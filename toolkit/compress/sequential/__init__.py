"""Sequential (block-by-block) compression: memory that grows with one decoder block, not with the model.

The in-memory path (`toolkit.compress.stages.StageRunner.live_model`) holds the whole model in
float32 through every stage: 4.4 GB for a 1.1B model, 27 GB for a 7B. This package does what
llm-compressor's sequential pipeline and AutoAWQ do: the model is a skeleton on the meta device
(`model.LazyModel`), the calibration (or evaluation) batches are embedded once, and each decoder
block is loaded from the safetensors shards, run on the cached hidden states of every batch, its
statistic taken, its output states kept for the next block, then freed. Resident: one block in
float32, the batches' hidden states, and the statistic.

- `checkpoint`: positioned reads of one tensor at a time, `ShardWriter` (shard by shard, source dtype,
  untouched shards hard-linked).
- `model`: `LazyModel` (skeleton, load / release, capture of layer 0's inputs, the head).
- `scoring`: perplexity, llama.cpp's importance matrix, the selection scorers (activation,
  block-influence, angular; `last` runs on the skeleton).
- `writing`: the linear replacement's fit, the pruned checkpoint, AWQ.

Every function gives the in-memory function's result within float tolerance (tests/test_sequential.py);
the pipeline streams when `CompressOptions.sequential` says so (`auto`: models whose float32 weights
exceed `toolkit.plan.compression_memory.SEQUENTIAL_THRESHOLD_BYTES`). Healing does not stream (it needs the
whole model's backward) and loads the model in memory.
"""
