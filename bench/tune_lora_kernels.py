"""Tune vLLM's multi-LoRA Triton kernels for one model on this GPU and write the files vLLM reads.

vLLM ships no tuned LoRA kernel configurations ("Using default LoRA kernel configs"): one launch shape serves every
projection, step size and adapter count. This times each candidate (serving/lora_kernels.py) on the shapes the
model's projections call, at step sizes from 1 token to a full prefill chunk, with 1, 8 and 32 adapters active in
max_loras slots, against the default in the same run, and writes the winners as
``OUT/{gpu}_SHRINK.json`` / ``{gpu}_EXPAND_TRUE.json`` (serve with ``VLLM_TUNED_CONFIG_FOLDER=OUT``) plus
``tuning.json`` (every time measured) and a table of the LoRA kernel time per engine step.

The calls are vLLM's own (``_lora_shrink`` / ``_lora_expand``, the config lookup swapped for the candidate),
on metadata built by vLLM's ``LoRAKernelMeta`` with ``specialize_active_lora`` as our replica runs it.
Times are GPU time: the launches captured in a CUDA graph, CUDA events around its replays (the first tuning timed
eager launches behind a sleep kernel, whose small-step times held host time); each repetition uses another
layer's weights so the adapters are not all cache-resident. With ``--chunk-grid`` the launches go over the
replica's per-adapter chunks (lorafleet_inference.lora_grid), as it serves them.
Candidates are compiled first in parallel processes (Triton's disk cache), then timed in this one.

    python bench/tune_lora_kernels.py --out DIR [--model qwen2.5-7b] [--budget-s 420]
    # the decode steps again, over the chunk grid, into the shipped files:
    python bench/tune_lora_kernels.py --out DIR --chunk-grid --tokens 16,32,64,128,256 \
        --merge-into services/inference/src/lorafleet_inference/lora_kernel_configs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from serving.lora_kernels import (
    MODEL_SHAPES,
    KernelShape,
    active_counts,
    kernel_shapes,
    merge_config_files,
    pick,
    space,
    token_counts,
    vllm_config_files,
    vllm_lookup_args,
)

INFERENCE_SRC = Path(__file__).resolve().parents[1] / "services" / "inference" / "src"
# The configuration files the replica ships and serves with (engine.PACKAGED_LORA_KERNEL_CONFIGS; the engine module
# needs the service's dependencies, so the benchmarks name the folder themselves).
PACKAGED_CONFIGS = INFERENCE_SRC / "lorafleet_inference" / "lora_kernel_configs"
COMPILE_TOKENS = (1, 16)  # the kernels specialize on m's divisibility: one compile for m = 1, one for m % 16 == 0


class Case:
    """Tensors and vLLM kernel metadata for one shape at m tokens with `active` adapters (`layers` weight copies)."""

    def __init__(self, shape: KernelShape, m: int, active: int, max_loras: int, layers: int, device: Any) -> None:
        import torch
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
        from vllm.lora.utils import get_captured_lora_counts

        self.shape, self.m = shape, m
        gen = torch.Generator(device=device).manual_seed(m * 131 + active)
        bf16 = torch.bfloat16

        def rand(*size: int) -> Any:
            return torch.randn(*size, generator=gen, device=device, dtype=bf16) * 0.05

        if shape.op == "shrink":
            self.x = rand(m, shape.k)
            self.out = torch.zeros(shape.slices, m, shape.rank, dtype=torch.float32, device=device)
            self.weights = [
                tuple(rand(max_loras, 1, shape.rank, shape.k) for _ in range(shape.slices)) for _ in range(layers)
            ]
        else:
            self.x = torch.randn(shape.slices, m, shape.rank, generator=gen, device=device, dtype=torch.float32)
            self.out = torch.zeros(m, sum(shape.widths), dtype=bf16, device=device)
            self.weights = [tuple(rand(max_loras, 1, w, shape.rank) for w in shape.widths) for _ in range(layers)]
        self.meta = LoRAKernelMeta.make(max_loras, m, device, get_captured_lora_counts(max_loras, True))
        slots = torch.tensor([i * max_loras // active for i in range(active)], device=device)
        self.meta.prepare_tensors(slots[torch.arange(m, device=device) * active // m])  # contiguous runs per adapter
        self.meta_args = self.meta.meta_args(m, True)

    def launch(self, layer: int) -> None:
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

        weights = list(self.weights[layer % len(self.weights)])
        if self.shape.op == "shrink":
            lora_shrink_op._lora_shrink(self.x, weights, self.out, *self.meta_args, 1.0)
        else:
            lora_expand_op._lora_expand(self.x, weights, self.out, *self.meta_args, offset_start=0, add_inputs=True)


def use_config(op: str, config: dict[str, Any] | None) -> None:
    """Make vLLM's op launch with `config` (None: its own lookup, i.e. the default here)."""
    from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op, utils

    module = lora_shrink_op if op == "shrink" else lora_expand_op
    module.get_lora_op_configs = utils.get_lora_op_configs if config is None else (lambda *a, **k: config)


def default_config(shape: KernelShape, m: int, max_loras: int) -> dict[str, Any]:
    from vllm.lora.ops.triton_ops.utils import get_lora_op_configs

    return dict(get_lora_op_configs(**vllm_lookup_args(shape, m, max_loras)))


def install_chunk_grid() -> bool:
    """The replica's LoRA grid (its engine processes install the same) in this process and, through the import
    below, in the compile workers that call it."""
    sys.path.insert(0, str(INFERENCE_SRC))
    from lorafleet_inference import lora_grid

    return lora_grid.install()


def compile_share(args: argparse.Namespace, worker: int, workers: int) -> int:
    """In a worker process: launch every `workers`-th candidate once per compile variant (fills Triton's cache)."""
    import torch

    torch.cuda.set_device(0)
    if args.chunk_grid:
        install_chunk_grid()
    model = MODEL_SHAPES[args.model]
    compiled = 0
    for shape in kernel_shapes(model, args.rank):
        candidates = space(shape)[worker::workers]
        for m in COMPILE_TOKENS:
            case = Case(shape, m, 1, args.max_loras, 1, "cuda")
            for config in candidates:
                use_config(shape.op, config)
                try:
                    case.launch(0)
                    compiled += 1
                except Exception:  # e.g. out of shared memory: timing skips it too
                    pass
    torch.cuda.synchronize()
    return compiled


class GpuTimer:
    """GPU milliseconds per launch, as an engine step runs them: launches (cycling the weight copies) captured in
    one CUDA graph, the median of timed replays. No host time in it, however small the kernel."""

    def __init__(self, reps: int = 8, replays: int = 5) -> None:
        import torch

        self.torch, self.reps, self.replays = torch, reps, replays

    def measure(self, case: Case) -> float:
        import statistics

        torch = self.torch
        case.launch(0)  # compiles (or fails, e.g. out of shared memory) before any capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(self.reps):
                case.launch(i)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(self.replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / self.reps)
        del graph
        return statistics.median(times)


def agree(case: Case, config: dict[str, Any], reference: dict[str, Any]) -> float:
    """Largest difference between the outputs of `config` and `reference`, relative to the reference's size."""
    outputs = []
    for c in (reference, config):
        use_config(case.shape.op, c)
        case.out.zero_()
        case.launch(0)
        outputs.append(case.out.float().clone())
    scale = float(outputs[0].abs().max()) or 1.0
    return float((outputs[1] - outputs[0]).abs().max()) / scale


def measure(timer: GpuTimer, shape: KernelShape, m: int, args: argparse.Namespace) -> dict[str, Any]:
    """The default's and every candidate's time for each active-adapter count at m tokens."""
    actives = active_counts(args.actives, m, args.max_loras)
    cases = {a: Case(shape, m, a, args.max_loras, args.layers, "cuda") for a in actives}
    use_config(shape.op, None)
    default_ms = {a: timer.measure(case) for a, case in cases.items()}
    measured = []
    for config in space(shape):
        use_config(shape.op, config)
        times = {}
        for a, case in cases.items():
            try:
                times[a] = timer.measure(case)
            except Exception:  # e.g. out of shared memory
                break
        measured.append((config, times))
    return {
        "case": cases[actives[-1]],
        "default": default_config(shape, m, args.max_loras),
        "ms": default_ms,
        "measured": measured,
    }


def tune(args: argparse.Namespace, deadline: float) -> list[dict[str, Any]]:
    timer = GpuTimer()
    rows: list[dict[str, Any]] = []
    # expand first: its grid spans the whole output width for every active adapter, the likelier loser
    for shape in sorted(kernel_shapes(MODEL_SHAPES[args.model], args.rank), key=lambda s: s.op != "expand"):
        by_m: dict[int, dict[str, Any]] = {}
        for m in args.tokens:
            if time.monotonic() > deadline:
                print(f"deadline: stopped before {shape.label} m={m}", file=sys.stderr, flush=True)
                break
            by_m[m] = measure(timer, shape, m, args)
        for m, choice in pick(by_m, args.joint_from).items():
            d = by_m[m]
            error = agree(d["case"], choice.config, d["default"])
            rows.append(
                {
                    "op": shape.op,
                    "name": shape.name,
                    "slices": shape.slices,
                    "k": shape.k,
                    "n": shape.n,
                    "m": m,
                    "calls_per_layer": shape.calls_per_layer,
                    "default": d["default"],
                    "default_ms": d["ms"],
                    "tuned": choice.config,
                    "tuned_ms": {a: d["ms"][a] * r for a, r in choice.ratios.items()},
                    "kept_default": choice.default,
                    "relative_error": error,
                    "candidates": len(d["measured"]),
                }
            )
            best = " ".join(
                f"{a}:{d['ms'][a] * 1e3:.0f}->{d['ms'][a] * r * 1e3:.0f}us" for a, r in choice.ratios.items()
            )
            print(f"{shape.label:16} m={m:<6} {best}  err={error:.1e}", file=sys.stderr, flush=True)
        if time.monotonic() > deadline:
            break
    return rows


def step_table(rows: list[dict[str, Any]], layers: int) -> str:
    """LoRA kernel milliseconds per engine step (all layers), default vs tuned, by step size and active adapters."""
    totals: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        for a, ms in row["default_ms"].items():
            acc = totals.setdefault((row["m"], int(a)), [0.0, 0.0])
            acc[0] += ms * row["calls_per_layer"] * layers
            acc[1] += row["tuned_ms"][a] * row["calls_per_layer"] * layers
    lines = [
        "| tokens in step | adapters active | default ms | tuned ms | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for (m, a), (d, t) in sorted(totals.items()):
        lines.append(f"| {m} | {a} | {d:.2f} | {t:.2f} | {d / t:.2f}x |")
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def kernel_bench_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every LoRA kernel benchmark here takes (this tuner, lora_grid.py, lora_floor.py): where results
    go, the model whose shapes are timed, the engine's LoRA slots, and the weight copies cycled while timing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="qwen2.5-7b")
    p.add_argument("--rank", type=int, default=16, help="the engine's max_lora_rank (the stacked weights' rank)")
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--layers", type=int, default=4, help="weight copies cycled through while timing")
    return p


def main(argv: list[str] | None = None) -> int:
    p = kernel_bench_parser(__doc__.split("\n")[0])
    p.add_argument("--max-tokens", type=int, default=16384, help="the largest step (max_num_batched_tokens)")
    p.add_argument("--actives", type=ints, default=[1, 8, 32])
    p.add_argument("--workers", type=int, default=max(1, min(15, (os.cpu_count() or 2) - 1)))
    p.add_argument("--budget-s", type=float, default=420)
    p.add_argument("--joint-from", type=int, default=512, help="one config for every step of this many tokens or more")
    p.add_argument("--tokens", type=ints, help="step sizes (default: all)")
    p.add_argument("--chunk-grid", action="store_true", help="time over the replica's chunk grid (lora_grid.py)")
    p.add_argument("--merge-into", type=Path, help="config files whose entries for the tuned step sizes are replaced")
    args = p.parse_args(argv)
    args.tokens = args.tokens or token_counts(args.max_tokens)
    began = time.monotonic()
    os.environ.pop("VLLM_TUNED_CONFIG_FOLDER", None)  # the default config is the reference
    import torch

    gpu = torch.cuda.get_device_name()
    if args.chunk_grid and not install_chunk_grid():
        print("this vLLM's LoRA kernels do not take the chunk grid", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        done = sum(pool.map(compile_share, [args] * args.workers, range(args.workers), [args.workers] * args.workers))
    print(f"compiled {done} kernel variants in {time.monotonic() - began:.0f} s", file=sys.stderr, flush=True)
    rows = tune(args, began + args.budget_s)
    args.out.mkdir(parents=True, exist_ok=True)
    shapes = {(s.op, s.name): s for s in kernel_shapes(MODEL_SHAPES[args.model], args.rank)}
    chosen = [(shapes[(r["op"], r["name"])], r["m"], r["tuned"]) for r in rows]
    tuned = {(r["op"], r["name"], r["m"]) for r in rows}
    for (op, name), shape in shapes.items():  # the deadline's leftovers keep the default (nearest-m would guess)
        untuned = [m for m in args.tokens if (op, name, m) not in tuned]
        chosen += [(shape, m, default_config(shape, m, args.max_loras)) for m in untuned]
    for name, data in vllm_config_files(gpu, args.max_loras, chosen).items():
        if args.merge_into:  # the other step sizes keep the configurations they had
            data = merge_config_files(json.loads((args.merge_into / name).read_text()), data)
        (args.out / name).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    table = step_table(rows, MODEL_SHAPES[args.model].layers)
    summary = {"gpu": gpu, "args": {k: str(v) for k, v in vars(args).items()}, "seconds": time.monotonic() - began}
    (args.out / "tuning.json").write_text(json.dumps(summary | {"rows": rows}, indent=1) + "\n")
    print(f"{gpu}, rank {args.rank}, max_loras {args.max_loras}, {math.ceil(time.monotonic() - began)} s\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
