"""Several adapters folded into the base GEMM (lorafleet_inference.lora_fold_multi, through lora_fold's
controller): the arithmetic against what vLLM computes row by row, the columns each slot gets, the rank budget,
and slots that vLLM rewrites. The path through vLLM's engine (CPU build) is in test_bench.py
(bench/lora_mixed_check.py, variant ours-fold: its two-adapter mixes run this fold)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorafleet_inference import lora_fold, lora_fold_multi
from tests.inference.inference_helpers import load_bench_module

K, MAX_RANK, SLOTS = 24, 4, 4
QKV, GATE_UP = (10, 6, 6), (12, 12)


def lora_layer(widths: tuple[int, ...], ranks: dict[int, int], budget: int, seed: int) -> SimpleNamespace:
    """A vLLM merged-column LoRA layer's slot-stacked weights (slot s holds an adapter of rank ranks[s], zero past
    it, as vLLM's set_lora leaves a smaller adapter in a larger slot) with its fold attached."""
    generator = torch.Generator().manual_seed(seed)
    a = [torch.zeros(SLOTS, 1, MAX_RANK, K) for _ in widths]
    b = [torch.zeros(SLOTS, 1, rows, MAX_RANK) for rows in widths]
    for slot, rank in ranks.items():
        for index, rows in enumerate(widths):
            a[index][slot, 0, :rank] = torch.randn(rank, K, generator=generator)
            b[index][slot, 0, :, :rank] = torch.randn(rows, rank, generator=generator)
    weight = torch.randn(sum(widths), K, generator=generator)
    graph_columns = MAX_RANK * len(widths)
    w_full = torch.zeros(sum(widths), K + graph_columns + len(widths) * budget)
    w_full[:, :K] = weight
    starts = [sum(widths[:i]) for i in range(len(widths))]
    fold = lora_fold.LayerFold(
        f"layer{seed}",
        w_full,
        torch.zeros(graph_columns, K),
        K,
        MAX_RANK,
        tuple(zip(starts, widths, strict=True)),
        K + graph_columns,
        torch.zeros(len(widths) * budget, K),
    )
    layer = SimpleNamespace(lora_a_stacked=tuple(a), lora_b_stacked=tuple(b), weight=weight, widths=widths)
    setattr(layer, lora_fold.LAYER_ATTR, fold)
    return layer


def model(ranks: dict[int, int], budget: int = 64) -> tuple[lora_fold.FoldController, list[SimpleNamespace]]:
    controller = lora_fold.FoldController(max_tokens=16, multi=lora_fold_multi.MultiFold(budget))
    layers = [lora_layer(QKV, ranks, budget, 1), lora_layer(GATE_UP, ranks, budget, 2)]
    for layer in layers:
        controller.attach(layer)
        layer.punica_wrapper = SimpleNamespace(**{lora_fold.CONTROLLER_ATTR: controller})
        for slot, rank in ranks.items():  # as lora_fold's wrapper of vLLM's set_lora marks them
            controller.refresh(layer, slot, rank)
    return controller, layers


def reference(layer: SimpleNamespace, x: torch.Tensor, token_slots: list[int]) -> torch.Tensor:
    """vLLM's result: the base GEMM, then each row's own adapter's (x·Aᵀ)·Bᵀ per slice (none for slot -1)."""
    out = x @ layer.weight.t()
    for row, slot in enumerate(token_slots):
        if slot < 0:
            continue
        start = 0
        for a, b, rows in zip(layer.lora_a_stacked, layer.lora_b_stacked, layer.widths, strict=True):
            out[row, start : start + rows] += (x[row] @ a[slot, 0].t()) @ b[slot, 0].t()
            start += rows
    return out


def run(controller: lora_fold.FoldController, layer: SimpleNamespace, x: torch.Tensor) -> torch.Tensor | None:
    """What the fold's op computes for the layer this step (None: vLLM's path)."""
    out, _ = lora_fold.apply_fold(controller, getattr(layer, lora_fold.LAYER_ATTR), x, None)
    return out


LORA_IDS: list[int | None] = [11, 12, 13, 14]  # vLLM's lora_index_to_id: slot -> adapter id


def set_lora(self: SimpleNamespace, index: int, lora_a: list[torch.Tensor], lora_b: list[torch.Tensor] | None) -> None:
    """What vLLM's set_lora does to the stacked weights (B left as it was where none is given)."""
    for i, (a, b) in enumerate(zip(self.lora_a_stacked, self.lora_b_stacked, strict=True)):
        a[index].zero_()
        a[index, 0, : lora_a[i].shape[0]] = lora_a[i]
        if lora_b is not None:
            b[index].zero_()
            b[index, 0, :, : lora_b[i].shape[1]] = lora_b[i]


def reset_lora(self: SimpleNamespace, index: int) -> None:
    for stacked in (*self.lora_a_stacked, *self.lora_b_stacked):
        stacked[index].zero_()


def test_each_row_gets_its_own_adapter_and_base_model_rows_none() -> None:
    controller, layers = model({0: 4, 1: 2, 3: 3})
    token_slots = [0, 1, -1, 3, 1, 0, -1, 3, 3]
    controller.prepare((11, 12, 0, 14), LORA_IDS, torch.tensor(token_slots))
    assert not controller.active and controller.multi is not None and controller.multi.step_slots == (0, 1, 3)
    x = torch.randn(len(token_slots), K)
    for layer in layers:
        torch.testing.assert_close(run(controller, layer, x), reference(layer, x, token_slots), rtol=1e-5, atol=1e-4)
    assert controller.multi.plan == {0: (0, 4), 1: (4, 2), 3: (6, 3)}  # each slot as wide as its rank, in order
    assert controller.multi.masks[3].shape == (len(token_slots), 3 * 9)  # the step's columns only


def test_stale_columns_and_buffer_contents_do_not_leak_in() -> None:
    controller, layers = model({0: 4, 2: 4})
    token_slots = [2, 0, 2]
    controller.prepare((11, 13), LORA_IDS, torch.tensor(token_slots))
    x = torch.randn(3, K)
    for layer in layers:
        fold = getattr(layer, lora_fold.LAYER_ATTR)
        controller.buffer_for(fold).fill_(float("nan"))
        fold.w_full[:, fold.input_size : fold.multi_start] = 1e3  # the one-adapter fold's columns: another slot
        torch.testing.assert_close(run(controller, layer, x), reference(layer, x, token_slots), rtol=1e-5, atol=1e-4)
        assert torch.equal(fold.w_full[:, :K], layer.weight)


def test_rows_past_the_steps_tokens_get_no_adapter() -> None:
    controller, layers = model({0: 4, 1: 4})
    controller.prepare((11, 12), LORA_IDS, torch.tensor([0, 1]))
    x = torch.randn(4, K)  # two padding rows
    torch.testing.assert_close(run(controller, layers[1], x), reference(layers[1], x, [0, 1, -1, -1]))


@pytest.mark.parametrize(("prompt_mapping", "why"), [((11, 19), "an adapter in no slot"), ((0,), "base")])
def test_other_steps_take_vllms_path(prompt_mapping: tuple[int, ...], why: str) -> None:
    controller, layers = model({0: 4, 1: 4})
    controller.prepare(prompt_mapping, LORA_IDS, torch.tensor([0, 1]))
    assert run(controller, layers[0], torch.randn(2, K)) is None, why


def test_one_adapter_steps_take_the_one_adapter_fold_beside_the_region() -> None:
    """The one-adapter fold's GEMM stops where the several-adapter region starts: whatever that region holds."""
    controller, layers = model({0: 4, 1: 4, 2: 3})
    controller.prepare((11, 12, 13), LORA_IDS, torch.tensor([0, 1, 2]))
    run(controller, layers[0], torch.randn(3, K))  # the region now holds all three slots
    token_slots = [1, -1, 1]
    controller.prepare((12, 0), LORA_IDS, torch.tensor(token_slots))
    assert controller.active and controller.slot == 1
    x = torch.randn(3, K)
    for layer in layers:
        out, message = lora_fold.apply_fold(controller, getattr(layer, lora_fold.LAYER_ATTR), x, None)
        assert message == lora_fold.FIRST_FOLD_MESSAGE
        torch.testing.assert_close(out, reference(layer, x, token_slots), rtol=1e-5, atol=1e-4)


def test_slots_past_the_budget_keep_vllms_kernels() -> None:
    controller, layers = model({0: 4, 1: 4, 2: 4}, budget=10)
    x = torch.randn(2, K)
    controller.prepare((11, 12), LORA_IDS, torch.tensor([0, 1]))
    assert run(controller, layers[0], x) is not None
    controller.prepare((11, 13), LORA_IDS, torch.tensor([0, 2]))  # slot 2 did not fit: 4 + 4 + 4 > 10
    assert run(controller, layers[0], x) is None
    assert controller.multi is not None and 2 not in controller.multi.plan


def test_a_rewritten_slot_is_read_again_and_the_slots_after_it_move() -> None:
    controller, layers = model({0: 4, 1: 4, 2: 4})
    x = torch.randn(3, K)
    token_slots = [0, 1, 2]
    controller.prepare((11, 12, 13), LORA_IDS, torch.tensor(token_slots))
    run(controller, layers[0], x)
    assert controller.multi is not None and controller.multi.plan[2] == (8, 4)

    for layer in layers:  # a rank-2 adapter replaces slot 0's
        new_a = [torch.randn(2, K) for _ in layer.widths]
        lora_fold._refreshing(set_lora)(layer, 0, new_a, [torch.randn(rows, 2) for rows in layer.widths])
    controller.prepare((11, 12, 13), LORA_IDS, torch.tensor(token_slots))
    for layer in layers:
        torch.testing.assert_close(run(controller, layer, x), reference(layer, x, token_slots), rtol=1e-5, atol=1e-4)
    assert controller.multi.plan == {0: (0, 2), 1: (2, 4), 2: (6, 4)}


def test_a_slot_vllm_empties_gives_up_its_columns() -> None:
    controller, layers = model({0: 4, 1: 4, 2: 4})
    for layer in layers:
        lora_fold._refreshing(reset_lora)(layer, 1)
    token_slots = [2, 0]
    controller.prepare((11, 13), LORA_IDS, torch.tensor(token_slots))
    x = torch.randn(2, K)
    torch.testing.assert_close(run(controller, layers[1], x), reference(layers[1], x, token_slots))
    assert controller.multi is not None and controller.multi.plan == {0: (0, 4), 2: (4, 4)}


def test_only_the_steps_slots_are_copied_and_a_rewrite_is_copied_once() -> None:
    """Adapters that swap through slots between two folded steps cost no copies; a slot is copied when a step
    that folds it comes, once."""
    controller, layers = model({0: 4, 1: 4, 2: 4, 3: 4})
    assert controller.multi is not None
    controller.prepare((11, 12), LORA_IDS, torch.tensor([0, 1]))
    run(controller, layers[0], torch.randn(2, K))
    assert controller.multi.copies == 2 and controller.multi.stale == {2, 3}
    for _ in range(3):  # slot 2 rewritten three times (no step folds it meanwhile)
        for layer in layers:
            lora_fold._refreshing(set_lora)(layer, 2, [torch.randn(4, K)] * len(layer.widths), None)
    controller.prepare((11, 13), LORA_IDS, torch.tensor([2, 0]))
    x = torch.randn(2, K)
    for layer in layers:
        torch.testing.assert_close(run(controller, layer, x), reference(layer, x, [2, 0]), rtol=1e-5, atol=1e-4)
    assert controller.multi.copies == 3  # slot 2 once; slot 0 was up to date


def test_the_rank_written_comes_from_the_tensors_vllm_passes() -> None:
    assert lora_fold.written_rank("set_lora", (torch.zeros(8, K), torch.zeros(30, 8)), {}) == 8
    assert lora_fold.written_rank("set_lora", ([torch.zeros(8, K), None, torch.zeros(16, K)], []), {}) == 16
    assert lora_fold.written_rank("set_lora", (), {"lora_a": [torch.zeros(4, K)]}) == 4
    assert lora_fold.written_rank("reset_lora", (), {}) == 0
    assert lora_fold.written_rank("set_lora", (), {}) is None  # unknown: the slot's full rank is assumed


def test_the_plan_skips_what_does_not_fit_and_keeps_slot_order() -> None:
    assert lora_fold_multi.plan_columns({3: 8, 0: 16, 1: 0, 2: 8}, 24) == {0: (0, 16), 2: (16, 8)}
    assert lora_fold_multi.plan_columns({0: 8}, 0) == {}


def test_the_benchmarks_fold_case_computes_what_it_times() -> None:
    """bench/lora_fold_multi.py times the fold on its own weights and mask: they must be a real several-adapter
    step (its reference is per adapter, on each adapter's rows), or the benchmark would time the wrong work."""
    bench = load_bench_module("lora_fold_multi.py")
    case = bench.FoldGemm((40, 8, 8), 32, 24, 3, 4, 1, "multi", "cpu")
    assert case.relative_error() < 2e-2  # bf16 GEMMs against an fp32 reference
    case.a[0][:4] += 1.0  # the first adapter's first slice: a wrong A must show
    assert case.launch(0).float().sub(bench.FoldGemm((40, 8, 8), 32, 24, 3, 4, 1, "multi", "cpu").launch(0)).any()
