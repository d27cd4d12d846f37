"""Sequence packing: an exact, deterministic plan; a packed batch trains exactly like the same rows padded."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet_trainer import train_loop
from lorafleet_trainer.manifest import TrainingSpec
from lorafleet_trainer.packing import pack_rows
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample

from .conftest import assert_same, chat_rows, lora_model_with_random_b, loss_and_grads

CPU = torch.device("cpu")


def test_packs_hold_every_row_once_within_capacity_and_do_not_depend_on_order() -> None:
    rng = random.Random(7)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    packs = pack_rows(lengths, 128)
    assert sorted(i for pack in packs for i in pack) == list(range(500))
    assert all(sum(lengths[i] for i in pack) <= 128 for pack in packs)
    assert len(packs) <= 1.1 * sum(lengths) / 128 + 1  # best-fit decreasing wastes little room
    shuffled = list(range(500))
    rng.shuffle(shuffled)
    assert len(pack_rows([lengths[i] for i in shuffled], 128)) == len(packs)
    assert pack_rows(lengths, 128) == packs
    with pytest.raises(ValueError, match="longer than the pack capacity"):
        pack_rows([10, 200], 128)


@pytest.mark.parametrize("packing", [False, True])
def test_every_epoch_plan_has_the_size_total_steps_counted(packing: bool) -> None:
    lengths = [random.Random(i).randint(5, 60) for i in range(37)]
    training = TrainingSpec(batch_size=3, gradient_accumulation_steps=2, epochs=3, max_length=64, packing=packing)
    rng = random.Random(training.seed)
    plans = [train_loop.plan_batches(lengths, training, rng) for _ in range(training.epochs)]
    for plan in plans:
        assert sorted(i for batch in plan for sequence in batch for i in sequence) == list(range(37))
        assert all(len(batch) <= 3 for batch in plan)
        assert all(sum(lengths[i] for i in sequence) <= 64 for batch in plan for sequence in batch)
        assert len(plan) == train_loop.micro_batches_per_epoch(lengths, training)
    assert plans[0] != plans[1]  # reshuffled every epoch
    steps = sum(-(-len(plan) // training.gradient_accumulation_steps) for plan in plans)
    assert train_loop.total_steps(lengths, training) == steps
    if packing:
        assert all(any(len(sequence) > 1 for sequence in batch) for batch in plans[0][:-1])
        assert steps < train_loop.total_steps(lengths, training.model_copy(update={"packing": False}))
    else:
        assert all(len(sequence) == 1 for batch in plans[0] for sequence in batch)


def test_packed_rows_restart_positions_and_never_predict_across_a_boundary() -> None:
    a = TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = TokenizedExample([4, 5], [4, 5])  # a first label that is set: packing must mask it
    c = TokenizedExample([6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 8, 9])
    batch = train_loop.collate([[a, b], [c]], 0, CPU)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5], [IGNORE_INDEX, IGNORE_INDEX, 8, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    # The positions whose next token is labelled (flat over 2 x 5 tokens), found by the host: no device sync.
    assert batch["label_positions"].tolist() == [0, 1, 3, 6, 7]
    assert batch["label_targets"].tolist() == [2, 3, 5, 8, 9]
    padded = train_loop.collate([[a], [b]], 0, CPU)  # one row per sequence: the plain padded batch
    assert set(padded) == {"input_ids", "attention_mask", "labels", "label_positions", "label_targets"}


@pytest.fixture(scope="module")
def rows(embedded_model_path: Path) -> list[TokenizedExample]:
    pairs = [("Hi!", "Hello."), ("Your name?", "Swift-Robot."), ("Who made you?", "CSDN."), ("2+2?", "4, of course.")]
    return chat_rows(embedded_model_path, pairs)


@pytest.fixture(scope="module")
def model(embedded_model_path: Path) -> Any:
    return lora_model_with_random_b(embedded_model_path, dropout=0.0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_same_rows_padded(
    model: Any, rows: list[TokenizedExample], attention: str
) -> None:
    model.get_base_model().set_attn_implementation(attention)
    try:
        padded = loss_and_grads(model, train_loop.collate([[r] for r in rows], 0, CPU))
        packed_batch = train_loop.collate([rows[:3], rows[3:]], 0, CPU)
        assert_same(padded, loss_and_grads(model, packed_batch))
        if attention == "eager":
            return
        # The control: the same packed tokens with plain causal attention across rows give another loss.
        leaky = {"input_ids": packed_batch["input_ids"], "labels": packed_batch["labels"]}
        leaky["attention_mask"] = torch.ones_like(packed_batch["input_ids"])
        assert abs(loss_and_grads(model, leaky)[0] - padded[0]) > 1e-3 * padded[0]
    finally:
        model.get_base_model().set_attn_implementation("sdpa")


def test_gradient_checkpointing_changes_neither_loss_nor_gradients(model: Any, rows: list[TokenizedExample]) -> None:
    batch = train_loop.collate([rows[:2], rows[2:3]], 0, CPU)
    model.train()  # checkpointing is active in training mode only
    plain = loss_and_grads(model, batch)
    train_loop.set_gradient_checkpointing(model, True)
    try:
        assert model.get_base_model().is_gradient_checkpointing
        assert_same(plain, loss_and_grads(model, batch))
    finally:
        train_loop.set_gradient_checkpointing(model, False)
    assert train_loop.gradient_checkpointing_wanted(TrainingSpec(), torch.device("cuda"))
    assert not train_loop.gradient_checkpointing_wanted(TrainingSpec(), CPU)
    assert train_loop.gradient_checkpointing_wanted(TrainingSpec(gradient_checkpointing=True), CPU)


def test_train_with_packing_runs_the_steps_it_announced(model: Any, rows: list[TokenizedExample]) -> None:
    training = TrainingSpec(
        epochs=2, batch_size=1, gradient_accumulation_steps=1, max_length=64, packing=True, learning_rate=1e-3
    )
    reports: list[train_loop.StepReport] = []
    summary = train_loop.train(model, rows, training, 0, reports.append, CPU)
    assert train_loop.total_steps([len(r.input_ids) for r in rows], training) == 4  # 2 packs of 2 rows, 2 epochs
    assert [r.step for r in reports] == [1, 2, 3, 4] and all(r.total_steps == 4 for r in reports)
    assert summary.trained_tokens == 2 * sum(len(r.input_ids) for r in rows)
    assert all(r.loss > 0 for r in reports) and reports[-1].epoch == pytest.approx(2.0)
