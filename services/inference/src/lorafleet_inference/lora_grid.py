"""Launch vLLM's LoRA kernels over the tokens each adapter has in a step, not over the whole step.

vLLM's Triton shrink and expand kernels (``vllm/lora/ops/triton_ops``) launch a grid of (m-blocks of the whole
step x n-blocks, slices, active adapters). Every active adapter gets programs for all M tokens of the step, and
those past the adapter's own tokens exit at once. In a 16,384-token prefill step shared by 32 adapters, 31 of
every 32 programs do nothing, and launching and retiring them is most of what 32 adapters cost over one
(docs/benchmarks.md, "LoRA kernel grid").

The kernels read M for one thing only: the number of m-blocks, with which they decode their program id. So when
the step's largest per-adapter token count is known, that count rounded up to the block size stands in for M, in
the grid and in the kernel's argument, and each adapter gets just the m-blocks it can use. The rounded value is
a multiple of 16, so Triton's divisibility specialization compiles no more than one extra variant per
configuration. The count comes from the kernel metadata vLLM prepares once per step
(``LoRAKernelMeta.prepare_tensors``, which already waits for the GPU in ``torch.unique``): one more small
device-to-host read per step.

CUDA graphs: a captured graph keeps the grid it was captured with, for whatever tokens a later replay has, so
while a graph is being captured the launch stays vLLM's own (replays run no Python). In practice the tight grid
serves the steps that run eagerly: prefill chunks larger than the largest captured size.

Installed in vLLM's processes by the plugin (vllm_plugin.py) when the replica asks for it
(``LORAFLEET_INFERENCE_LORA_TIGHT_GRID``, which the replica exports for its engine); a vLLM whose kernels do not
have the expected arguments is left alone.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

ENV = "LORAFLEET_LORA_TIGHT_GRID"  # "1" in the replica's engine processes: install (read by vllm_plugin.py)
PATCHED_FLAG = "_lorafleet_tight_grid"
KERNELS = (
    ("vllm.lora.ops.triton_ops.lora_shrink_op", "_lora_shrink_kernel"),
    ("vllm.lora.ops.triton_ops.lora_expand_op", "_lora_expand_kernel"),
)
NEEDED_ARGUMENTS = frozenset({"M", "BLOCK_M", "num_tokens_per_lora"})


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tight_launch(
    arg_names: Sequence[str], grid: tuple[int, ...], args: tuple[Any, ...], kwargs: Mapping[str, Any], largest: int
) -> tuple[tuple[int, ...], tuple[Any, ...], dict[str, Any]]:
    """The grid and arguments for a launch whose adapters have at most ``largest`` tokens each.

    The grid's first axis is a product with vLLM's m-block count, cdiv(M, BLOCK_M), as a factor; that factor
    becomes cdiv(largest, BLOCK_M) and M becomes largest rounded up to BLOCK_M. A launch that would not shrink,
    or whose grid is not of that form, comes back unchanged."""
    bound = dict(zip(arg_names, args, strict=False)) | dict(kwargs)
    m, block_m = bound["M"], bound["BLOCK_M"]
    m_blocks, tight_blocks = cdiv(m, block_m), max(1, cdiv(largest, block_m))
    if tight_blocks >= m_blocks or grid[0] % m_blocks:
        return grid, args, dict(kwargs)
    tight_m = tight_blocks * block_m
    new_grid = (grid[0] // m_blocks * tight_blocks, *grid[1:])
    position = list(arg_names).index("M")
    if position < len(args):
        return new_grid, (*args[:position], tight_m, *args[position + 1 :]), dict(kwargs)
    return new_grid, args, dict(kwargs) | {"M": tight_m}


def capturing_cuda_graph() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class TightGrid:
    """The per-step largest adapter token counts, and the kernel launchers that use them."""

    def __init__(self) -> None:
        # keyed by the address of the metadata's num_tokens_per_lora tensor, which the kernels receive
        self.largest: dict[int, int] = {}

    def record(self, meta: Any) -> None:
        """After vLLM prepared ``meta`` for a step: remember its largest token count of one adapter."""
        import torch

        key = meta.num_tokens_per_lora.data_ptr()
        if bool(meta.no_lora_flag_cpu[0]):
            self.largest.pop(key, None)
            return
        counts = torch.where(meta.active_lora_ids >= 0, meta.num_tokens_per_lora, 0)
        self.largest[key] = int(counts.max())

    def launcher(self, kernel: Any) -> TightLauncher:
        return TightLauncher(kernel, self)


class TightLauncher:
    """Stands in for a Triton kernel in vLLM's op module: ``kernel[grid](...)`` with the tight grid."""

    def __init__(self, kernel: Any, grid: TightGrid) -> None:
        self.kernel = kernel
        self.tight = grid
        self.arg_names: list[str] = list(kernel.arg_names)

    def __getitem__(self, grid: Any) -> Any:
        return functools.partial(self._launch, grid)

    def __getattr__(self, name: str) -> Any:  # anything else vLLM might read passes through
        return getattr(self.kernel, name)

    def _launch(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(grid, tuple) and not capturing_cuda_graph():
            bound = dict(zip(self.arg_names, args, strict=False)) | kwargs
            largest = self.tight.largest.get(bound["num_tokens_per_lora"].data_ptr())
            if largest is not None:
                grid, args, kwargs = tight_launch(self.arg_names, grid, args, kwargs, largest)
        return self.kernel[grid](*args, **kwargs)


def install(tight: TightGrid | None = None) -> bool:
    """Put the tight launchers into vLLM's LoRA op modules (once); False where this vLLM does not fit."""
    import importlib

    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    if getattr(LoRAKernelMeta, PATCHED_FLAG, False):
        return True
    modules = [(importlib.import_module(module), name) for module, name in KERNELS]
    for module, name in modules:
        arg_names = getattr(getattr(module, name, None), "arg_names", None)
        if arg_names is None or not set(arg_names) >= NEEDED_ARGUMENTS:
            log.info("lorafleet: vLLM's %s is not the expected Triton kernel; LoRA grid left as is", name)
            return False
    tight = tight or TightGrid()
    prepare = LoRAKernelMeta.prepare_tensors

    @functools.wraps(prepare)
    def prepare_and_record(self: Any, *args: Any, **kwargs: Any) -> None:
        prepare(self, *args, **kwargs)
        tight.record(self)

    LoRAKernelMeta.prepare_tensors = prepare_and_record  # type: ignore[method-assign]
    for module, name in modules:
        setattr(module, name, tight.launcher(getattr(module, name)))
    setattr(LoRAKernelMeta, PATCHED_FLAG, True)
    log.info("lorafleet: vLLM's LoRA kernels launch over each adapter's tokens (lora_grid.py)")
    return True
