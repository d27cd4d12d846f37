"""Validation loss: the mean next-token loss over held-out rows, with the training loss function.

Evaluation runs between optimizer steps with dropout off and no gradients, and draws
nothing from any RNG, so a run with validation trains exactly as one without (and a
resumed run exactly as an uninterrupted one).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from lorafleet_trainer.datasets import Example

if TYPE_CHECKING:  # torch is imported only once the worker trains
    import torch

    from lorafleet_trainer.tokenize import TokenizedExample

SPLIT_SEED_OFFSET = 7_919  # the hold-out draw must not reuse the dataset mixer's seed sequence


def split_validation(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training rows, held-out rows): a seeded ``ratio`` share held out, at least one row each side."""
    if len(examples) < 2:
        return examples, []
    held = min(len(examples) - 1, max(1, round(len(examples) * ratio)))
    chosen = set(random.Random(seed + SPLIT_SEED_OFFSET).sample(range(len(examples)), held))
    train = [e for i, e in enumerate(examples) if i not in chosen]
    return train, [e for i, e in enumerate(examples) if i in chosen]


def evaluation_due(step: int, total_steps: int, epoch: float, every_steps: int) -> bool:
    """After every ``every_steps`` optimizer steps (0: never by count), at each epoch's end and after the last step."""
    return step == total_steps or float(epoch).is_integer() or (every_steps > 0 and step % every_steps == 0)


def eval_loss(model: Any, rows: list[TokenizedExample], batch_size: int, pad_id: int, device: torch.device) -> float:
    """Mean next-token cross-entropy over every labelled token of ``rows`` (NaN when there are none)."""
    import torch

    from lorafleet_trainer.train_loop import collate_padded, micro_batch_loss_sum

    labelled = sum(r.trained_tokens for r in rows)
    if not rows or labelled == 0:
        return float("nan")
    ordered = sorted(rows, key=lambda r: len(r.input_ids), reverse=True)  # little padding; no RNG
    was_training = model.training
    model.eval()  # dropout off: deterministic, and no draws from torch's RNG
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(ordered), batch_size):
                batch = collate_padded(ordered[start : start + batch_size], pad_id, device)
                total += float(micro_batch_loss_sum(model, batch))
    finally:
        if was_training:
            model.train()
    return total / labelled
