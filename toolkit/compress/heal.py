"""Healing by supervised fine-tuning: LoRA on domain text after pruning, merged back into the weights.

Why: removing decoder blocks leaves the next block reading activations it was never trained on.
A short low-rank fine-tune on the user's domain text lets the remaining blocks adapt, and costs
little: only the adapters train, the base weights stay frozen.

What LoRA does (Hu et al. 2021, arXiv:2106.09685). Each targeted linear W (out x in) gets a
trainable low-rank update

    W' = W + (alpha / r) * B @ A,    A: r x in (random init), B: out x r (zeros at init)

so training starts from the unhealed model exactly (B = 0) and learns r * (in + out) numbers per
linear instead of in * out. At the end `merge_and_unload()` folds (alpha / r) * B @ A into W: the
healed model has the input model's architecture and state-dict keys (no `lora_` tensors), so
quantization and export see an ordinary checkpoint.

Objective. `ce`: the causal LM loss on the data (transformers' `labels`). `kd` (knowledge distillation
from the unpruned model, the teacher; Minitron, Muralidharan et al. 2024, arXiv:2407.14679, found logit
distillation better than the LM loss for retraining pruned models): per position t, the teacher's top-k
next-token log-probabilities are computed once before training (`teacher_targets`, k = KD_TOP_K) and the
student minimises their cross-entropy

    L_kd = -(1/N) sum_t sum_{v in top-k_T(t)} p_T(v | x_<t) log q_S(v | x_<t)

over the N positions that count (the same label mask as `ce`), which is KL(p_T^k || q_S) up to the
teacher's constant entropy: healing pulls the pruned model back towards the original's distribution,
where `ce` pulls it towards the calibration text (the healed rows of bench 8 by objective:
docs/BENCHMARKS.md). Storing top-k (indices and log-probs) keeps the targets at 2 k numbers per token.

Training recipe (deliberately plain, one torch loop):
- AdamW over the adapter parameters only, weight decay 0, gradient norm clipped at 1.0.
- Learning rate 2e-4 with a short linear warm-up and then constant. 2e-4 and a constant schedule
  are QLoRA's choice for 7B-65B models (Dettmers et al. 2023, arXiv:2305.14314, appendix B) and
  work for the 135M demo too. Constant rather than cosine because healing usually runs under a
  wall-clock budget: the number of steps is not known in advance, and a cosine that assumes
  `max_steps` would be cut off at a high learning rate anyway.
- Causal LM loss through transformers' `labels`; positions labelled -100 do not count, which is how
  question/answer data trains on the answer tokens only (`question_answer_training_blocks`).
  With gradient accumulation the loss is normalised by the labelled tokens of the whole optimizer
  step (`num_items_in_batch`), so accumulating k micro-batches equals one batch k times bigger.
- Deterministic for a seed: the adapter initialisation, dropout and the batch order draw from
  seeded generators (the caller's global RNG state is restored afterwards).
- Stops after `max_steps` optimizer steps or before a step that would end past `max_seconds`,
  whichever comes first; at least one step always runs.

Memory: the frozen base weights plus the adapters, their gradients and AdamW moments (3 x the
adapter size), plus one micro-batch of activations. `gradient_checkpointing=True` trades compute
for activation memory on large models; `batch_size` x `grad_accum` keeps the effective batch.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from toolkit.core.errors import BedsideError
from toolkit.core.records import SCHEMA_VERSION
from toolkit.core.windows import hf_tokenize, window_bos, window_spans
from toolkit.data.blocks import ExpandIds, data_label

if TYPE_CHECKING:
    import torch

    from toolkit.data.documents import Document

_log = logging.getLogger(__name__)

DEFAULT_RANK = 8
ALPHA_PER_RANK = 2.0  # alpha = 2 r unless given: the update's scale alpha / r stays 2 at every rank
DEFAULT_LEARNING_RATE = 2e-4  # QLoRA (arXiv:2305.14314) for 7B-13B, constant schedule
DEFAULT_MAX_GRAD_NORM = 1.0
MAX_WARMUP_STEPS = 10
IGNORE_INDEX = -100  # transformers' cross-entropy ignore_index: positions that do not count
# Used when the architecture table has no entry for the model: the Llama-style projection names
# that Llama, Mistral, Qwen2/3 and Gemma share.
FALLBACK_LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

StoppedBy = Literal["steps", "time"]
SCHEDULE = "linear warm-up, then constant"  # the learning-rate schedule `heal` uses
HEAL_OBJECTIVES: tuple[str, ...] = ("kd", "ce")  # module docstring
KD_TOP_K = 64  # teacher log-probabilities kept per position


@dataclass
class TeacherTargets:
    """The teacher's top-k next-token log-probabilities for each position of the training blocks.

    `logprobs` float32 and `indices` int64, both [n_blocks, seq_len, k]; position t holds the distribution
    of token t + 1 (as the logits at t predict it).
    """

    logprobs: torch.Tensor
    indices: torch.Tensor

    @property
    def top_k(self) -> int:
        return int(self.indices.shape[-1])


def teacher_targets(
    teacher: Any, blocks: torch.Tensor, top_k: int = KD_TOP_K, batch_size: int = 4
) -> TeacherTargets:
    """`TeacherTargets` of `teacher` on `blocks` [n, seq]: log_softmax of its logits, top `top_k` per position."""
    import torch

    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    values, indices = [], []
    try:
        with torch.no_grad():
            for start in range(0, blocks.shape[0], batch_size):
                ids = blocks[start : start + batch_size].to(device=device, dtype=torch.long)
                logits = teacher(input_ids=ids, use_cache=False).logits.to(torch.float32)
                top = torch.log_softmax(logits, dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
                values.append(top.values.cpu())
                indices.append(top.indices.cpu())
    finally:
        teacher.train(was_training)
    return TeacherTargets(logprobs=torch.cat(values), indices=torch.cat(indices))


def kd_loss_sum(logits: torch.Tensor, targets: TeacherTargets, index: torch.Tensor, labels: torch.Tensor) -> Any:
    """Sum over the counted positions of -sum_k p_T log q_S (module docstring) for one micro-batch.

    `logits` [b, seq, V] of the student on blocks `index`; `labels` [b, seq] (IGNORE_INDEX = not counted):
    position t counts when label t + 1 does, as in the LM loss.
    """
    import torch

    log_q = torch.log_softmax(logits[:, :-1].to(torch.float32), dim=-1)
    p_teacher = targets.logprobs[index][:, :-1].to(log_q.device).exp()
    picked = log_q.gather(-1, targets.indices[index][:, :-1].to(log_q.device))
    per_position = -(p_teacher * picked).sum(-1)
    counted = (labels[:, 1:] != IGNORE_INDEX).to(per_position.dtype)
    return (per_position * counted).sum()


class HealRecord(BaseModel):
    """The heal stage as compression.json records it: settings, budget, outcome and the loss curve.

    `losses` has one value per optimizer step (mean loss over that step's labelled tokens), so a
    report can plot it; `initial_loss`/`final_loss` are its first and last values. `seconds` is the
    wall time of the training loop (not of attaching or merging the adapters); `tokens_seen` counts
    input tokens fed forward, `loss_tokens` the tokens that counted in the loss.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION
    method: Literal["lora"] = "lora"
    rank: int
    alpha: float
    dropout: float
    learning_rate: float
    schedule: str
    warmup_steps: int
    batch_size: int
    grad_accum: int
    sequence_length: int
    target_modules: list[str] | str
    lora_parameters: int
    modules_to_save: list[str] = []  # trained in full beside the adapters (a LLaVA's projector), then kept
    full_parameters: int = 0
    seed: int
    max_steps: int | None
    max_seconds: float | None
    steps: int
    seconds: float
    stopped_by: StoppedBy
    tokens_seen: int
    loss_tokens: int
    initial_loss: float
    final_loss: float
    losses: list[float]
    objective: Literal["ce", "kd"] = "ce"  # the LM loss, or distillation from the unpruned model
    kd_top_k: int | None = None
    objective_note: str | None = None  # why the pipeline healed with `ce` where `kd` was asked for
    weights_dtype: str = "float32"  # the frozen base weights while training (16-bit for streamed models)
    gradient_checkpointing: bool = False


@dataclass
class HealResult:
    """What `heal` returns: the healed model and the record of how the training went.

    `model` is the merged plain model (the input model, modified in place) unless `heal` was asked
    not to merge, in which case it is the peft model (see `merge_lora`). `record` holds the
    settings and outcome once, as compression.json stores them (`record.model_dump(mode="json")`).
    """

    model: Any
    record: HealRecord


@dataclass(frozen=True)
class TrainingBlocks:
    """Token blocks (n, seq) with their labels: the token id where it counts in the loss, else -100."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    documents_used: int

    @property
    def loss_tokens(self) -> int:
        """Positions that count in the causal LM loss (a label at t is predicted from tokens < t)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------
# LoRA targets
# ---------------------------------------------------------------------------------------------


def lora_targets_for(model: Any) -> tuple[list[str] | str, bool]:
    """peft `target_modules` for this model from the architecture table, and whether it was found.

    Text families get a regex anchored on the decoder layers' path (`toolkit.model.architectures.
    lora_target_pattern`), so a LLaVA's vision tower, which also has q/k/v projections, is left
    alone. A model the table does not know gets the Llama-style names (`FALLBACK_LORA_TARGETS`)
    and `False`, so the caller can say so.
    """
    config = model.config
    architectures = getattr(config, "architectures", None) or [None]
    model_type = getattr(config, "model_type", None)
    try:
        from toolkit.model import architectures as table
    except ImportError:  # the table is optional: healing works without it
        return list(FALLBACK_LORA_TARGETS), False
    family = table.text_family_for(architectures[0], model_type)
    if family is None and architectures[0] is not None:
        family = table.text_family_for(None, model_type)
    if family is not None:
        return table.lora_target_pattern(family, family.layers_path), True
    wrapper = table.multimodal_wrapper_for(architectures[0], model_type)
    if wrapper is None and architectures[0] is not None:
        wrapper = table.multimodal_wrapper_for(None, model_type)
    if wrapper is not None:
        text_config = getattr(config, "text_config", None)
        text_type = getattr(text_config, "model_type", None) or wrapper.default_text_model_type
        text_family = table.text_family_by_model_type(text_type)
        if text_family is not None:
            layers_path = f"{wrapper.text_model_path}.{text_family.layers_name}"
            return table.lora_target_pattern(text_family, layers_path), True
    return list(FALLBACK_LORA_TARGETS), False


# ---------------------------------------------------------------------------------------------
# Question/answer data: answer-only labels
# ---------------------------------------------------------------------------------------------


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second, strict=False):
        if a != b:
            break
        length += 1
    return length


def _prompt_text(document: Document, tokenizer: Any) -> str:
    """What precedes the answer in `document.render(tokenizer)`: the templated user turn."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            document.messages()[:1], tokenize=False, add_generation_prompt=True
        )
    return f"{document.prompt()}\n"


def question_answer_training_blocks(
    documents: Sequence[Document],
    tokenizer: Any,
    block_len: int,
    n_blocks: int,
    seed: int,
    *,
    source: str | None = None,
    expand: ExpandIds | None = None,
) -> TrainingBlocks:
    """Packed training blocks whose labels keep only the answers of question/answer documents.

    Why: healing on QA data should teach the model to answer, not to reproduce the questions (and
    long PubMedQA contexts would otherwise dominate the loss). Each document is rendered as
    `Document.render` does (the model's chat template), tokenized, and its prompt tokens are
    labelled -100; the answer tokens, including the template's end-of-turn, keep their ids. Plain
    text documents are labelled in full. Like `toolkit.data.make_blocks`, documents are shuffled
    with the seed, joined with an end-of-sequence separator (labelled -100: it is ours, not the
    data's) and cut into consecutive blocks, so there is no padding and no attention mask; each block
    is opened by the tokenizer's BOS when it adds one (labelled -100), as `make_blocks` does.
    The prompt/answer boundary is the longest common token prefix of the rendered exchange and the
    rendered prompt with the generation prompt, which holds whatever the template adds around turns.
    `expand` rewrites each document's ids (prompt and exchange alike) before packing, as in `make_blocks`.
    """
    import torch

    if block_len < 2 or n_blocks < 1:
        raise BedsideError(
            f"block length ({block_len}) must be at least 2 and blocks ({n_blocks}) at least 1"
        )
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise BedsideError(
            "the tokenizer has no end-of-sequence token: set eos_token in tokenizer_config.json"
        )
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    needed = block_len * n_blocks
    ids: list[int] = []
    labels: list[int] = []
    used = 0
    for index in order:
        document = documents[index]
        full = tokenizer(document.render(tokenizer), add_special_tokens=False)["input_ids"]
        if expand is not None:
            full = expand(document, full)
        if document.is_question_answer:
            prompt = tokenizer(_prompt_text(document, tokenizer), add_special_tokens=False)["input_ids"]
            if expand is not None:
                prompt = expand(document, prompt)
            boundary = _common_prefix_length(full, prompt)
        else:
            boundary = 0
        ids.extend(full)
        labels.extend([IGNORE_INDEX] * boundary + list(full[boundary:]))
        ids.append(int(eos))
        labels.append(IGNORE_INDEX)
        used += 1
        if len(ids) >= needed:
            break
    bos = window_bos(hf_tokenize(tokenizer))
    block_ids: list[list[int]] = []
    block_labels: list[list[int]] = []
    for start, end, prepend in window_spans(ids, block_len, bos):
        if end - start + prepend < block_len or len(block_ids) == n_blocks:
            break  # only the last window is short
        opening = [bos] if prepend and bos is not None else []
        block_ids.append(opening + ids[start:end])
        block_labels.append([IGNORE_INDEX] * len(opening) + labels[start:end])
    if not block_ids:
        raise BedsideError(
            f"{data_label(source)} has {len(ids)} tokens in {len(documents)} documents, fewer than one "
            f"block of {block_len}: add documents or lower the block length (--seq-len)"
        )
    return TrainingBlocks(
        input_ids=torch.tensor(block_ids, dtype=torch.long),
        labels=torch.tensor(block_labels, dtype=torch.long),
        documents_used=used,
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _check_inputs(
    train_blocks: torch.Tensor,
    train_labels: torch.Tensor | None,
    rank: int,
    alpha: float,
    dropout: float,
    lr: float,
    max_steps: int | None,
    max_seconds: float | None,
    batch_size: int,
    grad_accum: int,
) -> None:
    import torch

    if not isinstance(train_blocks, torch.Tensor) or train_blocks.dim() != 2:
        raise BedsideError(
            "healing needs token blocks as a 2-D tensor (blocks, sequence length) of token ids"
        )
    if train_blocks.shape[0] < 1 or train_blocks.shape[1] < 2:
        raise BedsideError(
            f"healing needs at least one block of at least 2 tokens, got shape {tuple(train_blocks.shape)}"
        )
    if train_blocks.dtype not in (torch.int64, torch.int32):
        raise BedsideError(f"token blocks must hold integer token ids, got {train_blocks.dtype}")
    if train_labels is not None:
        if tuple(train_labels.shape) != tuple(train_blocks.shape):
            raise BedsideError(
                f"labels shape {tuple(train_labels.shape)} differs from blocks shape {tuple(train_blocks.shape)}"
            )
        if not bool((train_labels[:, 1:] != IGNORE_INDEX).any()):
            raise BedsideError("every label is -100 (masked): there is nothing to train on")
    if rank < 1 or alpha <= 0 or not 0.0 <= dropout < 1.0 or lr <= 0:
        raise BedsideError(
            f"LoRA needs rank >= 1, alpha > 0, 0 <= dropout < 1 and lr > 0 "
            f"(got rank={rank}, alpha={alpha}, dropout={dropout}, lr={lr})"
        )
    if max_steps is None and max_seconds is None:
        raise BedsideError("healing needs a budget: give max_steps, max_seconds or both")
    if (max_steps is not None and max_steps < 1) or (max_seconds is not None and max_seconds <= 0):
        raise BedsideError(f"max_steps must be >= 1 and max_seconds > 0 (got {max_steps}, {max_seconds})")
    if batch_size < 1 or grad_accum < 1:
        raise BedsideError(f"batch_size and grad_accum must be >= 1 (got {batch_size}, {grad_accum})")


def _batch_indices(n_blocks: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless micro-batches of block indices: a fresh seeded permutation per pass over the data."""
    import torch

    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n_blocks, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _default_warmup(max_steps: int | None) -> int:
    """About a tenth of the steps, at most MAX_WARMUP_STEPS (and that many under a time budget)."""
    if max_steps is None:
        return MAX_WARMUP_STEPS
    return max(1, min(MAX_WARMUP_STEPS, max_steps // 10))


def _progress_bar(enabled: bool) -> Any:
    """A rich progress bar (on stderr, so machine-readable stdout stays clean) showing the loss."""

    return Progress(
        TextColumn("heal (LoRA)"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=False,
    )


def _rng_devices(device: torch.device) -> list[int]:
    return [device.index or 0] if device.type == "cuda" else []


def merge_lora(peft_model: Any) -> Any:
    """Fold every adapter into its base weight, W <- W + (alpha / r) B A, and drop the peft wrapper.

    Returns the plain transformers model: same class, same state-dict keys as before LoRA was
    attached. Adapters holding NaN or inf are refused before anything is merged; the merge is then in
    place (peft's `safe_merge` would clone every weight first: on a model loaded in 16 bits from its
    memory-mapped shards the clones sat beside the mapped originals, +1.3 GB on a 1.1B model). In float32
    the result is bit for bit safe_merge's; in bfloat16 some weights differ by one bf16 step (rounding order).
    """
    import torch

    for name, parameter in peft_model.named_parameters():
        if "lora_" in name and not bool(torch.isfinite(parameter).all()):
            raise BedsideError(f"the LoRA adapter {name} holds NaN or inf: healing diverged; lower --heal-lr")
    return peft_model.merge_and_unload(safe_merge=False)


def heal(
    model: Any,
    tokenizer: Any,
    train_blocks: torch.Tensor,
    *,
    train_labels: torch.Tensor | None = None,
    rank: int = DEFAULT_RANK,
    alpha: float | None = None,
    dropout: float = 0.0,
    lr: float = DEFAULT_LEARNING_RATE,
    max_steps: int | None = 100,
    max_seconds: float | None = None,
    batch_size: int = 4,
    grad_accum: int = 1,
    warmup_steps: int | None = None,
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM,
    target_modules: Sequence[str] | str | None = None,
    gradient_checkpointing: bool = False,
    seed: int = 0,
    merge: bool = True,
    progress: bool = True,
    modules_to_save: Sequence[str] = (),
    teacher: TeacherTargets | None = None,
) -> HealResult:
    """Fine-tune LoRA adapters on `train_blocks` and merge them: W' = W + (alpha / rank) B A (alpha 2 x rank unless
    given).

    `train_blocks` is (n, seq) token ids (from `toolkit.data.make_blocks`, or
    `question_answer_training_blocks` for QA data). `train_labels`, same shape, marks what counts
    in the loss (-100 = ignored); without it every token counts. One optimizer step consumes
    `grad_accum` micro-batches of `batch_size` blocks. Training stops after `max_steps` steps or
    before the step that would overrun `max_seconds`, whichever is first. `target_modules` (peft
    names or a regex) defaults to the architecture table's projections for this model family.
    `modules_to_save` (peft) are trained in full and replace the originals at merge: a LLaVA's
    `multi_modal_projector`, so the projector learns along (W' = W - lr * grad, no low-rank form).
    `tokenizer` is accepted for symmetry with the other stages and is not needed for token blocks.

    The model is modified in place: LoRA layers are attached, trained and merged, and the merged
    model (same object, same keys) is returned in the result, in the train/eval mode and with the
    `requires_grad` flags it came with. With `merge=False` the result holds the peft model instead.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    del tokenizer  # token blocks are already ids
    alpha = ALPHA_PER_RANK * rank if alpha is None else alpha
    _check_inputs(
        train_blocks, train_labels, rank, alpha, dropout, lr, max_steps, max_seconds, batch_size, grad_accum
    )
    if target_modules is None:
        targets, known = lora_targets_for(model)
        if not known:
            _log.warning(
                "the architecture table has no entry for %s: LoRA targets the default projections %s",
                getattr(model.config, "model_type", type(model).__name__),
                targets,
            )
    else:
        targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    warmup = _default_warmup(max_steps) if warmup_steps is None else max(0, warmup_steps)
    if teacher is not None and tuple(teacher.indices.shape[:2]) != tuple(train_blocks.shape):
        raise BedsideError(
            f"teacher targets cover {tuple(teacher.indices.shape[:2])} positions, the blocks "
            f"{tuple(train_blocks.shape)}: compute them on the same blocks"
        )

    device = next(model.parameters()).device
    weights_dtype = next(model.parameters()).dtype
    was_training = model.training
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    n_blocks, seq_len = (int(size) for size in train_blocks.shape)
    blocks = train_blocks.to(torch.long)
    labels = blocks if train_labels is None else train_labels.to(torch.long)

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
            modules_to_save=list(modules_to_save) or None,
        )
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise BedsideError(f"LoRA found no module to adapt for targets {targets!r}: {error}") from error
        trainable = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
        full_parameters = sum(
            parameter.numel()
            for name, parameter in peft_model.named_parameters()
            if parameter.requires_grad and "modules_to_save" in name
        )
        lora_parameters = sum(parameter.numel() for parameter in trainable) - full_parameters
        if gradient_checkpointing:
            peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )
        order = _batch_indices(n_blocks, batch_size, torch.Generator().manual_seed(seed))

        losses: list[float] = []
        tokens_seen = 0
        loss_tokens = 0
        stopped_by: StoppedBy = "steps"
        peft_model.train()
        bar = _progress_bar(progress)
        start = time.perf_counter()
        with bar:
            task = bar.add_task("heal", total=max_steps, loss="-")
            while True:
                step_start = time.perf_counter()
                micro_batches = [next(order) for _ in range(grad_accum)]
                counted = sum(int((labels[index, 1:] != IGNORE_INDEX).sum()) for index in micro_batches)
                normaliser = torch.tensor(max(1, counted), device=device)
                step_loss = 0.0
                for index in micro_batches:
                    if teacher is None:
                        output = peft_model(
                            input_ids=blocks[index].to(device),
                            labels=labels[index].to(device),
                            num_items_in_batch=normaliser,
                            use_cache=False,
                        )
                        loss = output.loss
                    else:
                        output = peft_model(input_ids=blocks[index].to(device), use_cache=False)
                        loss = kd_loss_sum(output.logits, teacher, index, labels[index].to(device)) / normaliser
                    loss.backward()
                    step_loss += float(loss.detach())
                    tokens_seen += int(index.numel()) * seq_len
                if max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if not math.isfinite(step_loss):
                    raise BedsideError(
                        f"healing diverged (loss {step_loss} at step {len(losses) + 1}): lower --heal-lr"
                    )
                losses.append(step_loss)
                loss_tokens += counted
                bar.update(task, advance=1, loss=f"{step_loss:.3f}")
                now = time.perf_counter()
                if max_steps is not None and len(losses) >= max_steps:
                    stopped_by = "steps"
                    break
                if max_seconds is not None and (now - start) + (now - step_start) > max_seconds:
                    stopped_by = "time"
                    break
        seconds = time.perf_counter() - start

    if gradient_checkpointing:
        peft_model.gradient_checkpointing_disable()
    result_model: Any = peft_model
    if merge:
        result_model = merge_lora(peft_model)
        for name, parameter in result_model.named_parameters():
            parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
    result_model.train(was_training)

    record = HealRecord(
        objective="ce" if teacher is None else "kd",
        kd_top_k=None if teacher is None else teacher.top_k,
        weights_dtype=str(weights_dtype).removeprefix("torch."),
        gradient_checkpointing=gradient_checkpointing,
        rank=rank,
        alpha=float(alpha),
        dropout=float(dropout),
        learning_rate=float(lr),
        schedule=SCHEDULE,
        warmup_steps=warmup,
        batch_size=batch_size,
        grad_accum=grad_accum,
        sequence_length=seq_len,
        target_modules=targets,
        lora_parameters=lora_parameters,
        modules_to_save=list(modules_to_save),
        full_parameters=full_parameters,
        seed=seed,
        max_steps=max_steps,
        max_seconds=max_seconds,
        steps=len(losses),
        seconds=round(seconds, 3),
        stopped_by=stopped_by,
        tokens_seen=tokens_seen,
        loss_tokens=loss_tokens,
        initial_loss=losses[0],
        final_loss=losses[-1],
        losses=losses,
    )
    return HealResult(model=result_model, record=record)
