"""Gradient checkpointing when it is needed: a memory probe decides for a manifest that leaves it unset.

Checkpointing costs about a third more compute (and, eager, the host's time to launch the recomputation), so it
should be on only when the activations of the job's largest micro-batch would not fit. On CUDA, before the first
step, one forward and backward pass without checkpointing runs on a synthetic micro-batch of that worst case
(train_loop.py builds it and runs it through the loop's own loss path); its peak allocation against the memory
this process can reach decides. Out of memory during the probe means on. The probe leaves no trace: gradients,
RNG states (LoRA dropout draws, which resumed runs replay) and train/eval mode are as before, and the allocator's
peak is reset so the first step reports its own. On CPU (compute-bound) checkpointing stays off, unprobed; an
explicit ``training.gradient_checkpointing`` is obeyed as is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet_trainer.distributed import Ranks
from lorafleet_trainer.manifest import TrainingSpec
from lorafleet_trainer.packing import pack_rows
from lorafleet_trainer.tokenize import TokenizedExample

log = logging.getLogger(__name__)

# Of the memory this process can reach: the rest is headroom for what the probe does not see (the optimizer's
# state, created at the first step; the allocator's fragmentation; the CUDA context and NCCL buffers).
BUDGET_SHARE = 0.9
GIB = 2**30


@dataclass(frozen=True)
class CheckpointingDecision:
    enabled: bool
    why: str

    def describe(self) -> str:
        return f"gradient checkpointing {'on' if self.enabled else 'off'}: {self.why}"


def worst_case_shape(lengths: Sequence[int], training: TrainingSpec) -> tuple[int, int]:
    """(sequences, tokens per sequence) of the largest micro-batch this job's plan can produce."""
    if training.packing:  # compiled layers pad every pack to max_length: the widest a pack gets
        return min(training.batch_size, len(pack_rows(lengths, training.max_length))), training.max_length
    return min(training.batch_size, len(lengths)), min(max(lengths, default=0), training.max_length)


def synthetic_micro_batch(shape: tuple[int, int], token_id: int) -> list[list[TokenizedExample]]:
    """Sequences of one row each, every token labelled: the most the vocabulary projection can get."""
    sequences, tokens = shape
    row = TokenizedExample(input_ids=[token_id] * tokens, labels=[token_id] * tokens)
    return [[row] for _ in range(sequences)]


def peak_allocated_bytes(device: torch.device, work: Callable[[], Any]) -> int:
    """The allocator's peak while ``work()`` runs on ``device`` (CUDA)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    work()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def memory_budget_bytes(device: torch.device) -> int:
    """A share of the memory this process can reach: what it holds plus what is free on the device (another
    process, a vLLM replica, may hold the rest), within its per-process memory fraction."""
    index = device.index if device.index is not None else torch.cuda.current_device()  # the getter wants one
    free, total = torch.cuda.mem_get_info(index)
    fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(fraction_of(index)) if fraction_of is not None else 1.0
    reachable = min(total * fraction, free + torch.cuda.memory_reserved(index))
    return int(BUDGET_SHARE * reachable)


def peak_without_trace(model: Any, device: torch.device, measure: Callable[[], int]) -> int | None:
    """``measure()`` (a forward and backward pass of ``model``, in training mode; its peak in bytes) undone
    afterwards; None when it ran out of memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]  # references: the probe's backward makes new tensors, these stay untouched
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" and torch.cuda.is_available() else None
    was_training = model.training
    peak: int | None = None
    try:
        for p in params:
            p.grad = None
        model.train()  # LoRA dropout's masks are part of the memory
        peak = measure()
    except torch.OutOfMemoryError:
        pass  # the activations go with the exception's frames, so the cache can be emptied below
    finally:
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad
        model.train(was_training)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    if device.type == "cuda" and torch.cuda.is_initialized():  # (not initialized: a test's injected measurement)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def decide_gradient_checkpointing(
    model: Any,
    training: TrainingSpec,
    device: torch.device,
    measure: Callable[[], int],
    *,
    ranks: Ranks | None = None,
    budget_bytes: int | None = None,
    workload: str = "the largest micro-batch",
) -> CheckpointingDecision:
    """The manifest's choice; unset: off on CPU, and on CUDA on only if the probe (``measure``, see
    ``peak_without_trace``) does not fit ``budget_bytes`` (default: ``memory_budget_bytes``) on some rank: every
    rank must run the same graph."""
    if training.gradient_checkpointing is not None:
        return CheckpointingDecision(training.gradient_checkpointing, "set in the manifest")
    if device.type != "cuda":
        return CheckpointingDecision(False, "the default without a GPU (compute-bound)")
    ranks = ranks or Ranks()
    budget = memory_budget_bytes(device) if budget_bytes is None else budget_bytes
    peak = peak_without_trace(model, device, measure)
    needed = peak is None or peak > budget
    any_needed, any_oom, highest, lowest = ranks.max(
        [float(needed), float(peak is None), float(peak or 0), -float(budget)]
    )
    where = f" (the highest peak and lowest budget of {ranks.world_size} processes)" if ranks.distributed else ""
    if any_oom:
        why = f"the memory probe on {workload} ran out of memory" + (" on some process" if ranks.distributed else "")
    else:
        verdict = "exceeds" if any_needed else "fits"
        why = f"the memory probe's peak on {workload}, {highest / GIB:.1f} GiB, {verdict} the budget"
        why += f" {-lowest / GIB:.1f} GiB{where}"
    decision = CheckpointingDecision(any_needed > 0, why)
    log.info("%s", decision.describe())
    return decision
