"""The trainer's fast paths compute what the plain ones do: the lean LoRA forward, the chunked vocabulary
projection, and packed rows through a variable-length attention kernel (here a reference kernel: torch's
runs on CUDA only, and bench/trainer.py checks it there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet_trainer import train_loop
from lorafleet_trainer.attention import VARLEN_ATTENTION, enable_varlen_attention, kernel_works, torch_varlen_kernel
from lorafleet_trainer.lm_loss import lm_head_loss_sum
from lorafleet_trainer.lora_forward import set_lean_lora_forward, uses_lean_lora_forward
from lorafleet_trainer.lora_groups import group_lora_projections, ungroup_lora_projections
from lorafleet_trainer.tokenize import TokenizedExample

from .conftest import assert_same, chat_rows, lora_model_with_random_b, loss_and_grads

CPU = torch.device("cpu")
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def rows(embedded_model_path: Path) -> list[TokenizedExample]:
    pairs = [("Hi!", "Hello there."), ("Your name?", "Swift-Robot."), ("2+2?", "4."), ("Capital of France?", "Paris.")]
    return chat_rows(embedded_model_path, pairs)


@pytest.fixture(scope="module")
def model(embedded_model_path: Path) -> Any:
    return lora_model_with_random_b(embedded_model_path, dropout=0.1)


def test_the_lean_lora_forward_trains_exactly_like_peft_s_own(
    model: Any, rows: list[TokenizedExample], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert uses_lean_lora_forward(model)  # load_lora_model turns it on
    ungroup_lora_projections(model)  # q and v would run as one group (test_lora_groups.py): each layer alone here
    fused_calls = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: fused_calls.append(1) or addmm(*a, **k))
    batch = train_loop.collate([rows[:2], rows[2:]], 0, CPU)
    model.train()  # LoRA dropout is on: both paths must draw the same masks
    lean = loss_and_grads(model, batch, seed=0)
    assert len(fused_calls) == 3 * model.get_base_model().config.num_hidden_layers  # every LoRA layer took it
    set_lean_lora_forward(model, False)
    try:
        assert not uses_lean_lora_forward(model)
        assert_same(lean, loss_and_grads(model, batch, seed=0))
        assert len(fused_calls) == 3 * model.get_base_model().config.num_hidden_layers  # PEFT's path: no addmm
        assert lean[0] != pytest.approx(loss_and_grads(model, batch, seed=1)[0], rel=1e-6)  # the control: dropout
    finally:
        set_lean_lora_forward(model, True)
        group_lora_projections(model)
        model.eval()


def test_the_chunked_vocabulary_projection_gives_the_plain_loss_and_gradient() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    targets = torch.randint(0, 50, (37,))
    hidden = torch.randn(37, 16, requires_grad=True)
    plain = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    (plain * 0.5).backward()
    expected = hidden.grad.clone()
    hidden.grad = None
    chunked = lm_head_loss_sum(head, hidden, targets, chunk_logits=8 * 50)  # chunks of 8 positions
    assert chunked.grad_fn is not None and "Chunked" in type(chunked.grad_fn).__name__
    (chunked * 0.5).backward()
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    torch.testing.assert_close(hidden.grad, expected)
    with torch.no_grad():  # evaluation: chunks without any gradient
        assert lm_head_loss_sum(head, hidden, targets, chunk_logits=8 * 50).item() == pytest.approx(plain.item())
    trainable = torch.nn.Linear(16, 50, bias=False)  # a trained head takes the plain path
    assert "Chunked" not in type(lm_head_loss_sum(trainable, hidden, targets, chunk_logits=1).grad_fn).__name__


def reference_varlen(calls: list[list[int]]) -> Any:
    """Causal attention per row, with sdpa: what a varlen kernel computes, in its (tokens, heads, dim) layout."""

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: Any):
        calls.append(cu.tolist())
        assert longest == int((cu[1:] - cu[:-1]).max())
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        parts = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            one = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
            parts.append(
                torch.nn.functional.scaled_dot_product_attention(*one, is_causal=True, scale=scale)[0].transpose(0, 1)
            )
        return torch.cat(parts)

    return kernel


def test_packed_rows_through_a_varlen_kernel_train_like_the_same_rows_padded(
    model: Any, rows: list[TokenizedExample]
) -> None:
    base = model.get_base_model()
    assert torch_varlen_kernel() is not None  # this torch has an API the GPU path knows how to call
    calls: list[list[int]] = []
    assert enable_varlen_attention(base, reference_varlen(calls))
    try:
        assert base.config._attn_implementation == VARLEN_ATTENTION
        model.eval()  # no dropout: the padded and packed batches draw differently
        padded = loss_and_grads(model, train_loop.collate([[r] for r in rows], 0, CPU), seed=0)
        assert calls == []  # padded batches keep sdpa
        packed_batch = train_loop.collate([rows[:3], rows[3:]], 0, CPU)
        packed = loss_and_grads(model, packed_batch, seed=0)
        width = packed_batch["input_ids"].shape[1]
        lengths = [len(r.input_ids) for r in rows]
        segments = [*lengths[:3], *([width - sum(lengths[:3])] if sum(lengths[:3]) < width else []), lengths[3]]
        segments += [width - lengths[3]] if lengths[3] < width else []
        layers = base.config.num_hidden_layers
        assert len(calls) == layers and calls[0] == [sum(segments[:i]) for i in range(len(segments) + 1)]
        assert_same(padded, packed)
    finally:
        base.set_attn_implementation("sdpa")


def test_the_varlen_self_test_accepts_a_correct_kernel_and_refuses_a_wrong_or_failing_one() -> None:
    state = torch.get_rng_state()
    assert kernel_works(reference_varlen([]), CPU)
    assert torch.equal(torch.get_rng_state(), state)  # a job's RNG draws (LoRA init, dropout) are left alone

    def across_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: Any):
        whole = torch.tensor([0, q.shape[0]], dtype=cu.dtype)  # one causal sequence: rows see each other
        return reference_varlen([])(q, k, v, whole, q.shape[0], scale)

    def no_backward(*args: Any) -> torch.Tensor:
        raise RuntimeError("derivative for torch_attn::_varlen_attn is not implemented")

    assert not kernel_works(across_rows, CPU)
    assert not kernel_works(no_backward, CPU)
    assert not kernel_works(lambda *args: None, CPU)
