"""Gradient checkpointing by a memory probe: the decision (the peak injected: no GPU here), the worst-case
micro-batch, the any-rank rule over real gloo ranks, and a real forward and backward pass that leaves no trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet_trainer import train_loop
from lorafleet_trainer.distributed import Ranks
from lorafleet_trainer.manifest import TrainingSpec
from lorafleet_trainer.memory_probe import (
    decide_gradient_checkpointing,
    peak_without_trace,
    synthetic_micro_batch,
    worst_case_shape,
)
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample

from .conftest import lora_model_with_random_b, write_tiny_qwen2

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # the decision probes on CUDA only; these tests inject the measurement
pytestmark = pytest.mark.timeout(120)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1)).eval()


def backward_then(model: torch.nn.Module, outcome: Callable[[], int]) -> Callable[[], int]:
    """A measurement that does what a probe does (dropout draws, a backward pass that fills the gradients)."""

    def measure() -> int:
        assert model.training  # the probe measures training mode
        model(torch.randn(3, 4)).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        return outcome()

    return measure


def test_a_micro_batch_that_fits_keeps_checkpointing_off_and_one_over_budget_turns_it_on() -> None:
    model = small_model()
    fits = decide_gradient_checkpointing(
        model, TrainingSpec(), CUDA, backward_then(model, lambda: 60 * 2**30), budget_bytes=72 * 2**30
    )
    assert not fits.enabled
    assert fits.describe() == (
        "gradient checkpointing off: the memory probe's peak on the largest micro-batch, 60.0 GiB, "
        "fits the budget 72.0 GiB"
    )
    over = decide_gradient_checkpointing(
        model, TrainingSpec(), CUDA, backward_then(model, lambda: 101), budget_bytes=100
    )
    assert over.enabled and "exceeds the budget" in over.why
    at_budget = decide_gradient_checkpointing(model, TrainingSpec(), CUDA, lambda: 100, budget_bytes=100)
    assert not at_budget.enabled
    assert all(p.grad is None for p in model.parameters()) and not model.training  # as before each probe


def test_running_out_of_memory_turns_it_on_and_leaves_neither_gradients_nor_rng_draws() -> None:
    model = small_model()
    before = [p.grad for p in model.parameters()]

    def out_of_memory() -> int:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    rng = torch.get_rng_state()
    decision = decide_gradient_checkpointing(
        model, TrainingSpec(), CUDA, backward_then(model, out_of_memory), budget_bytes=100, workload="4 x 2048 tokens"
    )
    assert decision.enabled
    assert decision.why == "the memory probe on 4 x 2048 tokens ran out of memory"
    assert before == [None, None, None, None] and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng) and not model.training


def test_an_explicit_manifest_value_and_the_cpu_skip_the_probe() -> None:
    model = small_model()

    def never() -> int:
        raise AssertionError("the probe ran")

    for device in (CPU, CUDA):
        for value in (True, False):
            decision = decide_gradient_checkpointing(
                model, TrainingSpec(gradient_checkpointing=value), device, never, budget_bytes=1
            )
            assert decision.enabled is value and decision.why == "set in the manifest"
    on_cpu = decide_gradient_checkpointing(model, TrainingSpec(), CPU, never, budget_bytes=1)
    assert not on_cpu.enabled and "without a GPU" in on_cpu.why


def test_the_worst_case_is_the_largest_micro_batch_the_plan_can_make() -> None:
    lengths = [30, 200, 90, 90, 10]
    assert worst_case_shape(lengths, TrainingSpec(batch_size=4, max_length=512)) == (4, 200)
    assert worst_case_shape(lengths, TrainingSpec(batch_size=8, max_length=512)) == (5, 200)  # only 5 rows
    packed = TrainingSpec(batch_size=4, max_length=256, packing=True)
    assert worst_case_shape(lengths, packed) == (2, 256)  # 420 tokens make 2 packs; each padded to max_length
    assert worst_case_shape([], TrainingSpec()) == (0, 0)
    [[row]] = synthetic_micro_batch((1, 5), token_id=7)
    assert row.input_ids == [7] * 5 and row.trained_tokens == 5


def test_checkpointing_goes_on_for_every_rank_if_any_rank_needs_it(unused_port: Callable[[], int]) -> None:
    scenarios = "50,150;50,60;oom,10"  # rank 1 over budget; both fit; rank 0 out of memory
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(unused_port()), "WORLD_SIZE": "2"}
    script = Path(__file__).with_name("probe_rank.py")
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), scenarios],
            env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for process in ranks:
            out, _ = process.communicate(timeout=90)
            assert process.returncode == 0
            outputs.append([json.loads(line) for line in out.splitlines()])
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    for decisions in outputs:
        assert [d["enabled"] for d in decisions] == [True, False, True]
        assert decisions[0]["why"] == (
            "the memory probe's peak on the largest micro-batch, 150.0 GiB, exceeds the budget 100.0 GiB "
            "(the highest peak and lowest budget of 2 processes)"
        )
        assert decisions[2]["why"].endswith("ran out of memory on some process")
    assert outputs[0] == [d | {"rank": 0} for d in outputs[1]]  # both ranks state the same decision


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A randomly initialised tiny Qwen2 (Qwen2.5's module names) with LoRA dropout: a pass draws from the RNG."""
    return lora_model_with_random_b(write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), layers=2), dropout=0.1)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_a_real_probe_pass_leaves_weights_gradients_rng_and_mode_as_they_were(
    lora_model: Any, packing: bool, one_thread: None
) -> None:
    model = lora_model
    model.zero_grad(set_to_none=True)
    training = TrainingSpec(batch_size=2, max_length=24, packing=packing)
    shape = worst_case_shape([12, 20, 7], training)
    assert shape == ((2, 24) if packing else (2, 20))  # packed: [20] and [12, 7], each padded to max_length
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    kept = next(iter(trainable.values()))
    kept.grad = torch.full_like(kept, 0.5)  # a gradient the caller holds survives, the others stay None
    weights = {name: p.detach().clone() for name, p in model.state_dict().items()}
    model.eval()
    rng = torch.get_rng_state()
    seen: dict[str, Any] = {}

    def measure() -> int:  # the loop's own probe pass; its peak is measured on CUDA only
        train_loop.worst_case_backward(model, shape, training, 0, CPU)
        seen["grads"] = sum(float(p.grad.abs().sum()) for p in trainable.values() if p.grad is not None)
        seen["rng moved"] = not torch.equal(torch.get_rng_state(), rng)
        seen["training"] = model.training
        return 1

    assert peak_without_trace(model, CPU, measure) == 1
    assert seen["grads"] > 0 and seen["rng moved"] and seen["training"]  # the pass was real
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert kept.grad is not None and torch.equal(kept.grad, torch.full_like(kept, 0.5))
    assert all(p.grad is None for p in trainable.values() if p is not kept)
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], v) for k, v in weights.items())
    # On CPU the loop itself does not probe: checkpointing stays off.
    decision = train_loop.gradient_checkpointing_decision(model, [12, 20, 7], training, 0, CPU, Ranks())
    assert not decision.enabled


def test_the_loop_reports_its_decision_and_applies_it(lora_model: Any, one_thread: None) -> None:
    rows = [TokenizedExample([5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8]) for _ in range(2)]
    notes: list[str] = []
    for value, note in [
        (None, "gradient checkpointing off: the default without a GPU (compute-bound)"),
        (True, "gradient checkpointing on: set in the manifest"),
    ]:
        training = TrainingSpec(epochs=1, batch_size=2, gradient_accumulation_steps=1, gradient_checkpointing=value)
        summary = train_loop.train(lora_model, rows, training, 0, lambda _: None, CPU, on_note=notes.append)
        assert notes[-1] == note
        assert summary.gradient_checkpointing is lora_model.get_base_model().is_gradient_checkpointing is bool(value)
    train_loop.set_gradient_checkpointing(lora_model, False)
    assert len(notes) == 2
