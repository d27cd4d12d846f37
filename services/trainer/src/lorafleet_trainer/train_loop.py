"""The LoRA training loop: PEFT adapter, AdamW, linear warm-up + cosine decay, gradient accumulation.

fp32 on CPU, bf16 on CUDA (or a 4-bit NF4 base: QLoRA). Batches are padded to their
longest row and grouped by length so little padding is computed, or, with
``training.packing``, rows share sequences without seeing each other (packing.py).
Gradient checkpointing is on by default with a GPU. The loss is the mean over every
trained token of the optimizer step (not a mean of per-batch means), so the
result does not depend on how rows fall into batches, nor on how many processes share the step
(data parallel, distributed.py: each rank takes every N-th micro-batch of the step, and the gradients
are summed across ranks before the optimizer step).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet_trainer.attention import enable_varlen_attention
from lorafleet_trainer.checkpoint import LoopState, checkpoint_due
from lorafleet_trainer.distributed import Ranks
from lorafleet_trainer.lm_loss import lm_head_loss_sum
from lorafleet_trainer.lora_forward import set_lean_lora_forward
from lorafleet_trainer.manifest import LoraSpec, TrainingSpec
from lorafleet_trainer.packing import collate_packed, pack_rows, packed_model_inputs
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample

LENGTH_GROUP_BATCHES = 16  # batches per length-sorted window: little padding, still shuffled
# Causal LMs whose logits are exactly lm_head(last hidden state): no soft-capping or scaling after it.
PLAIN_LM_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class StepReport:
    """Metrics of one optimizer step."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    peak_memory_bytes: int
    trained_tokens: int


class QuantizationUnavailable(RuntimeError):
    """The manifest asks for a quantized base that this trainer cannot load (no CUDA, no bitsandbytes)."""


class ResumeMismatch(RuntimeError):
    """A checkpoint's data position does not fit this run's batch plan (other data or another planner)."""


@dataclass(frozen=True)
class TrainSummary:
    final_loss: float
    steps: int
    trained_tokens: int
    seconds: float
    device: str


def restore_rng(resume: LoopState, rank: int, device: torch.device) -> None:
    """This rank's torch RNG as the checkpoint saved it (rank 0's when the checkpoint has none for it)."""
    cpu, cuda = resume.torch_rng, resume.cuda_rng
    if 0 < rank <= len(resume.other_ranks_rng):
        cpu, cuda = resume.other_ranks_rng[rank - 1]["cpu"], resume.other_ranks_rng[rank - 1]["cuda"]
    torch.set_rng_state(cpu)
    if device.type == "cuda" and cuda:
        torch.cuda.set_rng_state_all(cuda)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def micro_batches_per_epoch(lengths: Sequence[int], training: TrainingSpec) -> int:
    """How many forward passes one epoch takes: the same every epoch, whatever the shuffle."""
    sequences = len(pack_rows(lengths, training.max_length)) if training.packing else len(lengths)
    return math.ceil(sequences / training.batch_size)


def total_steps(lengths: Sequence[int], training: TrainingSpec) -> int:
    """Optimizer steps of the whole run, for rows of these token lengths."""
    batches = micro_batches_per_epoch(lengths, training)
    return training.epochs * math.ceil(batches / training.gradient_accumulation_steps)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0; ``step`` is 0-based."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_batches(lengths: Sequence[int], training: TrainingSpec, rng: random.Random) -> list[list[list[int]]]:
    """One epoch's micro-batches; each is a list of sequences, each sequence a list of row indices.

    Without packing every sequence is one row, and batches hold rows of similar length (little
    padding), shuffled. With packing the rows are packed once, deterministically, and the packs
    are shuffled: each sequence then holds rows that share it without attending to each other.
    """
    batch_size = training.batch_size
    if training.packing:
        packs = pack_rows(lengths, training.max_length)
        rng.shuffle(packs)
        return [packs[i : i + batch_size] for i in range(0, len(packs), batch_size)]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * LENGTH_GROUP_BATCHES
    batches: list[list[list[int]]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [[[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(sequences: list[list[TokenizedExample]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch's tensors: packed (see packing.py) if a sequence holds several rows, else padded."""
    if any(len(rows) > 1 for rows in sequences):
        return collate_packed(sequences, pad_id, device)
    return collate_padded([rows[0] for rows in sequences], pad_id, device)


def collate_padded(rows: list[TokenizedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on padding)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def load_lora_model(
    model_path: str,
    lora: LoraSpec,
    seed: int,
    device: torch.device,
    *,
    local_only: bool,
    dtype: torch.dtype | None = None,
) -> Any:
    """The base model with a fresh LoRA adapter; only the adapter trains. bf16 on CUDA, fp32 elsewhere.

    With ``lora.quantization == "nf4"`` (QLoRA) the frozen base is loaded in 4-bit NF4 with double
    quantization and bf16 compute; that needs CUDA and bitsandbytes (QuantizationUnavailable otherwise).
    Flash-attention is used on CUDA when the package is installed (packed rows then go varlen).
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    options: dict[str, Any] = {"dtype": dtype, "local_files_only": local_only}
    model: Any
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        options["attn_implementation"] = "flash_attention_2"
    if lora.quantization == "nf4":
        problem = quantization_problem(lora, device)
        if problem:
            raise QuantizationUnavailable(problem)
        from transformers import BitsAndBytesConfig  # transformers imports bitsandbytes only when it loads

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        index = device.index if device.index is not None else torch.cuda.current_device()
        model = AutoModelForCausalLM.from_pretrained(model_path, device_map={"": index}, **options)
        # No prepare_model_for_kbit_training: it would copy the embeddings, lm_head and norms to fp32, 2.2 GiB
        # more on Qwen2.5-7B than the 4-bit weights' 3.6, for no stability bf16 lacks (RMSNorm computes in
        # fp32 inside). Checkpointing and input gradients are set up by train() from the training spec.
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **options)
        model = model.to(device)
    if device.type == "cuda" and "attn_implementation" not in options:
        enable_varlen_attention(model)  # packed rows: flash kernels per row instead of a dense mask
    return add_lora(model, lora, seed)


def add_lora(model: Any, lora: LoraSpec, seed: int) -> Any:
    """``model`` (frozen) wrapped with a fresh PEFT LoRA adapter of the manifest's shape."""
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False
    # An integral alpha is written as an int: some adapter readers type lora_alpha as int.
    alpha: Any = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        use_dora=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # LoRA A is initialised at random
    peft_model = get_peft_model(model, config)
    set_lean_lora_forward(peft_model)  # lora_forward.py: PEFT's fp32 detour costs more than the base matmuls
    return peft_model


def quantization_problem(lora: LoraSpec, device: torch.device) -> str | None:
    """Why ``lora.quantization`` cannot run here, or None. Checks without importing bitsandbytes."""
    if lora.quantization == "none":
        return None
    if device.type != "cuda":
        return f"QLoRA (lora.quantization: {lora.quantization}) needs a CUDA GPU; this trainer has none"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"QLoRA (lora.quantization: {lora.quantization}) needs the bitsandbytes package; this trainer lacks it"
    return None


def gradient_checkpointing_wanted(training: TrainingSpec, device: torch.device) -> bool:
    """The manifest's choice; unset means on with a GPU (memory-bound) and off on CPU (compute-bound)."""
    if training.gradient_checkpointing is None:
        return device.type == "cuda"
    return training.gradient_checkpointing


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Recompute each decoder layer's activations in the backward pass instead of keeping them."""
    if not enabled:
        model.gradient_checkpointing_disable()
        return
    # Non-reentrant: the frozen base has no parameter that needs a gradient, which the reentrant
    # variant would take as "nothing to backpropagate"; the input hook covers PEFT's frozen embeddings.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def model_inputs(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The decoder's keyword arguments for a padded or a packed micro-batch."""
    if "sequence_ids" in batch:
        return packed_model_inputs(model, batch)
    if model.config.model_type in PLAIN_LM_HEAD_MODELS:
        # Rows are right-padded and these decoders are causal: no real token attends to the padding, so the
        # padding mask changes nothing the loss reads, and without one sdpa runs its flash kernel (is_causal).
        return {"input_ids": batch["input_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def micro_batch_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions."""
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    base = model.get_base_model()
    inputs = model_inputs(base, batch)
    if base.config.model_type in PLAIN_LM_HEAD_MODELS:
        # Project only the positions that carry a label: the vocabulary projection is a large share of the
        # compute on small models and of the memory on large vocabularies (Qwen: 152k).
        hidden = base.get_decoder()(**inputs)
        return lm_head_loss_sum(
            base.get_output_embeddings(), hidden.last_hidden_state[:, :-1][selected], targets[selected]
        )
    logits = model(**inputs).logits[:, :-1][selected]
    return torch.nn.functional.cross_entropy(logits.float(), targets[selected], reduction="sum")


def train(
    model: Any,
    examples: list[TokenizedExample],
    training: TrainingSpec,
    pad_id: int,
    on_step: Callable[[StepReport], None],
    device: torch.device,
    *,
    resume: LoopState | None = None,
    on_checkpoint: Callable[[LoopState], None] | None = None,
    ranks: Ranks | None = None,
) -> TrainSummary:
    """Train ``model``'s LoRA weights in place and report every optimizer step.

    ``resume`` (a checkpoint's state, its weights already in ``model``) continues a run where it stopped:
    the same batches in the same order, the same learning rates and RNG draws as an uninterrupted run.
    ``on_checkpoint`` gets the state whenever a checkpoint is due (``training.checkpoint_every_*``), never
    after the last step (the adapter is published next). It must persist it before returning: the state
    holds live optimizer tensors.

    With ``ranks`` (data parallel) every rank calls this with the same rows and manifest; each computes its
    share of every step and all end with the same weights. Only rank 0 gets ``on_step`` and ``on_checkpoint``.
    """
    ranks = ranks or Ranks()
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel for all LoRA tensors instead of a few per tensor (392 on a 7B model); CUDA only.
    optimizer = torch.optim.AdamW(
        params, lr=training.learning_rate, weight_decay=training.weight_decay, fused=device.type == "cuda"
    )
    steps = total_steps([len(e.input_ids) for e in examples], training)
    warmup = math.ceil(training.warmup_ratio * steps)
    lengths = [len(e.input_ids) for e in examples]
    rng = random.Random(training.seed)  # the batch planner's: each epoch's plan continues its sequence
    step = trained = first_epoch = first_group = 0
    seconds_before = 0.0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        rng.setstate(resume.planner_state)
        step, trained, seconds_before = resume.step, resume.trained_tokens, resume.train_seconds
        first_epoch, first_group = resume.epoch, resume.group
        restore_rng(resume, ranks.rank, device)  # LoRA dropout draws continue where they stopped
    ranks.copy_from_main(params)  # the replicas start identical (they are, seeded; this makes sure)
    set_gradient_checkpointing(model, gradient_checkpointing_wanted(training, device))
    model.train()
    first_step = step
    loss_value = float("nan")
    began = last_checkpoint = time.monotonic()
    for epoch in range(first_epoch, training.epochs):
        planner_state = rng.getstate()  # rebuilds this epoch's plan on resume
        batches = plan_batches(lengths, training, rng)
        groups = [
            batches[i : i + training.gradient_accumulation_steps]
            for i in range(0, len(batches), training.gradient_accumulation_steps)
        ]
        digest = hashlib.sha256(repr(groups).encode()).hexdigest()
        if resume is not None and epoch == first_epoch and digest != resume.plan_digest:
            raise ResumeMismatch(f"epoch {epoch + 1}'s batch plan differs from the checkpoint's")
        for group_index in range(first_group if epoch == first_epoch else 0, len(groups)):
            group = groups[group_index]
            step_began = time.monotonic()
            lr = training.learning_rate * lr_factor(step, steps, warmup)
            for pg in optimizer.param_groups:
                pg["lr"] = lr
            rows = [[[examples[i] for i in sequence] for sequence in batch] for batch in group]
            label_count = sum(e.trained_tokens for batch in rows for sequence in batch for e in sequence)
            step_tokens = sum(len(e.input_ids) for batch in rows for sequence in batch for e in sequence)
            loss_sum = 0.0
            for batch_rows in rows[ranks.rank :: ranks.world_size]:  # this rank's share: maybe none
                loss = micro_batch_loss_sum(model, collate(batch_rows, pad_id, device))
                (loss / label_count).backward()  # the global count: the ranks' gradients add up to the step's
                loss_sum += float(loss.detach())
            ranks.sum_gradients(params)
            [loss_sum] = ranks.sum([loss_sum])
            if training.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trained += step_tokens
            loss_value = loss_sum / label_count
            now = time.monotonic()
            due = (
                on_checkpoint is not None
                and step < steps
                and checkpoint_due(
                    step, training.checkpoint_every_steps, training.checkpoint_every_minutes, now - last_checkpoint
                )
            )
            # Rank 0's clock decides a time-based checkpoint: every rank must take the same collective path.
            peak, due_on_main = ranks.max([float(peak_memory_bytes(device)), float(due and ranks.is_main)])
            due = due_on_main > 0
            if ranks.is_main:
                on_step(
                    StepReport(
                        step=step,
                        total_steps=steps,
                        epoch=epoch + (group_index + 1) / len(groups),
                        loss=loss_value,
                        learning_rate=lr,
                        tokens_per_second=step_tokens / (now - step_began) if now > step_began else 0.0,
                        eta_seconds=(now - began) / (step - first_step) * (steps - step),
                        peak_memory_bytes=int(peak),
                        trained_tokens=trained,
                    )
                )
            if due:
                rng_states = ranks.rng_states(device)  # a collective: every rank takes part
                state = LoopState(
                    step=step,
                    epoch=epoch,
                    group=group_index + 1,
                    planner_state=planner_state,
                    plan_digest=digest,
                    trained_tokens=trained,
                    train_seconds=seconds_before + time.monotonic() - began,
                    optimizer=optimizer.state_dict(),
                    torch_rng=rng_states[0]["cpu"],
                    cuda_rng=rng_states[0]["cuda"],
                    other_ranks_rng=rng_states[1:],
                )
                if ranks.is_main and on_checkpoint is not None:
                    on_checkpoint(state)
                last_checkpoint = time.monotonic()
    return TrainSummary(loss_value, step, trained, seconds_before + time.monotonic() - began, device.type)
