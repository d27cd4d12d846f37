"""Launch vLLM's LoRA kernels over the token blocks each adapter has in a step, not over the whole step.

vLLM's Triton shrink and expand kernels (``vllm/lora/ops/triton_ops``) launch a grid of (m-blocks of the whole
step x n-blocks, slices, active adapters). Every active adapter gets programs for all M tokens of the step, and
those past the adapter's own tokens exit at once. In a 16,384-token prefill step shared by 32 adapters, 31 of
every 32 programs do nothing; in a CUDA-graph decode step of 256 sequences over 32 adapters (8 tokens each, one
m-block), 15 of every 16. Launching and retiring them is most of what many adapters cost over one
(docs/benchmarks.md, "LoRA kernel grid").

The kernels find their work through three small tables indexed by the grid's adapter axis: ``lora_ids[i]``,
``num_tokens_per_lora[i]`` and ``lora_token_start_loc[i]`` (a segment of the tokens sorted by adapter). So each
adapter's segment is cut into chunks of BLOCK_M tokens and every chunk becomes one entry of the adapter axis, with
the adapter's id, the chunk's token count and its start: with M = BLOCK_M the kernel sees one m-block per entry,
and every program that is launched has tokens to work on. A step of M tokens over A entries has at most
cdiv(M, BLOCK_M) + A chunks, so that is the adapter axis; entries past the last chunk have id -1 and exit at once.

The chunk tables are computed on the GPU right after vLLM prepares its own metadata for a step
(``LoRAKernelMeta.prepare_tensors``), for each block size a configuration may use, into buffers that live as long
as the metadata. That is how vLLM's own metadata works, and why this holds inside CUDA graphs: a replay reads the
same buffers, which every step refills before it. Steps whose adapter axis has one entry (one adapter, no
base-model tokens) keep vLLM's grid, which is already tight for them, and cost nothing extra.

Launches that keep vLLM's grid get M rounded up to a multiple of 16. Triton compiles a kernel variant per integer
argument's divisibility by 16, so an eager prefill step of, say, 9,001 tokens would compile one in the middle of
serving (vLLM's JIT monitor warns; the first LoRA traffic lost ~4 s on an H100). The rounding never changes the
m-block count, cdiv(M, BLOCK_M) for BLOCK_M a multiple of 16, so the programs and their work are the same.

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
TABLE_ARGUMENTS = ("lora_ids", "num_tokens_per_lora", "lora_token_start_loc")
NEEDED_ARGUMENTS = frozenset({"M", "BLOCK_M", *TABLE_ARGUMENTS})
BLOCK_MS = (16, 32, 64, 128)  # every block_m of vLLM's defaults and of our tuning space (serving/lora_kernels.py)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunk_tables(counts: Any, ids: Any, starts: Any, block_ms: Any, length: int) -> tuple[Any, Any, Any]:
    """For each block size b in ``block_ms`` (int64, shape (B, 1)): the adapter ids, token counts and starts of the
    chunks of at most b tokens that vLLM's per-adapter tables (``counts``, ``ids``, ``starts``, one entry per
    adapter axis position) cut into, in order, padded to ``length`` with id -1 and count 0. Shape (B, length).
    Torch only, no host synchronisation: it runs on the GPU between steps."""
    import torch

    entries = counts.numel()
    counts, starts = counts.long(), starts[:entries].long()
    chunks = torch.where(ids >= 0, (counts + block_ms - 1) // block_ms, 0)  # (B, entries)
    ends = chunks.cumsum(1)
    position = torch.arange(length, device=counts.device).expand(block_ms.size(0), length).contiguous()
    owner = torch.searchsorted(ends, position, right=True)  # the entry whose chunk each position is
    valid = owner < entries
    owner.clamp_(max=entries - 1)
    offset = (position - (ends - chunks).gather(1, owner)) * block_ms  # the chunk's first token in its segment
    chunk_ids = torch.where(valid, ids[owner], -1)
    chunk_counts = torch.where(valid, (counts[owner] - offset).clamp(max=block_ms), 0)
    return chunk_ids, chunk_counts, starts[owner] + offset


@functools.cache
def fill_kernel() -> Any:
    """``chunk_tables`` as one Triton kernel: one launch per step instead of some twenty torch ops (their host
    time, ~0.6 ms on an H100 host, would be added to every decode step). Program (b, j) writes positions
    [j * BLOCK_V, (j + 1) * BLOCK_V) of block size b's row."""
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_tables_kernel(  # type: ignore[no-untyped-def]
        counts_ptr,
        ids_ptr,
        starts_ptr,
        block_ms_ptr,
        out_ids_ptr,
        out_counts_ptr,
        out_starts_ptr,
        entries,
        length,
        ENTRIES: tl.constexpr,  # entries rounded up to a power of two
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        block_m = tl.load(block_ms_ptr + row)
        entry = tl.arange(0, ENTRIES)
        counts = tl.load(counts_ptr + entry, mask=entry < entries, other=0)
        ids = tl.load(ids_ptr + entry, mask=entry < entries, other=-1)
        ends = tl.cumsum(tl.where(ids >= 0, (counts + block_m - 1) // block_m, 0), 0)
        position = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        before = ends[None, :] <= position[:, None]  # the entries whose chunks all come before each position
        owner = tl.sum(before.to(tl.int32), 1)
        offset = (position - tl.max(tl.where(before, ends[None, :], 0), 1)) * block_m
        valid = owner < entries
        owner = tl.minimum(owner, entries - 1)
        chunk_ids = tl.where(valid, tl.load(ids_ptr + owner), -1)
        chunk_counts = tl.where(valid, tl.minimum(tl.load(counts_ptr + owner) - offset, block_m), 0)
        chunk_starts = tl.load(starts_ptr + owner) + offset
        inside = position < length
        tl.store(out_ids_ptr + row * length + position, chunk_ids, mask=inside)
        tl.store(out_counts_ptr + row * length + position, chunk_counts, mask=inside)
        tl.store(out_starts_ptr + row * length + position, chunk_starts, mask=inside)

    return _chunk_tables_kernel


def fill_with_triton(meta: Any, table: ChunkTable) -> None:
    _, entries = table.shape
    width, block_v = table.fill_geometry
    fill_kernel()[(len(BLOCK_MS), cdiv(table.length, block_v))](
        meta.num_tokens_per_lora,
        meta.active_lora_ids,
        meta.lora_token_start_loc,
        table.block_ms,
        table.ids,
        table.counts,
        table.starts,
        entries,
        table.length,
        ENTRIES=width,
        BLOCK_V=block_v,
    )


class ChunkTable:
    """The chunk tables of one ``LoRAKernelMeta``, in buffers that outlive the step (CUDA graphs read them)."""

    def __init__(self, meta: Any) -> None:
        import torch

        device = meta.num_tokens_per_lora.device
        self.shape = ChunkTable.shape_of(meta)
        tokens, entries = self.shape
        # rows padded to 32 entries (128 bytes): Triton specializes on a pointer's 16-byte alignment, and every
        # row (one per block size) should hit the same compiled variant
        self.length = cdiv(cdiv(tokens, min(BLOCK_MS)) + entries, 32) * 32
        self.block_ms = torch.tensor(BLOCK_MS, dtype=torch.int32, device=device)
        self.ids = torch.full((len(BLOCK_MS), self.length), -1, dtype=torch.int32, device=device)
        self.counts = torch.zeros_like(self.ids)
        self.starts = torch.zeros_like(self.ids)
        # the kernel arguments that stand for vLLM's tables, per block size (views made once: launches are hot)
        self.rows = {
            block_m: dict(zip(TABLE_ARGUMENTS, (self.ids[i], self.counts[i], self.starts[i]), strict=True))
            for i, block_m in enumerate(BLOCK_MS)
        }
        self.triton = device.type == "cuda"
        # the fill kernel's entries rounded up to a power of two, and positions per program (~8k elements each)
        width = 1 << (entries - 1).bit_length()
        self.fill_geometry = (width, max(16, min(256, 8192 // width)))

    @staticmethod
    def shape_of(meta: Any) -> tuple[int, int]:
        """What a table's size depends on: the metadata's token capacity and adapter-axis length."""
        return meta.token_indices_sorted_by_lora_ids.numel(), meta.num_tokens_per_lora.numel()

    def fill(self, meta: Any) -> None:
        if self.triton:
            fill_with_triton(meta, self)
            return
        tables = chunk_tables(
            meta.num_tokens_per_lora,
            meta.active_lora_ids,
            meta.lora_token_start_loc,
            self.block_ms.long().unsqueeze(1),
            self.length,
        )
        for buffer, table in zip((self.ids, self.counts, self.starts), tables, strict=True):
            buffer.copy_(table)

    def clear(self) -> None:
        self.ids.fill_(-1)

    def row(self, block_m: int) -> dict[str, Any] | None:
        """The kernel arguments that stand for vLLM's tables at this block size (None: no table for it)."""
        return self.rows.get(block_m)


def argument(at: Mapping[str, int], args: tuple[Any, ...], kwargs: Mapping[str, Any], name: str) -> Any:
    """A kernel argument by name, passed by position or by keyword (``at``: ``positions(kernel.arg_names)``)."""
    return args[at[name]] if at[name] < len(args) else kwargs[name]


def replace_arguments(
    at: Mapping[str, int], args: tuple[Any, ...], kwargs: Mapping[str, Any], replacements: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``args`` and ``kwargs`` with the named arguments replaced where they were passed."""
    new_args, new_kwargs = list(args), dict(kwargs)
    for name, value in replacements.items():
        if at[name] < len(args):
            new_args[at[name]] = value
        else:
            new_kwargs[name] = value
    return tuple(new_args), new_kwargs


def positions(arg_names: Sequence[str]) -> dict[str, int]:
    """Where the arguments the chunk launch reads or replaces sit in a kernel's signature."""
    return {name: list(arg_names).index(name) for name in NEEDED_ARGUMENTS}


def chunk_launch(
    at: Mapping[str, int], grid: tuple[int, ...], args: tuple[Any, ...], kwargs: Mapping[str, Any], table: ChunkTable
) -> tuple[tuple[int, ...], tuple[Any, ...], dict[str, Any]]:
    """The grid and arguments that launch over chunks instead of (adapter, m-block of the whole step) pairs.

    ``at``: ``positions(kernel.arg_names)``. The grid's first axis is a product with vLLM's m-block count,
    cdiv(M, BLOCK_M), as a factor: that factor becomes 1 (M = BLOCK_M), and the adapter axis becomes the chunk
    count bound cdiv(M, BLOCK_M) + entries. A launch with one entry on the adapter axis, a block size without a
    table, a grid not of that form, or one larger than the table (never, for metadata vLLM prepared) comes back
    unchanged."""
    block_m = argument(at, args, kwargs, "BLOCK_M")
    m_blocks = cdiv(argument(at, args, kwargs, "M"), block_m)
    tables = table.row(block_m)
    if len(grid) != 3 or grid[2] < 2 or grid[0] % m_blocks or tables is None or m_blocks + grid[2] > table.length:
        return grid, args, dict(kwargs)
    new_args, new_kwargs = replace_arguments(at, args, kwargs, {"M": block_m} | tables)
    return (grid[0] // m_blocks, grid[1], m_blocks + grid[2]), new_args, new_kwargs


class ChunkGrid:
    """The chunk tables of every metadata object vLLM uses, and the kernel launchers that read them."""

    def __init__(self) -> None:
        # keyed by the address of the metadata's num_tokens_per_lora buffer, which the kernels receive
        self.tables: dict[int, ChunkTable] = {}
        self.enabled = True  # off: vLLM's own grid, no tables filled (benchmarks compare both in one process)

    def record(self, meta: Any) -> None:
        """After vLLM prepared ``meta`` for a step: fill its chunk tables, or clear them when the step's kernels
        will not read them (no adapter at all, or a single entry on the adapter axis: vLLM's grid)."""
        if not self.enabled:
            return
        key = meta.num_tokens_per_lora.data_ptr()
        table = self.tables.get(key)
        if bool(meta.no_lora_flag_cpu[0]) or int(meta.num_active_loras_cpu[0]) < 2:
            if table is not None:
                table.clear()  # as vLLM resets its own ids: nothing stale is ever applied
            return
        if table is None or table.shape != ChunkTable.shape_of(meta):  # new metadata where a freed one was
            table = self.tables[key] = ChunkTable(meta)
        table.fill(meta)

    def launcher(self, kernel: Any) -> ChunkLauncher:
        return ChunkLauncher(kernel, self)


class ChunkLauncher:
    """Stands in for a Triton kernel in vLLM's op module: ``kernel[grid](...)`` over the chunks."""

    def __init__(self, kernel: Any, grid: ChunkGrid) -> None:
        self.kernel = kernel
        self.chunks = grid
        self.arg_names: list[str] = list(kernel.arg_names)
        self.at = positions(self.arg_names)

    def __getitem__(self, grid: Any) -> Any:
        return functools.partial(self._launch, grid)

    def __getattr__(self, name: str) -> Any:  # anything else vLLM might read passes through
        return getattr(self.kernel, name)

    def _launch(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(grid, tuple) and self.chunks.enabled):
            return self.kernel[grid](*args, **kwargs)
        chunked = False
        if len(grid) == 3 and grid[2] > 1:
            counts = argument(self.at, args, kwargs, "num_tokens_per_lora")
            table = self.chunks.tables.get(counts.data_ptr())
            if table is not None:
                new_grid, args, kwargs = chunk_launch(self.at, grid, args, kwargs, table)
                chunked, grid = new_grid != grid, new_grid
        if not chunked:  # vLLM's grid: M rounded up to 16, one compiled variant whatever the step's size
            m = argument(self.at, args, kwargs, "M")
            if m % 16:
                args, kwargs = replace_arguments(self.at, args, kwargs, {"M": cdiv(m, 16) * 16})
        return self.kernel[grid](*args, **kwargs)


def install(chunks: ChunkGrid | None = None) -> bool:
    """Put the chunk launchers into vLLM's LoRA op modules (once); False where this vLLM does not fit."""
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
    if "num_active_loras_cpu" not in getattr(LoRAKernelMeta, "__dataclass_fields__", {}):
        log.info("lorafleet: vLLM's LoRAKernelMeta has no num_active_loras_cpu; LoRA grid left as is")
        return False
    chunks = chunks or ChunkGrid()
    prepare = LoRAKernelMeta.prepare_tensors

    @functools.wraps(prepare)
    def prepare_and_record(self: Any, *args: Any, **kwargs: Any) -> None:
        prepare(self, *args, **kwargs)
        chunks.record(self)

    LoRAKernelMeta.prepare_tensors = prepare_and_record  # type: ignore[method-assign]
    for module, name in modules:
        setattr(module, name, chunks.launcher(getattr(module, name)))
    setattr(LoRAKernelMeta, PATCHED_FLAG, True)
    log.info("lorafleet: vLLM's LoRA kernels launch over each adapter's token blocks (lora_grid.py)")
    return True
