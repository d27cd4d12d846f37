"""The LoRA training loop: PEFT adapter, AdamW, linear warm-up + cosine decay, gradient accumulation.

fp32 on CPU, bf16 on CUDA. Batches are padded to their longest row and grouped
by length so little padding is computed. The loss is the mean over every
trained token of the optimizer step (not a mean of per-batch means), so the
result does not depend on how rows fall into batches.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet_trainer.manifest import LoraSpec, TrainingSpec
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


@dataclass(frozen=True)
class TrainSummary:
    final_loss: float
    steps: int
    trained_tokens: int
    seconds: float
    device: str


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def total_steps(n_examples: int, training: TrainingSpec) -> int:
    batches = math.ceil(n_examples / training.batch_size)
    return training.epochs * math.ceil(batches / training.gradient_accumulation_steps)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to 1, then cosine decay towards 0; ``step`` is 0-based."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length rows."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * LENGTH_GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(rows: list[TokenizedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
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
    """The base model with a fresh LoRA adapter; only the adapter trains. bf16 on CUDA, fp32 elsewhere."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, local_files_only=local_only)
    model.config.use_cache = False
    model = model.to(device)
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
    return get_peft_model(model, config)


def micro_batch_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions."""
    targets = batch["labels"][:, 1:]
    selected = targets != IGNORE_INDEX
    base = model.get_base_model()
    if base.config.model_type in PLAIN_LM_HEAD_MODELS:
        # Project only the positions that carry a label: the vocabulary projection is a large share of the
        # compute on small models and of the memory on large vocabularies (Qwen: 152k).
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = base.get_output_embeddings()(hidden.last_hidden_state[:, :-1][selected])
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][selected]
    return torch.nn.functional.cross_entropy(logits.float(), targets[selected], reduction="sum")


def train(
    model: Any,
    examples: list[TokenizedExample],
    training: TrainingSpec,
    pad_id: int,
    on_step: Callable[[StepReport], None],
    device: torch.device,
) -> TrainSummary:
    """Train ``model``'s LoRA weights in place and report every optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    steps = total_steps(len(examples), training)
    warmup = math.ceil(training.warmup_ratio * steps)
    lengths = [len(e.input_ids) for e in examples]
    rng = random.Random(training.seed)
    model.train()
    step = trained = 0
    loss_value = float("nan")
    began = time.monotonic()
    for epoch in range(training.epochs):
        batches = plan_batches(lengths, training.batch_size, rng)
        groups = [
            batches[i : i + training.gradient_accumulation_steps]
            for i in range(0, len(batches), training.gradient_accumulation_steps)
        ]
        for group_index, group in enumerate(groups):
            step_began = time.monotonic()
            lr = training.learning_rate * lr_factor(step, steps, warmup)
            for pg in optimizer.param_groups:
                pg["lr"] = lr
            rows = [[examples[i] for i in batch] for batch in group]
            label_count = sum(e.trained_tokens for batch in rows for e in batch)
            step_tokens = sum(len(e.input_ids) for batch in rows for e in batch)
            loss_sum = 0.0
            for batch_rows in rows:
                loss = micro_batch_loss_sum(model, collate(batch_rows, pad_id, device))
                (loss / label_count).backward()
                loss_sum += float(loss.detach())
            if training.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, training.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            trained += step_tokens
            loss_value = loss_sum / label_count
            elapsed = time.monotonic() - step_began
            on_step(
                StepReport(
                    step=step,
                    total_steps=steps,
                    epoch=epoch + (group_index + 1) / len(groups),
                    loss=loss_value,
                    learning_rate=lr,
                    tokens_per_second=step_tokens / elapsed if elapsed > 0 else 0.0,
                    eta_seconds=(time.monotonic() - began) / step * (steps - step),
                    peak_memory_bytes=peak_memory_bytes(device),
                    trained_tokens=trained,
                )
            )
    return TrainSummary(loss_value, step, trained, time.monotonic() - began, device.type)
