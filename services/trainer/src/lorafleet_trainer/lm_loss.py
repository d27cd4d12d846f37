"""The vocabulary projection and its cross-entropy, summed, in chunks of positions when the logits would be large.

With Qwen2.5's 152k vocabulary the logits of one 2,048-token forward are the largest tensors of the step:
bf16 logits, their fp32 copy, its softmax gradient and the bf16 gradient, about 12 bytes x positions x vocab
(2.2 GiB at 1,230 labelled positions). ``lm_head_loss_sum`` computes, chunk by chunk, the loss and, when a
gradient is wanted, the gradient of the hidden states right away (softmax minus one-hot, times the head), so
only one chunk's logits exist at any time and nothing is recomputed. The head must be frozen (LoRA never
trains lm_head here); a trainable head, or logits small enough, take the plain path.
"""

from __future__ import annotations

from typing import Any

import torch

# Above this many logits (positions x vocabulary) the projection runs in chunks of at most this many.
CHUNK_LOGITS = 1 << 26  # 64 Mi logits: 256 MiB in fp32 per buffer


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropy over positions; the hidden states' gradient is computed in the forward pass."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk]
            logits = torch.nn.functional.linear(h, weight).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            grad[start : start + chunk] = probs.to(h.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_output).to(grad.dtype), None, None, None


def lm_head_loss_sum(
    head: Any, hidden: torch.Tensor, targets: torch.Tensor, chunk_logits: int = CHUNK_LOGITS
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``head(hidden)`` against ``targets`` (positions already selected)."""
    weight = getattr(head, "weight", None)
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else 0
    if (
        weight is None
        or vocab == 0
        or getattr(head, "bias", None) is not None
        or weight.requires_grad
        or hidden.shape[0] * vocab <= chunk_logits
    ):
        return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")
    chunk = max(1, chunk_logits // vocab)
    if not (torch.is_grad_enabled() and hidden.requires_grad):  # evaluation: no gradient to prepare
        parts = [
            torch.nn.functional.cross_entropy(head(h).float(), t, reduction="sum")
            for h, t in zip(hidden.split(chunk), targets.split(chunk), strict=True)
        ]
        return torch.stack(parts).sum()
    result: torch.Tensor = _ChunkedHeadCrossEntropy.apply(hidden, weight, targets, chunk)
    return result
