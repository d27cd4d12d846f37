"""Put the base model's entry last in vLLM's per-step LoRA tables, so CUDA graphs sized by the adapter count
cover every adapter of the step.

vLLM prepares, for each step, tables indexed by the LoRA kernels' adapter axis (``LoRAKernelMeta``:
``active_lora_ids``, ``num_tokens_per_lora``, ``lora_token_start_loc``), from ``torch.unique`` over the tokens'
slots. Tokens of base-model requests have slot -1, which sorts first: a step with base-model requests and
adapters A and B has the entries [-1, A, B]; the kernels launch one program column per entry and skip -1.

With ``specialize_active_lora`` (on in our replica: one CUDA graph per power-of-two count of active adapters),
vLLM 0.26 picks the graph by the number of adapters in the step, not counting base-model requests
(``len(input_batch.lora_id_to_lora_request)``), and every graph was captured with that many entries on the
adapter axis. A step with base-model requests and one adapter replays the graph of one entry: the kernels see
only [-1] and the adapter's tokens get no LoRA at all; with two adapters, the graph of two entries sees [-1, A]
and B's tokens get none. Wrong output, no error, in every decode step that mixes base-model requests with 1, 2,
4, 8, ... adapters (eager steps size their grid from the tables and are right).

With the base model's entry moved last ([A, B, -1]) the first n entries are the step's n adapters, which is what
a graph captured for n or more entries reads. Only table rows move: token ``lora_token_start_loc[i]`` of the
token order vLLM sorted still starts entry i's tokens, and the -1 entry's programs still exit at once, so eager
launches, the chunk grid (lora_grid.py) and steps without base-model tokens compute what they did before.

Installed in vLLM's processes on CUDA by the plugin (vllm_plugin.py). The reordering runs on the GPU with no host
synchronisation, as one Triton kernel (a few torch ops would add their launch time to every decode step).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

PATCHED_FLAG = "_lorafleet_base_model_last"
TABLES = ("active_lora_ids", "num_tokens_per_lora", "lora_token_start_loc")


def put_base_model_last(meta: Any) -> None:
    """Rotate ``meta``'s adapter-axis tables one place left when the first entry is the base model's (-1), in
    place, with torch ops (any device; no host synchronisation)."""
    import torch

    ids = meta.active_lora_ids
    entries = ids.numel()
    shift = (ids[:1] < 0).long()
    order = (torch.arange(entries, device=ids.device) + shift) % entries
    for name in TABLES:
        table = getattr(meta, name)[:entries]  # lora_token_start_loc has one more entry: its end, never read
        table.copy_(table[order])


@functools.cache
def rotate_kernel() -> Any:
    """``put_base_model_last`` as one Triton program."""
    import triton
    import triton.language as tl

    @triton.jit
    def _base_model_last_kernel(ids_ptr, counts_ptr, starts_ptr, entries, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
        position = tl.arange(0, BLOCK)
        inside = position < entries
        shift = (tl.load(ids_ptr) < 0).to(tl.int32)
        source = (position + shift) % entries
        ids = tl.load(ids_ptr + source, mask=inside)
        counts = tl.load(counts_ptr + source, mask=inside)
        starts = tl.load(starts_ptr + source, mask=inside)
        tl.debug_barrier()  # every thread has read its source before any overwrites one
        tl.store(ids_ptr + position, ids, mask=inside)
        tl.store(counts_ptr + position, counts, mask=inside)
        tl.store(starts_ptr + position, starts, mask=inside)

    return _base_model_last_kernel


def put_base_model_last_with_triton(meta: Any) -> None:
    entries = meta.active_lora_ids.numel()
    rotate_kernel()[(1,)](
        meta.active_lora_ids,
        meta.num_tokens_per_lora,
        meta.lora_token_start_loc,
        entries,
        BLOCK=1 << (entries - 1).bit_length(),
    )


def install() -> bool:
    """Reorder the tables after every ``LoRAKernelMeta.prepare_tensors`` (once); False where this vLLM has no
    such metadata."""
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    if getattr(LoRAKernelMeta, PATCHED_FLAG, False):
        return True
    if not set(getattr(LoRAKernelMeta, "__dataclass_fields__", {})) >= {*TABLES, "no_lora_flag_cpu"}:
        log.info("lorafleet: vLLM's LoRAKernelMeta is not the expected one; its tables are left in their order")
        return False
    prepare = LoRAKernelMeta.prepare_tensors

    @functools.wraps(prepare)
    def prepare_base_model_last(self: Any, *args: Any, **kwargs: Any) -> None:
        prepare(self, *args, **kwargs)
        if bool(self.no_lora_flag_cpu[0]):  # a CPU tensor: no kernel will read the tables
            return
        if self.active_lora_ids.is_cuda:
            put_base_model_last_with_triton(self)
        else:
            put_base_model_last(self)

    LoRAKernelMeta.prepare_tensors = prepare_base_model_last  # type: ignore[method-assign]
    setattr(LoRAKernelMeta, PATCHED_FLAG, True)
    return True
