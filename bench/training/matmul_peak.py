"""The bf16 matmul peak this device actually reaches, the denominator issue #8 names for MFU ("4·N_matmul·tokens/s
over the measured bf16 peak"), next to the datasheet figure.

A dense GEMM is the best case for a GPU's tensor cores: big enough to hide every launch and memory cost, nothing
else running. The peak is the best of several large shapes (squares, and the largest projection of Qwen2.5-7B at a
step of 8,192 tokens), each timed over many back-to-back launches with CUDA events after a warm-up, so clocks and
cuBLAS's heuristics have settled. On a CPU the same code runs (fp32, small shapes) so the test suite covers it.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# (M, K, N): C[M, N] = A[M, K] @ B[K, N]. The last is gate_up at a packed micro-batch of 4 x 2,048 tokens.
CUDA_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 8192), (8192, 3584, 37888)]
CPU_SHAPES = [(128, 128, 128), (256, 256, 256)]


def measure_matmul_peak(
    device: torch.device, shapes: list[tuple[int, int, int]] | None = None, seconds_per_shape: float = 1.5
) -> dict[str, Any]:
    """FLOP/s of ``torch.matmul`` per shape (2·M·K·N per product) and the best of them, ``peak_flops``."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = shapes or (CUDA_SHAPES if cuda else CPU_SHAPES)
    rows = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        flops = 2.0 * m * k * n
        for _ in range(3):  # warm-up: cuBLAS picks its kernel, clocks rise
            torch.matmul(a, b, out=out)
        seconds = _time_launches(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), 1, cuda)
        launches = max(3, min(200, int(seconds_per_shape / max(seconds, 1e-6))))
        seconds = _time_launches(lambda a=a, b=b, out=out: torch.matmul(a, b, out=out), launches, cuda)
        rows.append({"m": m, "k": k, "n": n, "launches": launches, "flops_per_s": flops / seconds})
        del a, b, out
    if cuda:
        torch.cuda.empty_cache()
    best = max(rows, key=lambda r: r["flops_per_s"])
    return {"dtype": str(dtype).removeprefix("torch."), "shapes": rows, "peak_flops": best["flops_per_s"]}


def _time_launches(launch: Any, count: int, cuda: bool) -> float:
    """Seconds per launch: GPU time between two events around ``count`` back-to-back launches (CUDA), wall time
    otherwise."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(count):
            launch()
        return (time.perf_counter() - start) / count
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(count):
        launch()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000.0 / count
