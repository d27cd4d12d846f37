"""vLLM's LoRA kernels with vLLM's launch grid and with the replica's tight grid (lorafleet_inference.lora_grid),
side by side on this GPU: time per engine step and the outputs' agreement, for the shapes of a model's projections.

Both use the replica's packaged kernel configurations (the ones it serves with); the cases, metadata and timer
are tune_lora_kernels.py's (vLLM's own ops on ``LoRAKernelMeta`` metadata, adapters in contiguous runs of equal
size, GPU time behind a sleep kernel). Steps of 512 tokens or more: the ones served without CUDA graphs, where
the tight grid applies.

    python bench/lora_grid.py --out DIR [--tokens 512,2048,8192,16384] [--actives 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services" / "inference" / "src"))
PACKAGED_CONFIGS = ROOT / "services" / "inference" / "src" / "lorafleet_inference" / "lora_kernel_configs"

from serving.lora_kernels import MODEL_SHAPES, active_counts, kernel_shapes  # noqa: E402
from tune_lora_kernels import Case, GpuTimer  # noqa: E402


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def compare(timer: GpuTimer, tight: Any, case: Case) -> dict[str, Any]:
    """vLLM's grid, then the tight one, on the same case: milliseconds per launch and the outputs' difference."""
    recorded = dict(tight.largest)
    outputs, ms = [], []
    for largest in ({}, recorded):
        tight.largest = dict(largest)
        ms.append(timer.measure(case))
        case.out.zero_()
        case.launch(0)
        outputs.append(case.out.float().clone())
    tight.largest = recorded
    scale = float(outputs[0].abs().max()) or 1.0
    return {"vllm_ms": ms[0], "tight_ms": ms[1], "relative_error": float((outputs[1] - outputs[0]).abs().max()) / scale}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), default="qwen2.5-7b")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--tokens", type=ints, default=[512, 2048, 8192, 16384])
    p.add_argument("--actives", type=ints, default=[1, 8, 32])
    p.add_argument("--layers", type=int, default=4, help="weight copies cycled through while timing")
    args = p.parse_args(argv)
    began = time.monotonic()
    from lorafleet_inference import lora_grid

    # the replica's packaged files (engine.PACKAGED_LORA_KERNEL_CONFIGS; the engine module needs the service's deps)
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(PACKAGED_CONFIGS)
    import torch

    tight = lora_grid.TightGrid()
    if not lora_grid.install(tight):
        print("this vLLM's LoRA kernels do not take the tight grid", file=sys.stderr)
        return 2
    timer = GpuTimer()
    model = MODEL_SHAPES[args.model]
    rows = []
    for shape in kernel_shapes(model, args.rank):
        for m in args.tokens:
            for active in active_counts(args.actives, m, args.max_loras):
                case = Case(shape, m, active, args.max_loras, args.layers, "cuda")  # prepares: records the count
                row = {"op": shape.op, "name": shape.name, "m": m, "active": active} | compare(timer, tight, case)
                row["per_step"] = shape.calls_per_layer * model.layers
                rows.append(row)
                print(
                    f"{shape.label:16} m={m:<6} active={active:<3} vllm {row['vllm_ms'] * 1e3:8.1f} us  "
                    f"tight {row['tight_ms'] * 1e3:8.1f} us  err={row['relative_error']:.1e}",
                    file=sys.stderr,
                    flush=True,
                )
                del case
                torch.cuda.empty_cache()
    totals: dict[tuple[int, int], list[float]] = {}
    for row in rows:
        acc = totals.setdefault((row["m"], row["active"]), [0.0, 0.0])
        acc[0] += row["vllm_ms"] * row["per_step"]
        acc[1] += row["tight_ms"] * row["per_step"]
    lines = [
        "| tokens in step | adapters active | vLLM's grid ms | tight grid ms | speed-up |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | {a} | {v:.2f} | {t:.2f} | {v / t:.2f}x |" for (m, a), (v, t) in sorted(totals.items())]
    worst = max(row["relative_error"] for row in rows)
    gpu = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": gpu, "args": {k: str(v) for k, v in vars(args).items()}, "worst_relative_error": worst}
    (args.out / "grid.json").write_text(json.dumps(summary | {"rows": rows}, indent=1) + "\n")
    seconds = time.monotonic() - began
    print(f"{gpu}, LoRA kernel time per engine step (all layers), largest difference {worst:.1e}, {seconds:.0f} s")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
