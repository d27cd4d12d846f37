"""vLLM's LoRA kernels with vLLM's launch grid and over the replica's per-adapter chunks
(lorafleet_inference.lora_grid), side by side on this GPU: time per engine step and the outputs' agreement, for the
shapes of a model's projections, plus the host time the chunk tables add to a step.

Both use the replica's packaged kernel configurations (the ones it serves with); the cases, metadata and timer
are tune_lora_kernels.py's (vLLM's own ops on ``LoRAKernelMeta`` metadata, adapters in contiguous runs of equal
size, the GPU time of CUDA-graph replays: no host time in it). Steps of up to 512 tokens are decode steps (served
from CUDA graphs), larger ones prefill chunks (launched eagerly).

    python bench/lora_grid.py --out DIR [--tokens 256,512,2048,8192,16384] [--actives 1,8,32]
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from serving.lora_kernels import MODEL_SHAPES, active_counts, kernel_shapes
from tune_lora_kernels import INFERENCE_SRC, PACKAGED_CONFIGS, Case, GpuTimer, ints, kernel_bench_parser

sys.path.insert(0, str(INFERENCE_SRC))  # lorafleet_inference.lora_grid, imported where it is used


def compare(timer: GpuTimer, chunks: Any, case: Case) -> dict[str, Any]:
    """vLLM's grid, then the chunks, on the same case: milliseconds per launch and the outputs' difference."""
    outputs, ms = [], []
    for enabled in (False, True):
        chunks.enabled = enabled
        ms.append(timer.measure(case))
        case.out.zero_()
        case.launch(0)
        outputs.append(case.out.float().clone())
    scale = float(outputs[0].abs().max()) or 1.0
    return {
        "vllm_ms": ms[0],
        "chunks_ms": ms[1],
        "relative_error": float((outputs[1] - outputs[0]).abs().max()) / scale,
    }


def prepare_host_us(chunks: Any, max_loras: int, max_tokens: int, reps: int = 200) -> dict[str, float]:
    """Host microseconds of vLLM's ``prepare_tensors`` for a decode step of 256 tokens over 32 adapters, without
    and with the chunk tables it now fills (the one cost the chunks add to every step with several adapters)."""
    import torch
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
    from vllm.lora.utils import get_captured_lora_counts

    meta = LoRAKernelMeta.make(max_loras, max_tokens, "cuda", get_captured_lora_counts(max_loras, True))
    mapping = torch.arange(256, dtype=torch.int32) * 32 // 256  # built on the host, as vLLM's runner does
    out = {}
    for enabled in (False, True):
        chunks.enabled = enabled  # off: prepare_tensors fills no tables
        meta.prepare_tensors(mapping.cuda())
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(reps):
            meta.prepare_tensors(mapping.cuda())
        torch.cuda.synchronize()
        out["chunks" if enabled else "vllm"] = round((time.perf_counter() - began) / reps * 1e6, 1)
    return out


def graph_check(chunks: Any, model: Any, rank: int, max_loras: int) -> dict[str, float]:
    """Each kernel of a decode step (256 tokens, 32 adapters) captured in a CUDA graph over the chunks, replayed
    after vLLM prepared another step (the same adapters in uneven shares), against vLLM's grid run eagerly on that
    step: the largest difference, relative to the output's size."""
    import torch

    errors = {}
    for shape in kernel_shapes(model, rank):
        case = Case(shape, 256, 32, max_loras, 1, "cuda")
        case.launch(0)  # compiled before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            case.launch(0)
        shares = torch.tensor([1] * 31 + [225])[torch.randperm(32)]
        mapping = torch.repeat_interleave(torch.arange(32) * max_loras // 32, shares)[torch.randperm(256)]
        case.meta.prepare_tensors(mapping.int().cuda())
        outputs = []
        for replay in (True, False):
            chunks.enabled = replay  # the reference: vLLM's grid on its own metadata
            case.out.zero_()
            if replay:
                graph.replay()
            else:
                case.launch(0)
            torch.cuda.synchronize()
            outputs.append(case.out.float().clone())
        chunks.enabled = True
        scale = float(outputs[1].abs().max()) or 1.0
        errors[shape.label] = float((outputs[0] - outputs[1]).abs().max()) / scale
        del graph, case
    return errors


def main(argv: list[str] | None = None) -> int:
    p = kernel_bench_parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", type=ints, default=[1, 64, 256, 512, 2048, 8192, 16384])
    p.add_argument("--actives", type=ints, default=[1, 8, 32])
    args = p.parse_args(argv)
    began = time.monotonic()
    from lorafleet_inference import lora_grid

    # the replica's packaged files (engine.PACKAGED_LORA_KERNEL_CONFIGS; the engine module needs the service's deps)
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(PACKAGED_CONFIGS)
    import torch

    chunks = lora_grid.ChunkGrid()
    if not lora_grid.install(chunks):
        print("this vLLM's LoRA kernels do not take the chunk grid", file=sys.stderr)
        return 2
    model = MODEL_SHAPES[args.model]
    timer = GpuTimer()
    rows = []
    for shape in kernel_shapes(model, args.rank):
        for m in args.tokens:
            for active in active_counts(args.actives, m, args.max_loras):
                case = Case(shape, m, active, args.max_loras, args.layers, "cuda")  # prepares: fills the tables
                row = {"op": shape.op, "name": shape.name, "m": m, "active": active} | compare(timer, chunks, case)
                row["per_step"] = shape.calls_per_layer * model.layers
                rows.append(row)
                print(
                    f"{shape.label:16} m={m:<6} active={active:<3} vllm {row['vllm_ms'] * 1e3:8.1f} us  "
                    f"chunks {row['chunks_ms'] * 1e3:8.1f} us  err={row['relative_error']:.1e}",
                    file=sys.stderr,
                    flush=True,
                )
                del case
                torch.cuda.empty_cache()
    totals: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        acc = totals.setdefault((row["m"], row["active"]), [0.0, 0.0])
        acc[0] += row["vllm_ms"] * row["per_step"]
        acc[1] += row["chunks_ms"] * row["per_step"]
    lines = [
        "| tokens in step | adapters active | vLLM's grid ms | chunks ms | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | {a} | {v:.2f} | {t:.2f} | {v / t:.2f}x |" for (m, a), (v, t) in sorted(totals.items())]
    worst = max(row["relative_error"] for row in rows)
    prepare = prepare_host_us(chunks, args.max_loras, max(args.tokens))
    graphs = graph_check(chunks, model, args.rank, args.max_loras)
    gpu = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": gpu, "args": {k: str(v) for k, v in vars(args).items()}, "worst_relative_error": worst}
    summary["prepare_host_us"], summary["graph_replay_relative_error"] = prepare, graphs
    (args.out / "grid.json").write_text(json.dumps(summary | {"rows": rows}, indent=1) + "\n")
    seconds = time.monotonic() - began
    print(f"{gpu}, LoRA kernel time per engine step (all layers), largest difference {worst:.1e}, {seconds:.0f} s")
    print("\n".join(lines))
    print(f"host time of vLLM's per-step metadata (us): {prepare}")
    print(f"CUDA graph over chunks, replayed on another step, vs vLLM's grid eagerly: {graphs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
