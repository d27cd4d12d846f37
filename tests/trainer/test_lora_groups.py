"""LoRA projection groups (lora_groups.py): q/k/v and gate/up as one augmented GEMM each compute what PEFT's own
forward does, keep no second copy of the base weights, and follow the adapter as it trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet_trainer import lora_forward, lora_groups, train_loop
from lorafleet_trainer.lora_forward import set_lean_lora_forward
from lorafleet_trainer.lora_groups import group_lora_projections, ungroup_lora_projections, uses_lora_groups
from lorafleet_trainer.manifest import LoraSpec

from .conftest import assert_same, loss_and_grads, write_tiny_qwen2

CPU = torch.device("cpu")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), layers=2)  # q/k/v with biases, as Qwen2.5


def grouped_model(path: Path, dropout: float, targets: list[str] = ALL_LINEAR) -> Any:
    lora = LoraSpec(rank=4, alpha=8, dropout=dropout, target_modules=targets)
    model = train_loop.load_lora_model(str(path), lora, 0, CPU, local_only=True)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT's zeros would make every A gradient zero: a comparison proving nothing
            torch.nn.init.normal_(param, std=0.05)
    return model


def batch(seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, 24), generator=generator)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


class PeftForward:
    """PEFT's own LoRA forward while inside (groups and the lean forward off), then back."""

    def __init__(self, model: Any):
        self.model = model

    def __enter__(self) -> None:
        ungroup_lora_projections(self.model)
        set_lean_lora_forward(self.model, False)

    def __exit__(self, *exc: object) -> None:
        set_lean_lora_forward(self.model, True)
        group_lora_projections(self.model)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_grouped_projections_train_exactly_like_peft_s_own(
    tiny_qwen2: Path, dropout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = grouped_model(tiny_qwen2, dropout)
    layers = model.get_base_model().config.num_hidden_layers
    assert uses_lora_groups(model)
    products, singles = [], []
    original = lora_groups._products
    monkeypatch.setattr(lora_groups, "_products", lambda *a: products.append(len(a[1])) or original(*a))
    single = lora_forward._LoraLinear.apply
    monkeypatch.setattr(lora_forward._LoraLinear, "apply", lambda *a: singles.append(1) or single(*a))
    model.train()  # with dropout on, both paths must draw the same masks in the same order
    grouped = loss_and_grads(model, batch(), seed=0)
    assert products == [3, 2] * layers  # q/k/v, then gate/up, in every layer
    # o and down alone: without dropout through the lean forward's fused backward (lora_forward.py)
    assert len(singles) == (0 if dropout else 2 * layers)
    with PeftForward(model):
        assert not uses_lora_groups(model)
        assert_same(grouped, loss_and_grads(model, batch(), seed=0))
    assert len(products) == 2 * layers  # PEFT's path took none
    if dropout:  # the control: other masks, another result
        assert grouped[0] != pytest.approx(loss_and_grads(model, batch(), seed=1)[0], rel=1e-6)
    model.eval()
    with torch.no_grad():  # evaluation: no gradient, the same function
        evaluated = float(train_loop.micro_batch_loss_sum(model, batch()))
        with PeftForward(model):
            assert evaluated == pytest.approx(float(train_loop.micro_batch_loss_sum(model, batch())), rel=1e-5)


def test_the_base_weights_live_in_the_group_buffers_and_the_adapter_is_followed_step_by_step(tiny_qwen2: Path) -> None:
    model = grouped_model(tiny_qwen2, 0.0)
    attention = model.get_base_model().model.layers[0].self_attn
    group = attention.q_proj.__dict__[lora_groups.GROUP_ATTRIBUTE]
    buffer = group.weight
    for name in ("q_proj", "k_proj", "v_proj"):
        base = getattr(attention, name).base_layer
        assert base.weight.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()  # a view, no copy
        assert (
            base.bias is not None and base.bias.untyped_storage().data_ptr() == group.bias.untyped_storage().data_ptr()
        )
    reference = grouped_model(tiny_qwen2, 0.0)
    ungroup_lora_projections(reference)
    set_lean_lora_forward(reference, False)
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05, foreach=False)
        for m in (model, reference)
    ]
    model.train()
    reference.train()
    for step in range(3):
        for m, optimizer in zip((model, reference), optimizers, strict=True):
            loss = train_loop.micro_batch_loss_sum(m, batch(step))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        b = attention.q_proj.lora_B["default"].weight
        rows, cols = group.layout[0]
        # the buffer's B block follows the parameter once the decoder runs again
        train_loop.micro_batch_loss_sum(model, batch(step))
        torch.testing.assert_close(buffer[rows, group.in_features + cols.start : group.in_features + cols.stop], b)
    trained = [p.detach() for p in model.parameters() if p.requires_grad]
    expected = [p.detach() for p in reference.parameters() if p.requires_grad]
    for got, want in zip(trained, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_sibling_called_with_another_input_computes_on_its_own(tiny_qwen2: Path) -> None:
    model = grouped_model(tiny_qwen2, 0.0)
    attention = model.get_base_model().model.layers[0].self_attn
    x, other = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        q = attention.q_proj(x)
        k_other = attention.k_proj(other)  # not the input q's group output was made for
        k, v = attention.k_proj(x), attention.v_proj(x)
        with PeftForward(model):
            want = [
                getattr(attention, n)(t) for n, t in (("q_proj", x), ("k_proj", other), ("k_proj", x), ("v_proj", x))
            ]
    for got, expected in zip((q, k_other, k, v), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_layers_the_lean_forward_would_not_take_stay_out_of_groups(tiny_qwen2: Path) -> None:
    partial = grouped_model(tiny_qwen2, 0.0, targets=["q_proj", "down_proj"])  # q alone: no sibling to group with
    assert not uses_lora_groups(partial)
    model = grouped_model(tiny_qwen2, 0.0)
    with torch.no_grad():
        on = float(train_loop.micro_batch_loss_sum(model, batch()))
        with model.disable_adapter():  # the base model alone: the groups step aside
            off = float(train_loop.micro_batch_loss_sum(model, batch()))
        with PeftForward(model), model.disable_adapter():
            assert off == pytest.approx(float(train_loop.micro_batch_loss_sum(model, batch())), rel=1e-5)
    assert abs(on - off) > 1e-2  # the control: the adapter changes the loss (~0.1% with these B)
