"""Several adapters folded into the base GEMM for qkv and gate_up, in the steps that run without a CUDA graph.

lora_fold.py folds one adapter: ``[x | m·x·Aᵀ] · [W | B]ᵀ``. A step shared by n adapters folds the same way
with each loaded slot's B in its own columns of the weights and a 0/1 mask that keeps, in each row, only the
columns of that row's own adapter:

    [x | (x·A_allᵀ) ⊙ M] · [W | B_1 … B_n]ᵀ = x·Wᵀ + (x·A_tᵀ)·B_tᵀ for every row t (0 for base-model rows)

The output is still written once, by cuBLAS. What the step pays instead is K: slices × (the loaded slots' ranks)
more columns, every row multiplying the other adapters' zeros. At 32 rank-8 adapters that is 512 more columns on
gate_up's K = 3,584 (+14% of its FLOPs), against vLLM's shrink and expand that read and write the whole output
again (docs/benchmarks.md, "Several adapters folded"). So the region is bounded by a rank budget, and slots past
it keep vLLM's kernels.

Why only steps without a CUDA graph (prefill chunks larger than the largest captured size): the width of the
folded GEMM follows the step's adapters, and a graph replays the width it was captured with. Decode steps keep
what their graph holds (the one-adapter fold, or vLLM's kernels over per-adapter chunks, lora_grid.py).

Slots get columns in slot order, each as wide as its adapter's rank (so a rank-8 adapter in a rank-16 slot costs 8
columns per slice). vLLM writes a slot with ``set_lora``; lora_fold's wrapper marks it with the rank of what was
written (from the tensors' shapes, no read from the device), and the next step that folds that slot copies it
into every folded layer first (a few launches per slice for all such slots). Slots that come and go between those
steps (adapters swapping through the slots, served by CUDA-graph decode steps) are never copied. A step uses the
columns up to its last slot's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ENV = "LORAFLEET_LORA_FOLD_RANK_BUDGET"
NO_SLOT = -2  # a column no slot holds (vLLM's base-model tokens are -1): no row's mask keeps it


def multi_folded_linear(
    x: Any, bias: Any, w_full: Any, a_multi: Any, mask: Any, buffer: Any, input_size: int, start: int
) -> Any:
    """``x·Wᵀ + ((x·A_allᵀ) ⊙ mask)·B_allᵀ (+ bias)`` as one GEMM over ``w_full[:, :start + columns]``.

    ``w_full`` holds ``W`` in its first ``input_size`` columns and the slots' B from column ``start`` on (the
    columns between are the one-adapter fold's, zero in the input here); ``a_multi`` holds the slots' A rows in
    the same order; ``mask`` is ``(rows, columns)``."""
    import torch

    rows, columns = x.shape[0], mask.shape[1]
    width = start + columns
    if bias is not None and bias.dtype != w_full.dtype:
        bias = bias.to(w_full.dtype)
    wide = buffer[:rows, :width]
    wide[:, :input_size].copy_(x)
    if start > input_size:
        wide[:, input_size:start].zero_()
    torch.mul(torch.mm(x, a_multi[:columns].t()), mask, out=wide[:, start:])
    return torch.nn.functional.linear(wide, w_full[:, :width], bias)


def plan_columns(ranks: dict[int, int], budget: int) -> dict[int, tuple[int, int]]:
    """Slot -> (offset, rank) in rank units, slots in order, each as wide as its rank, up to ``budget`` in all; a
    slot that does not fit gets none (its steps keep vLLM's kernels)."""
    plan, used = {}, 0
    for slot in sorted(ranks):
        rank = ranks[slot]
        if 0 < rank <= budget - used:
            plan[slot] = (used, rank)
            used += rank
    return plan


def load_multi_slots(fold: Any, layer: Any, placements: list[tuple[int, int]], rank: int) -> None:
    """Copy the slots' first ``rank`` columns of B (rows of A) into the layer's region, each at its offset (rank
    units; a projection with n slices gives each slot n × rank columns, slice after slice, block-diagonal: slice
    i's columns are zero outside slice i's rows). A few launches per slice for all the slots together."""
    import torch

    n, device = len(fold.slices), fold.w_full.device
    slots = [slot for slot, _ in placements]
    first_columns = torch.tensor([n * offset for _, offset in placements], device=device).unsqueeze(1)
    within = torch.arange(rank, device=device).unsqueeze(0)
    block = (first_columns + torch.arange(n * rank, device=device).unsqueeze(0)).reshape(-1)
    fold.w_full.index_fill_(1, fold.multi_start + block, 0)  # a moved slot's old B may lie in other slices' rows
    for index, (first_row, rows) in enumerate(fold.slices):
        columns = (first_columns + index * rank + within).reshape(-1)
        b = layer.lora_b_stacked[index][slots, 0, :, :rank]  # (slots, rows, rank)
        fold.w_full[first_row : first_row + rows].index_copy_(
            1, fold.multi_start + columns, b.permute(1, 0, 2).reshape(rows, -1)
        )
        a = layer.lora_a_stacked[index][slots, 0, :rank]  # (slots, rank, inputs)
        fold.a_multi.index_copy_(0, columns, a.reshape(-1, a.shape[-1]))


@dataclass
class MultiFold:
    """The several-adapter region of one model's folded layers: which slot has which columns, which slots' columns
    are out of date, and this step's adapters and masks."""

    budget: int  # rank units: a projection with n slices has n × budget columns for the slots
    layers: list[Any] = field(default_factory=list)  # the vLLM LoRA layers (their fold in lora_fold.LAYER_ATTR)
    plan: dict[int, tuple[int, int]] = field(default_factory=dict)
    layer_ranks: dict[int, dict[str, int]] = field(default_factory=dict)  # slot -> folded layer -> rank written
    replan: bool = False  # a slot's rank changed since the plan
    stale: set[int] = field(default_factory=set)  # slots whose columns do not hold their weights
    column_slots: dict[int, Any] = field(default_factory=dict)  # slices -> (slices × budget,) slot per column
    step_slots: tuple[int, ...] = ()  # this step's adapter slots (two or more), or none
    token_slots: Any = None
    step_end: int | None = None  # rank units up to the step's last slot's end; None: not looked at yet
    masks: dict[int, Any] = field(default_factory=dict)
    copies: int = 0  # slots copied into the region, for the tests' and benchmarks' eyes

    def mark(self, slot: int, layer_name: str, rank: int) -> None:
        """vLLM wrote an adapter of ``rank`` (0: emptied) into ``slot`` of one folded layer."""
        ranks = self.layer_ranks.setdefault(slot, {})
        before = max(ranks.values(), default=0)
        ranks[layer_name] = rank
        self.replan |= max(ranks.values()) != before
        self.stale.add(slot)

    def begin_step(self, slots: tuple[int, ...], token_slots: Any) -> None:
        self.step_slots, self.token_slots, self.step_end = slots, token_slots, None
        self.masks.clear()

    def for_step(self, fold: Any, rows: int) -> Any:
        """The ``(rows, columns)`` mask of this step for a projection like ``fold``, or None: vLLM's path."""
        if not self.step_slots:
            return None
        if self.step_end is None:
            self.step_end = self._step_end()
        if not self.step_end:
            return None
        n = len(fold.slices)
        mask = self.masks.get(n)
        if mask is None or mask.shape[0] != rows:
            mask = self.masks[n] = self._mask(n, rows, fold.w_full.dtype)
        return mask

    def _step_end(self) -> int:
        """Plan again if a rank changed, copy the step's slots whose columns are out of date (only those: under
        churn most slots come and go in CUDA-graph steps that never read the region), and return the step's end."""
        if self.replan:
            self._plan()
        if any(slot not in self.plan for slot in self.step_slots):
            return 0
        stale = [slot for slot in self.step_slots if slot in self.stale]
        if stale:
            self._copy(stale)
        return max(self.plan[slot][0] + self.plan[slot][1] for slot in self.step_slots)

    def _mask(self, n: int, rows: int, dtype: Any) -> Any:
        import torch

        tokens = self.token_slots[:rows]
        if tokens.shape[0] < rows:  # rows past the step's tokens (padding) belong to no adapter
            tokens = torch.nn.functional.pad(tokens, (0, rows - tokens.shape[0]), value=-1)
        assert self.step_end is not None
        columns = self.column_slots[n][: n * self.step_end]
        return tokens.unsqueeze(1).eq(columns.unsqueeze(0)).to(dtype)

    def _plan(self) -> None:
        import torch

        from lorafleet_inference.lora_fold import LAYER_ATTR

        self.replan = False
        ranks = {slot: max(per_layer.values(), default=0) for slot, per_layer in self.layer_ranks.items()}
        plan = plan_columns(ranks, self.budget)
        self.stale |= {slot for slot, place in plan.items() if self.plan.get(slot) != place}
        if plan == self.plan and self.column_slots:
            return
        self.plan = plan
        device = getattr(self.layers[0], LAYER_ATTR).w_full.device
        for n in {len(getattr(layer, LAYER_ATTR).slices) for layer in self.layers}:
            columns = torch.full((n * self.budget,), NO_SLOT, dtype=torch.long, device=device)
            for slot, (offset, rank) in plan.items():
                columns[n * offset : n * (offset + rank)] = slot
            self.column_slots[n] = columns

    def _copy(self, slots: list[int]) -> None:
        from lorafleet_inference.lora_fold import LAYER_ATTR

        by_rank: dict[int, list[tuple[int, int]]] = {}
        for slot in slots:
            offset, rank = self.plan[slot]
            by_rank.setdefault(rank, []).append((slot, offset))
        for rank, placements in by_rank.items():
            for layer in self.layers:
                load_multi_slots(getattr(layer, LAYER_ATTR), layer, placements, rank)
        self.stale -= set(slots)
        self.copies += len(slots)
