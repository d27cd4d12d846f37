"""The trainer's hot path on a tiny Qwen2 model (CPU, fp32): a micro-batch reads no tensor value on the host, and the
decoder layers compiled by ``training.compile`` train exactly like eager ones, with one graph for every layer and
no recompilation from one packed micro-batch to the next.

Compilation runs with the ``aot_eager`` backend: dynamo traces the layers (graph breaks, guards, recompilations are
all its doing) and AOTAutograd builds the joint forward/backward graph, but no C++ or Triton code is generated.
Inductor works on this CPU too, but takes about 100 s per graph here; the GPU benchmark uses it.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch._dynamo.utils import counters

from lorafleet_trainer import train_loop
from lorafleet_trainer.attention import VARLEN_ATTENTION, enable_varlen_attention
from lorafleet_trainer.compiled_layers import compiled_layers
from lorafleet_trainer.manifest import LoraSpec, TrainingSpec
from lorafleet_trainer.tokenize import IGNORE_INDEX, TokenizedExample
from tests.trainer.host_reads import HostReadCounter

from .conftest import assert_same, lora_model_with_random_b, loss_and_grads, write_tiny_qwen2

CPU = torch.device("cpu")
WIDTH = 64  # packed micro-batches' fixed width (max_length)
pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("one_thread")]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None) -> torch.Tensor:
    """Causal attention within each row that ``cu`` delimits, (tokens, heads, dim) layout, with tensor ops only
    (no host reads): what a varlen flash kernel computes."""
    tokens, groups = q.shape[0], q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    row = torch.searchsorted(cu[1:].contiguous(), torch.arange(tokens, dtype=cu.dtype), right=True)
    allowed = (row[:, None] == row[None, :]) & torch.ones(tokens, tokens, dtype=torch.bool).tril()
    heads_first = [t.transpose(0, 1)[None] for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*heads_first, attn_mask=allowed, scale=scale)
    return out[0].transpose(0, 1)


KERNEL_CALLS: list[int] = []


# An opaque operator with a shape function and its own backward, as torch's varlen_attn is: dynamo does not trace
# into it, and the rows' boundaries reach it as a tensor of varying length.
@torch.library.custom_op(
    "lorafleet_tests::varlen_reference",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor cu, int longest, float? scale) -> Tensor",
)
def varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float | None
) -> torch.Tensor:
    KERNEL_CALLS.append(longest)
    return _attend(q, k, v, cu, scale)


@varlen_reference.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float | None) -> Any:
    return torch.empty_like(q)


@torch.library.custom_op(
    "lorafleet_tests::varlen_reference_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor cu, float? scale) -> (Tensor, Tensor, Tensor)",
)
def varlen_reference_backward(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, pullback = torch.func.vjp(lambda a, b, c: _attend(a, b, c, cu, scale), q, k, v)
    dq, dk, dv = pullback(grad)
    return dq, dk, dv


@varlen_reference_backward.register_fake
def _(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: Any) -> Any:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    q, k, v, cu, _, scale = inputs
    ctx.save_for_backward(q, k, v, cu)
    ctx.scale = scale


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    q, k, v, cu = ctx.saved_tensors
    return (*varlen_reference_backward(grad.contiguous(), q, k, v, cu, ctx.scale), None, None, None)


varlen_reference.register_autograd(_backward, setup_context=_setup_context)


def reference_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float | None
) -> torch.Tensor:
    return varlen_reference(q, k, v, cu, longest, scale)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), layers=3)


def make_rows(lengths: list[int], seed: int) -> list[TokenizedExample]:
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [rng.randrange(10, 500) for _ in range(n)]
        prompt = n // 2
        rows.append(TokenizedExample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return rows


# Micro-batches of two packs each, with different row boundaries (and numbers of rows) every time.
PACKED_BATCHES = [[[9, 20, 30], [40, 17]], [[5, 6, 7, 8, 30], [60]], [[33, 31], [12, 12, 12, 12, 12]]]


def packed_batch(index: int) -> list[list[TokenizedExample]]:
    return [make_rows(pack, seed=10 * index + p) for p, pack in enumerate(PACKED_BATCHES[index])]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


class CountingBackend:
    """aot_eager, counting the graphs it compiles and the runs of its compiled code."""

    def __init__(self) -> None:
        self.graphs = 0
        self.runs = 0

    def __call__(self, graph: Any, inputs: Any) -> Any:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        compiled = lookup_backend("aot_eager")(graph, inputs)

        def run(*args: Any) -> Any:
            self.runs += 1
            return compiled(*args)

        return run


def eager_then_compiled(model: Any, layers: Any, index: int) -> None:
    """Packed micro-batch ``index`` through the eager layers, then the compiled ones: the same loss and gradients."""
    batch = train_loop.collate(packed_batch(index), 0, CPU, WIDTH)
    assert batch["input_ids"].shape == (2, WIDTH) and batch["max_seq_len"] == WIDTH
    KERNEL_CALLS.clear()
    eager = loss_and_grads(model, batch)
    eager_calls = len(KERNEL_CALLS)
    assert eager_calls and set(KERNEL_CALLS) == {WIDTH}  # the layers went through the varlen kernel
    with layers.active():
        layers.prepare(batch)
        compiled = loss_and_grads(model, batch)
    assert len(KERNEL_CALLS) == 2 * eager_calls  # and the compiled ones too
    assert_same(eager, compiled)


def test_compiled_layers_train_like_eager_ones_with_one_graph_for_every_layer_and_packed_batch(
    tiny_qwen2: Path,
) -> None:
    model = lora_model_with_random_b(tiny_qwen2, dropout=0.0)
    base = model.get_base_model()
    assert enable_varlen_attention(base, reference_kernel)
    assert base.config._attn_implementation == VARLEN_ATTENTION
    backend = CountingBackend()
    layers = compiled_layers(model, packed=True, backend=backend)
    assert layers is not None and len(layers.layers) == base.config.num_hidden_layers == 3
    model.train()
    breaks = graph_breaks()
    for index in range(len(PACKED_BATCHES)):
        eager_then_compiled(model, layers, index)
        # One graph, compiled for the first micro-batch, for all three layers and every later micro-batch.
        assert (backend.graphs, backend.runs) == (1, 3 * (index + 1)), f"micro-batch {index}"
    assert graph_breaks() == breaks  # each layer is one graph: no Python fallback inside
    assert all(layer._compiled_call_impl is None for layer in layers.layers)  # eager again outside active()

    # Under gradient checkpointing (the default on a GPU) the recomputation runs the compiled layers too.
    train_loop.set_gradient_checkpointing(model, True)
    try:
        for index in (0, 1):
            runs = backend.runs
            eager_then_compiled(model, layers, index)
            assert backend.runs == runs + 2 * 3  # forward, then recomputed in the backward pass
        assert backend.graphs == 1
    finally:
        train_loop.set_gradient_checkpointing(model, False)
    assert graph_breaks() == breaks


def host_reads(model: Any, batch: dict[str, Any]) -> list[str]:
    """What read a tensor value during the batch's forward, loss and backward (collate is the host's own work)."""
    model.zero_grad(set_to_none=True)
    with HostReadCounter() as reads:
        loss = train_loop.micro_batch_loss_sum(model, batch)
        loss.backward()
    assert loss.grad_fn is not None
    return reads.names


def test_a_micro_batch_reads_no_tensor_value_on_the_host(tiny_qwen2: Path) -> None:
    """Forward, loss and backward of padded and packed micro-batches: no .item(), no boolean mask, no ``if tensor``
    (on CUDA each would make the host wait for the GPU). The control: the same batch without the labelled positions
    found by the host makes the loss find them on the device, and the counter sees it."""
    model = lora_model_with_random_b(tiny_qwen2, dropout=0.1)
    base = model.get_base_model()
    model.train()
    padded = train_loop.collate([[r] for r in make_rows([20, 31, 7], seed=1)], 0, CPU)
    packed = train_loop.collate(packed_batch(0), 0, CPU)
    assert host_reads(model, padded) == []
    assert host_reads(model, packed) == []  # sdpa with a 4D mask
    assert enable_varlen_attention(base, reference_kernel)
    try:
        assert host_reads(model, packed) == []
        assert host_reads(model, train_loop.collate(packed_batch(1), 0, CPU, WIDTH)) == []  # fixed width
    finally:
        base.set_attn_implementation("sdpa")
    by_hand = {k: padded[k] for k in ("input_ids", "attention_mask", "labels")}
    assert "nonzero" in host_reads(model, by_hand)


def tiny_training(compile: bool, packing: bool = True) -> TrainingSpec:
    return TrainingSpec(
        epochs=2,
        batch_size=2,
        gradient_accumulation_steps=2,
        max_length=WIDTH,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        packing=packing,
        compile=compile,
        checkpoint_every_steps=0,
        checkpoint_every_minutes=0,
    )


def training_rows() -> list[TokenizedExample]:
    # 17 rows, or 7 packs of 64 tokens: each epoch ends on a micro-batch of 1 row or pack.
    return make_rows([9, 20, 30, 40, 17, 5, 6, 7, 8, 30, 60, 33, 31, 12, 12, 12, 50], seed=3)


def train_tiny(
    path: Path, training: TrainingSpec, backend: Any = "aot_eager", dropout: float = 0.0
) -> tuple[list[float], list[torch.Tensor]]:
    """A fresh adapter (seeded: the same start for every call) trained on the same rows; step losses, LoRA weights."""
    lora = LoraSpec(rank=4, alpha=8, dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"])
    model = train_loop.load_lora_model(str(path), lora, 0, CPU, local_only=True)
    losses: list[float] = []
    train_loop.train(model, training_rows(), training, 0, lambda r: losses.append(r.loss), CPU, compile_backend=backend)
    assert all(layer._compiled_call_impl is None for layer in model.get_base_model().model.layers)  # eager again
    return losses, [p.detach().clone() for p in model.parameters() if p.requires_grad]


def assert_same_training(a: tuple[list[float], list[torch.Tensor]], b: tuple[list[float], list[torch.Tensor]]) -> None:
    assert len(a[0]) == len(b[0]) >= 4
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    for wa, wb in zip(a[1], b[1], strict=True):
        torch.testing.assert_close(wa, wb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_training_with_compile_gives_the_eager_result(tiny_qwen2: Path, packing: bool) -> None:
    training = tiny_training(compile=True, packing=packing)
    eager = train_tiny(tiny_qwen2, training.model_copy(update={"compile": False}))
    breaks = graph_breaks()
    backend = CountingBackend()
    assert_same_training(eager, train_tiny(tiny_qwen2, training, backend))
    assert graph_breaks() == breaks
    forwards = training.epochs * train_loop.micro_batches_per_epoch(
        [len(r.input_ids) for r in training_rows()], training
    )
    assert backend.runs == 3 * forwards  # every layer of every training forward ran compiled
    # Two graphs: micro-batches of 2 packs (or rows: their widths are dynamic) and each epoch's last one, of 1.
    assert backend.graphs == 2


class FailingBackend(CountingBackend):
    """Fails to compile (``fail_at_run`` None), or compiles and then fails on that run of its compiled code."""

    def __init__(self, fail_at_run: int | None) -> None:
        super().__init__()
        self.fail_at_run = fail_at_run

    def __call__(self, graph: Any, inputs: Any) -> Any:
        if self.fail_at_run is None:
            raise RuntimeError("this backend cannot compile anything")
        compiled = super().__call__(graph, inputs)

        def run(*args: Any) -> Any:
            if self.runs + 1 == self.fail_at_run:
                raise RuntimeError("the compiled code failed")
            return compiled(*args)

        return run


# Runs 1-3: the first micro-batch's layers, forward and backward done; run 4: the second micro-batch's first layer.
@pytest.mark.parametrize("fail_at_run", [None, 4], ids=["compilation", "compiled-code"])
def test_a_failure_of_compilation_falls_back_to_eager_training(
    tiny_qwen2: Path, caplog: pytest.LogCaptureFixture, fail_at_run: int | None
) -> None:
    """The failed optimizer step is redone eagerly from where it began: the first micro-batch's gradients are
    dropped and the RNG rewound (LoRA dropout draws), so the run equals an eager one."""
    training = tiny_training(compile=True)
    eager = train_tiny(tiny_qwen2, training.model_copy(update={"compile": False}), dropout=0.1)
    backend = FailingBackend(fail_at_run)
    with caplog.at_level(logging.WARNING, logger="lorafleet_trainer.compiled_layers"):
        fallen_back = train_tiny(tiny_qwen2, training, backend, dropout=0.1)
    assert_same_training(eager, fallen_back)
    assert backend.runs == (fail_at_run or 1) - 1  # compiled code ran until it failed, and never after
    message = "the compiled code failed" if fail_at_run else "this backend cannot compile anything"
    assert message in caplog.text and "training goes on eagerly" in caplog.text
