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

Slots get columns in slot order, each as wide as its rank (the last non-zero row of its A over the folded layers,
so a rank-8 adapter in a rank-16 slot costs 8 columns per slice). vLLM writes a slot with ``set_lora``; the slot is
then marked, and the next step that needs the region reads its rank and copies it (and any slot whose columns
moved) into every folded layer. A step uses the columns up to its last slot's.
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


def load_multi_slot(fold: Any, layer: Any, slot: int, offset: int, rank: int) -> None:
    """Copy ``slot``'s first ``rank`` columns of B (rows of A) into the layer's region at ``offset`` (rank units;
    a projection with n slices gives each slot n × rank columns, slice after slice, block-diagonal: slice i's
    columns are zero outside slice i's rows)."""
    n = len(fold.slices)
    block = slice(fold.multi_start + n * offset, fold.multi_start + n * (offset + rank))
    fold.w_full[:, block].zero_()  # each slice's B fills its own rows: the others' rows may hold a moved slot's
    for index, (first_row, rows) in enumerate(fold.slices):
        column = n * offset + index * rank
        b = layer.lora_b_stacked[index][slot, 0]
        fold.w_full[first_row : first_row + rows, fold.multi_start + column : fold.multi_start + column + rank].copy_(
            b[:, :rank]
        )
        fold.a_multi[column : column + rank].copy_(layer.lora_a_stacked[index][slot, 0][:rank])


def slot_ranks(layers: list[Any], slots: list[int]) -> dict[int, int]:
    """Each slot's rank over the folded layers: one past its A's last row that is not all zero (0: empty). One
    device read for all of them."""
    import torch

    rows = [a[slots, 0].ne(0).any(dim=2) for layer in layers for a in layer.lora_a_stacked]  # (slots, max rank)
    used = torch.stack(rows).any(dim=0)
    positions = torch.arange(1, used.shape[1] + 1, device=used.device)
    return dict(zip(slots, (used * positions).amax(dim=1).tolist(), strict=True))


@dataclass
class MultiFold:
    """The multi-adapter region of one model's folded layers: which slot has which columns, which slots vLLM
    rewrote since, and this step's adapters and masks."""

    budget: int  # rank units: a projection with n slices has n × budget columns for the slots
    layers: list[Any] = field(default_factory=list)  # the vLLM LoRA layers (their fold in lora_fold.LAYER_ATTR)
    plan: dict[int, tuple[int, int]] = field(default_factory=dict)
    ranks: dict[int, int] = field(default_factory=dict)
    dirty: set[int] = field(default_factory=set)
    column_slots: dict[int, Any] = field(default_factory=dict)  # slices -> (slices × budget,) slot per column
    step_slots: tuple[int, ...] = ()  # this step's adapter slots (two or more), or none
    token_slots: Any = None
    step_end: int | None = None  # rank units up to the step's last slot's end; None: not looked at yet
    masks: dict[int, Any] = field(default_factory=dict)
    relayouts: int = 0

    def mark(self, slot: int) -> None:
        self.dirty.add(slot)

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
        if self.dirty:
            self._relayout()
        if any(slot not in self.plan for slot in self.step_slots):
            return 0
        return max(self.plan[slot][0] + self.plan[slot][1] for slot in self.step_slots)

    def _mask(self, n: int, rows: int, dtype: Any) -> Any:
        import torch

        tokens = self.token_slots[:rows]
        if tokens.shape[0] < rows:  # rows past the step's tokens (padding) belong to no adapter
            tokens = torch.nn.functional.pad(tokens, (0, rows - tokens.shape[0]), value=-1)
        assert self.step_end is not None
        columns = self.column_slots[n][: n * self.step_end]
        return tokens.unsqueeze(1).eq(columns.unsqueeze(0)).to(dtype)

    def _relayout(self) -> None:
        """Read the rewritten slots' ranks, plan the columns again, and copy every slot that is new, rewritten or
        moved into every folded layer."""
        import torch

        from lorafleet_inference.lora_fold import LAYER_ATTR

        dirty = sorted(self.dirty)
        self.dirty.clear()
        self.ranks |= slot_ranks(self.layers, dirty)
        plan = plan_columns(self.ranks, self.budget)
        for slot, (offset, rank) in plan.items():
            if slot in dirty or self.plan.get(slot) != (offset, rank):
                for layer in self.layers:
                    load_multi_slot(getattr(layer, LAYER_ATTR), layer, slot, offset, rank)
        self.plan = plan
        self.relayouts += 1
        device = getattr(self.layers[0], LAYER_ATTR).w_full.device
        for n in {len(getattr(layer, LAYER_ATTR).slices) for layer in self.layers}:
            columns = torch.full((n * self.budget,), NO_SLOT, dtype=torch.long, device=device)
            for slot, (offset, rank) in plan.items():
                columns[n * offset : n * (offset + rank)] = slot
            self.column_slots[n] = columns
