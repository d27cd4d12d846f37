"""One adapter folded into the base GEMM (lorafleet_inference.lora_fold): the fold's arithmetic, and the
per-step controller that decides the path and keeps the folded weights and row mask right. The whole path through
vLLM's engine (CPU build) is in test_bench.py (bench/lora_mixed_check.py, variant ours-fold); on a GPU, with CUDA
graphs, in docs/benchmarks.md."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorafleet_inference import lora_fold
from lorafleet_inference.engine import use_lora_fold
from lorafleet_inference.settings import InferenceSettings

K, RANK, SLICES, SLOTS = 24, 4, (10, 6, 6), 3  # a qkv-like projection: three slices of unequal width


def stacked_layer(seed: int = 0) -> SimpleNamespace:
    """The slot-stacked LoRA weights of a vLLM merged-column LoRA layer: A (slots, 1, r, K), B (slots, 1, rows, r)."""
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        lora_a_stacked=tuple(torch.randn(SLOTS, 1, RANK, K, generator=generator) for _ in SLICES),
        lora_b_stacked=tuple(torch.randn(SLOTS, 1, rows, RANK, generator=generator) for rows in SLICES),
    )


def fold_for(weight: torch.Tensor) -> lora_fold.LayerFold:
    rows = weight.shape[0]
    extra = RANK * len(SLICES)
    w_full = torch.zeros(rows, K + extra)
    w_full[:, :K] = weight
    starts = [sum(SLICES[:i]) for i in range(len(SLICES))]
    return lora_fold.LayerFold("layer", w_full, torch.zeros(extra, K), K, RANK, tuple(zip(starts, SLICES, strict=True)))


def reference(
    x: torch.Tensor, weight: torch.Tensor, layer: SimpleNamespace, slot: int, mask: torch.Tensor
) -> torch.Tensor:
    """What vLLM computes: the base GEMM, then each slice's (x·Aᵀ)·Bᵀ added to its columns for the masked rows."""
    out = x @ weight.t()
    start = 0
    for a, b, rows in zip(layer.lora_a_stacked, layer.lora_b_stacked, SLICES, strict=True):
        out[:, start : start + rows] += mask * ((x @ a[slot, 0].t()) @ b[slot, 0].t())
        start += rows
    return out


def test_the_folded_gemm_equals_the_base_gemm_plus_each_slices_lora_on_the_masked_rows() -> None:
    x, weight, layer = torch.randn(7, K), torch.randn(sum(SLICES), K), stacked_layer()
    fold = fold_for(weight)
    fold.load_slot(layer, 2)
    mask = torch.tensor([[1.0], [0.0], [1.0], [1.0], [0.0], [1.0], [1.0]])
    buffer = torch.full((16, K + RANK * len(SLICES)), float("nan"))  # stale contents must not leak in
    bias = torch.randn(sum(SLICES))
    out = lora_fold.folded_linear(x, bias, fold.w_full, fold.a_folded, mask, buffer, K)
    torch.testing.assert_close(out, reference(x, weight, layer, 2, mask) + bias, rtol=1e-5, atol=1e-4)
    assert torch.equal(fold.w_full[:, :K], weight)  # the base weights are untouched
    unmasked = lora_fold.folded_linear(x, None, fold.w_full, fold.a_folded, torch.zeros(7, 1), buffer, K)
    torch.testing.assert_close(unmasked, x @ weight.t(), rtol=1e-5, atol=1e-4)


def controller_with_layer(seed: int = 0) -> tuple[lora_fold.FoldController, SimpleNamespace, torch.Tensor]:
    weight = torch.randn(sum(SLICES), K)
    layer = stacked_layer(seed)
    setattr(layer, lora_fold.LAYER_ATTR, fold_for(weight))
    controller = lora_fold.FoldController(max_tokens=8)
    controller.attach(layer)
    return controller, layer, weight


def folded_output(controller: lora_fold.FoldController, layer: SimpleNamespace, x: torch.Tensor) -> torch.Tensor:
    fold = getattr(layer, lora_fold.LAYER_ATTR)
    return lora_fold.folded_linear(
        x, None, fold.w_full, fold.a_folded, controller.mask, controller.buffer_for(fold), fold.input_size
    )


def test_one_adapter_folds_its_slot_and_base_model_rows_are_masked_out() -> None:
    controller, layer, weight = controller_with_layer()
    slots: list[int | None] = [None, 7, 5]  # lora id of each slot, as vLLM's lora_index_to_id
    x = torch.randn(4, K)

    controller.prepare((5, 5), slots, torch.tensor([2, 2, 2, 2]))
    assert controller.active and controller.slot == 2 and controller.mask_state == "ones"
    torch.testing.assert_close(folded_output(controller, layer, x), reference(x, weight, layer, 2, torch.ones(4, 1)))

    controller.prepare((0, 5, 0), slots, torch.tensor([-1, 2, 2, -1]))  # base-model requests share the step
    mask = torch.tensor([[0.0], [1.0], [1.0], [0.0]])
    assert controller.active and controller.mask_state == "rows"
    torch.testing.assert_close(folded_output(controller, layer, x), reference(x, weight, layer, 2, mask))

    controller.prepare((7,), slots, torch.tensor([1, 1, 1, 1]))  # another adapter: its slot is folded instead
    assert controller.active and controller.slot == 1 and controller.mask_state == "ones"
    torch.testing.assert_close(folded_output(controller, layer, x), reference(x, weight, layer, 1, torch.ones(4, 1)))


@pytest.mark.parametrize(
    ("prompt_mapping", "why"),
    [((5, 7), "two adapters"), ((0, 0), "base model only"), ((9,), "an adapter in no slot")],
)
def test_other_steps_take_vllms_path_and_zero_the_mask(prompt_mapping: tuple[int, ...], why: str) -> None:
    controller, _, _ = controller_with_layer()
    controller.prepare((5,), [None, 7, 5], torch.tensor([2]))
    assert controller.active
    controller.prepare(prompt_mapping, [None, 7, 5], torch.tensor([2, 1]))
    assert not controller.active, why
    assert controller.mask_state == "zeros" and not controller.mask.any()  # a folded graph would add nothing


def test_a_slot_rewritten_by_vllm_is_folded_again_at_once() -> None:
    """vLLM reuses slots (and lora ids: its warm-up adapters have ids 1, 2, ...), and skips update_metadata when
    neither the mapping nor the slot layout changed: the folded copy must follow set_lora itself."""
    controller, layer, weight = controller_with_layer()
    x = torch.randn(3, K)
    controller.prepare((5,), [5, None, None], torch.tensor([0, 0, 0]))

    def set_lora(self: SimpleNamespace, index: int) -> None:  # what vLLM's set_lora does to the stacked weights
        for stacked in (*self.lora_a_stacked, *self.lora_b_stacked):
            stacked[index].normal_()

    layer.punica_wrapper = SimpleNamespace(**{lora_fold.CONTROLLER_ATTR: controller})
    watched = lora_fold._refreshing(set_lora)
    watched(layer, 1)  # another slot: the folded weights stay as they are
    torch.testing.assert_close(folded_output(controller, layer, x), reference(x, weight, layer, 0, torch.ones(3, 1)))
    before = folded_output(controller, layer, x)
    watched(layer, 0)  # the folded slot: copied again, with no prepare in between
    after = folded_output(controller, layer, x)
    torch.testing.assert_close(after, reference(x, weight, layer, 0, torch.ones(3, 1)))
    assert not torch.allclose(before, after)


def test_the_replica_asks_vllms_processes_for_the_fold_on_cuda_by_default() -> None:
    environ: dict[str, str] = {}
    use_lora_fold(InferenceSettings(max_loras=32, max_cpu_loras=40), environ, cuda=True)
    assert environ == {lora_fold.ENV: "1", lora_fold.MULTI_ENV: "256"}  # a rank-8 adapter in every slot
    use_lora_fold(InferenceSettings(), environ, cuda=False)
    assert environ == {lora_fold.ENV: "0", lora_fold.MULTI_ENV: "0"}
    use_lora_fold(InferenceSettings(lora_fold=True, lora_fold_rank_budget=64), environ, cuda=False)
    assert environ == {lora_fold.ENV: "1", lora_fold.MULTI_ENV: "64"}
