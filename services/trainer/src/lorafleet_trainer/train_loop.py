"""The LoRA training loop: PEFT adapter, AdamW, linear warm-up + cosine decay, gradient accumulation.

fp32 on CPU, bf16 on CUDA (or a 4-bit NF4 base: QLoRA). Batches are padded to their
longest row and grouped by length so little padding is computed, or, with
``training.packing``, rows share sequences without seeing each other (packing.py).
Gradient checkpointing is on with a GPU if a memory probe finds it needed (memory_probe.py). The loss is
the mean over every trained token of the optimizer step (not a mean of per-batch means), so the
result does not depend on how rows fall into batches, nor on how many processes share the step
(data parallel, distributed.py: each rank takes every N-th micro-batch of the step, and the gradients
are summed across ranks before the optimizer step).
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet_trainer.batch_transfer import label_selection, to_device
from lorafleet_trainer.checkpoint import LoopState, checkpoint_due
from lorafleet_trainer.compiled_layers import CompiledLayers, compiled_layers, run_with_eager_fallback
from lorafleet_trainer.distributed import Ranks
from lorafleet_trainer.lm_loss import lm_head_loss_sum
from lorafleet_trainer.manifest import TrainingSpec
from lorafleet_trainer.memory_probe import (
    CheckpointingDecision,
    decide_gradient_checkpointing,
    peak_allocated_bytes,
    synthetic_micro_batch,
    worst_case_shape,
)
from lorafleet_trainer.model_loading import (  # noqa: F401  (re-exported: callers load models through train_loop)
    QuantizationUnavailable,
    add_lora,
    load_lora_model,
    quantization_problem,
)
from lorafleet_trainer.packing import collate_packed, pack_rows, packed_model_inputs
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample

LENGTH_GROUP_BATCHES = 16  # batches per length-sorted window: little padding, still shuffled
# Causal LMs whose logits are exactly lm_head(last hidden state): no soft-capping or scaling after it.
PLAIN_LM_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Decoders that take a ready {layer type: mask} mapping instead of building their masks from the inputs.
PREPARED_MASK_MODELS = frozenset({"qwen2", "qwen3"})


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


class ResumeMismatch(RuntimeError):
    """A checkpoint's data position does not fit this run's batch plan (other data or another planner)."""


@dataclass(frozen=True)
class TrainSummary:
    final_loss: float
    steps: int
    trained_tokens: int
    seconds: float
    device: str
    gradient_checkpointing: bool = False


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


def collate(
    sequences: list[list[TokenizedExample]], pad_id: int, device: torch.device, width: int | None = None
) -> dict[str, Any]:
    """A micro-batch's tensors: packed (see packing.py; ``width``: pad each pack to it) if a sequence holds several
    rows or a width is fixed, else padded."""
    if width is not None or any(len(rows) > 1 for rows in sequences):
        return collate_packed(sequences, pad_id, device, width)
    return collate_padded([rows[0] for rows in sequences], pad_id, device)


def collate_padded(rows: list[TokenizedExample], pad_id: int, device: torch.device) -> dict[str, Any]:
    """Right-padded input ids, attention mask and labels (-100 on padding), and the labelled positions."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return to_device({"input_ids": ids, "attention_mask": mask, "labels": labels} | label_selection(labels), device)


def gradient_checkpointing_wanted(training: TrainingSpec, device: torch.device) -> bool:
    """The manifest's choice, without a memory probe (benchmarks): unset means on with a GPU, off on CPU."""
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


def worst_case_backward(
    model: Any, shape: tuple[int, int], training: TrainingSpec, pad_id: int, device: torch.device
) -> None:
    """The memory probe's pass: a synthetic micro-batch of ``shape`` (memory_probe.worst_case_shape) forward and
    backward through micro_batch_backward, the loop's own path, without checkpointing."""
    sequences, tokens = shape
    if sequences == 0:
        return
    set_gradient_checkpointing(model, False)
    width = tokens if training.packing else None
    micro_batch_backward(model, synthetic_micro_batch(shape, pad_id), sequences * tokens, pad_id, device, width=width)


def gradient_checkpointing_decision(
    model: Any, lengths: Sequence[int], training: TrainingSpec, pad_id: int, device: torch.device, ranks: Ranks
) -> CheckpointingDecision:
    """Checkpointing as the manifest sets it or, unset on CUDA, as the memory probe finds it needed for the job's
    largest micro-batch."""
    shape = worst_case_shape(lengths, training)
    run = functools.partial(worst_case_backward, model, shape, training, pad_id, device)
    return decide_gradient_checkpointing(
        model,
        training,
        device,
        lambda: peak_allocated_bytes(device, run),
        ranks=ranks,
        workload=f"{shape[0]} x {shape[1]} tokens",
    )


def model_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The decoder's keyword arguments for a padded or a packed micro-batch."""
    if "sequence_ids" in batch:
        return packed_model_inputs(model, batch)
    config = model.config
    if config.model_type in PLAIN_LM_HEAD_MODELS:
        # Rows are right-padded and these decoders are causal: no real token attends to the padding, so the
        # padding mask changes nothing the loss reads, and without one sdpa runs its flash kernel (is_causal).
        inputs: dict[str, Any] = {"input_ids": batch["input_ids"]}
        if config.model_type in PREPARED_MASK_MODELS and set(getattr(config, "layer_types", None) or ()) == {
            "full_attention"
        }:
            # The mask, ready: none. Left to build it, transformers looks for packed rows in the position ids
            # and reads the answer on the host, a device sync per forward.
            inputs["attention_mask"] = {"full_attention": None}
        return inputs
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def labelled_positions(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat positions whose next token is labelled, those labels): collate's, computed on the host; for a batch
    made by hand, from its labels here (a device sync)."""
    if "label_positions" not in batch:
        batch = batch | label_selection(batch["labels"])
    return batch["label_positions"], batch["label_targets"]


def micro_batch_loss_sum(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions."""
    positions, targets = labelled_positions(batch)
    base = model.get_base_model()
    inputs = model_inputs(base, batch)
    if base.config.model_type in PLAIN_LM_HEAD_MODELS:
        # Project only the positions that carry a label: the vocabulary projection is a large share of the
        # compute on small models and of the memory on large vocabularies (Qwen: 152k).
        # index_select, not a boolean mask: the count of rows is known without asking the device, and the
        # gradient is an index_add (no sort, no sync).
        hidden = base.get_decoder()(**inputs).last_hidden_state
        return lm_head_loss_sum(base.get_output_embeddings(), hidden.flatten(0, 1).index_select(0, positions), targets)
    logits = model(**inputs).logits.flatten(0, 1).index_select(0, positions)
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def micro_batch_backward(
    model: Any,
    sequences: list[list[TokenizedExample]],
    label_count: int,
    pad_id: int,
    device: torch.device,
    layers: CompiledLayers | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """One micro-batch's forward and backward pass, the loss scaled by the step's ``label_count``; its summed loss,
    left on the device (reading it would make the host wait for the GPU)."""
    batch = collate(sequences, pad_id, device, width)
    if layers is not None:
        layers.prepare(batch)
    loss = micro_batch_loss_sum(model, batch)
    (loss / label_count).backward()  # the global count: the ranks' gradients add up to the step's
    return loss.detach()


def share_loss_sum(
    model: Any,
    batches: list[list[list[TokenizedExample]]],
    label_count: int,
    pad_id: int,
    device: torch.device,
    training: TrainingSpec,
    layers: CompiledLayers | None = None,
) -> torch.Tensor:
    """A step's micro-batches (one rank's share), forward and backward; their summed loss, on the device."""
    total = torch.zeros((), dtype=torch.float64, device=device)  # a Python float's precision
    # Compiled layers take packs of one width (one shape); eager ones, as wide as the longest.
    width = training.max_length if training.packing and layers is not None and layers.failure is None else None
    for sequences in batches:
        total += micro_batch_backward(model, sequences, label_count, pad_id, device, layers, width)
    return total


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
    compile_backend: str | Callable[..., Any] = "inductor",
    on_note: Callable[[str], None] | None = None,
) -> TrainSummary:
    """Train ``model``'s LoRA weights in place and report every optimizer step.

    ``resume`` (a checkpoint's state, its weights already in ``model``) continues a run where it stopped:
    the same batches in the same order, the same learning rates and RNG draws as an uninterrupted run.
    ``on_checkpoint`` gets the state whenever a checkpoint is due (``training.checkpoint_every_*``), never
    after the last step (the adapter is published next). It must persist it before returning: the state
    holds live optimizer tensors.

    With ``ranks`` (data parallel) every rank calls this with the same rows and manifest; each computes its
    share of every step and all end with the same weights. Only rank 0 gets ``on_step``, ``on_checkpoint`` and
    ``on_note`` (a line for the job's events: whether gradient checkpointing is on, and why: memory_probe.py).

    ``training.compile`` runs the decoder layers compiled by ``compile_backend`` (compiled_layers.py). The loss
    stays on the device until the step ends: one host read per optimizer step, none per micro-batch.
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
    checkpointing = gradient_checkpointing_decision(model, lengths, training, pad_id, device, ranks)
    set_gradient_checkpointing(model, checkpointing.enabled)
    if ranks.is_main and on_note is not None:
        on_note(checkpointing.describe())
    layers = compiled_layers(model, packed=training.packing, backend=compile_backend) if training.compile else None
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
            share = rows[ranks.rank :: ranks.world_size]  # this rank's micro-batches: maybe none
            work = functools.partial(share_loss_sum, model, share, label_count, pad_id, device, training, layers)
            loss_total = run_with_eager_fallback(layers, work, functools.partial(optimizer.zero_grad, set_to_none=True))
            ranks.sum_gradients(params)
            [loss_sum] = ranks.sum([float(loss_total)])  # the step's one read of a device value
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
    seconds = seconds_before + time.monotonic() - began
    return TrainSummary(loss_value, step, trained, seconds, device.type, checkpointing.enabled)
