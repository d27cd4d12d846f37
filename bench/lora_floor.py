"""What one adapter's LoRA work must cost per engine step, whatever its kernels: vLLM's shrink and expand (the
replica's packaged configurations) next to cuBLAS doing the same products (``torch.mm`` / ``addmm_`` into the
output's column slices), and the memory-traffic floor of that two-kernel design, the bytes both must move over the
bandwidth this GPU reaches on a large copy. Then, for qkv and gate_up, the replica's fold (lora_fold.py: one
adapter's LoRA inside the base GEMM, ``[x | x·Aᵀ]·[W | B]ᵀ``) against the base GEMM alone, on the weights as vLLM
holds them and on the folded layout's strided view of them (what the base model's steps then read).

Shrink reads the layer's input and writes the rank-wide buffer; expand reads the buffer and adds into every output
column, a read and a write of the whole output (gate_up's is 37,888 wide). At a 16k-token prefill step that traffic,
not arithmetic (rank 16), sets the time: a kernel at the floor is as fast as separate shrink and expand can be.

    python bench/lora_floor.py --out DIR [--tokens 256,16384] [--rank 16]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from serving.lora_kernels import MODEL_SHAPES, KernelShape, kernel_shapes
from tune_lora_kernels import PACKAGED_CONFIGS, Case, GpuTimer, ints, kernel_bench_parser


class CublasCase:
    """The same product as ``Case`` (one adapter, every token), with cuBLAS: shrink ``x @ [A_0; A_1; ...]ᵀ`` in one
    GEMM into a bf16 buffer; expand one ``addmm_`` per slice into that slice's columns of the output."""

    def __init__(self, case: Case) -> None:
        import torch

        self.shape, self.out_ref = case.shape, case.out
        slot = 0  # Case puts its one adapter in slot 0
        if case.shape.op == "shrink":
            self.x = case.x
            self.weights = [torch.cat([w[slot, 0] for w in layer]) for layer in case.weights]  # [slices * r, k]
            self.out = torch.empty(case.m, case.shape.slices * case.shape.rank, dtype=torch.bfloat16, device="cuda")
        else:
            self.x = case.x.to(torch.bfloat16)  # [slices, m, r]
            self.weights = [[w[slot, 0] for w in layer] for layer in case.weights]  # per slice [width, r]
            self.out = case.out
            offsets = [sum(case.shape.widths[:i]) for i in range(case.shape.slices)]
            self.views = [self.out[:, o : o + w] for o, w in zip(offsets, case.shape.widths, strict=True)]

    def launch(self, layer: int) -> None:
        import torch

        weights = self.weights[layer % len(self.weights)]
        if self.shape.op == "shrink":
            torch.mm(self.x, weights.t(), out=self.out)
        else:
            for s, view in enumerate(self.views):
                view.addmm_(self.x[s], weights[s].t())


class GemmCase:
    """One projection's GEMM over ``layers`` weight copies: the base model's (contiguous ``W``, or the view
    ``W'[:, :K]`` of the folded layout), or the folded one with one adapter (``lora_fold.folded_linear``)."""

    def __init__(
        self, widths: tuple[int, ...], k: int, rank: int, m: int, layers: int, kind: str, align: int, layout: str
    ) -> None:
        import torch

        from lorafleet_inference.lora_fold import folded_weight_storage, spare_columns

        gen = torch.Generator(device="cuda").manual_seed(m * 7 + len(widths))
        n, extra = sum(widths), spare_columns(k, rank * len(widths), align)

        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.05

        self.kind, self.k = kind, k
        self.x = rand(m, k)
        if kind == "base":  # vLLM's own weights
            self.weights = [rand(n, k) for _ in range(layers)]
        else:
            self.weights = [folded_weight_storage(n, k + extra, torch.bfloat16, "cuda", layout) for _ in range(layers)]
            for w in self.weights:
                w.copy_(rand(n, k + extra))
        self.a = [rand(extra, k) for _ in range(layers)]
        self.mask = torch.ones(m, 1, dtype=torch.bfloat16, device="cuda")
        self.buffer = torch.empty(m, k + extra, dtype=torch.bfloat16, device="cuda")

    def launch(self, layer: int) -> None:
        import torch

        from lorafleet_inference.lora_fold import folded_linear

        w = self.weights[layer % len(self.weights)]
        if self.kind == "folded":
            folded_linear(self.x, None, w, self.a[layer % len(self.a)], self.mask, self.buffer, self.k)
        else:
            torch.nn.functional.linear(self.x, w[:, : self.k])


def fold_rows(
    model: Any, rank: int, m: int, layers: int, timer: GpuTimer, align: int, layout: str, rounds: int = 5
) -> list[dict[str, Any]]:
    """Per fused projection the fold serves: base GEMM (vLLM's layout, the folded layout's view) and folded GEMM,
    with the folded K padded to a multiple of ``align`` and the weights stored ``layout``."""
    import torch

    rows = []
    for name, widths in (("qkv", (model.hidden, model.kv, model.kv)), ("gate_up", (model.intermediate,) * 2)):
        row: dict[str, Any] = {"name": name, "m": m, "per_step": model.layers, "align": align, "layout": layout}
        kinds = ("base", "base_view", "folded")
        cases = [GemmCase(widths, model.hidden, rank, m, layers, kind, align, layout) for kind in kinds]
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(rounds):  # interleaved: the GPU's clock drifts as it heats up, over seconds
            for kind, case in zip(kinds, cases, strict=True):
                times[kind].append(timer.measure(case))
        row |= {f"{kind}_ms": statistics.median(values) for kind, values in times.items()}
        del cases
        torch.cuda.empty_cache()
        rows.append(row)
        print(
            f"fold {name:9} m={m:<6} {layout:12} align {align:<4} base {row['base_ms'] * 1e3:8.1f} us  "
            f"view {row['base_view_ms'] * 1e3:8.1f} us  folded {row['folded_ms'] * 1e3:8.1f} us",
            file=sys.stderr,
            flush=True,
        )
    return rows


def traffic_bytes(shape: KernelShape, m: int) -> int:
    """Bytes one call must move at the least: its input, its output (expand: read and written), one adapter's
    weights. Buffer in fp32, as vLLM keeps it."""
    r, slices = shape.rank, shape.slices
    if shape.op == "shrink":
        k = shape.widths[0]
        return m * k * 2 + slices * m * r * 4 + slices * r * k * 2
    width = sum(shape.widths)
    return slices * m * r * 4 + 2 * m * width * 2 + width * r * 2


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted), the best of a few."""
    import torch

    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = max(best, 2 * src.numel() / (start.elapsed_time(end) / 1000))
    del src, dst
    torch.cuda.empty_cache()
    return best


def agreement(case: Case, cublas: CublasCase) -> float:
    """Largest difference of cuBLAS's result from vLLM's kernel's, relative to the largest value."""
    import torch

    case.out.zero_()
    case.launch(0)
    reference = case.out.float().clone()
    if case.shape.op == "shrink":
        cublas.launch(0)
        got = cublas.out.float().view(case.m, case.shape.slices, case.shape.rank).permute(1, 0, 2)
    else:
        case.out.zero_()
        cublas.launch(0)
        got = case.out.float()
    torch.cuda.synchronize()
    return float((got - reference).abs().max()) / (float(reference.abs().max()) or 1.0)


def main(argv: list[str] | None = None) -> int:
    p = kernel_bench_parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", type=ints, default=[256, 2048, 16384])
    p.add_argument("--fold-align", type=ints, default=[128], help="the fold's K alignments to time (lora_fold.K_ALIGN)")
    p.add_argument(
        "--fold-layouts",
        type=lambda text: text.split(","),
        default=["input-major"],
        help="the fold's weight layouts to time (lora_fold.LAYOUT): input-major, output-major",
    )
    args = p.parse_args(argv)
    began = time.monotonic()
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(PACKAGED_CONFIGS)  # what the replica serves with
    import torch

    model = MODEL_SHAPES[args.model]
    bandwidth = copy_bandwidth()
    timer = GpuTimer()
    rows: list[dict[str, Any]] = []
    folds: list[dict[str, Any]] = []
    for m in args.tokens:
        for shape in kernel_shapes(model, args.rank):
            case = Case(shape, m, 1, args.max_loras, args.layers, "cuda")
            cublas = CublasCase(case)
            row = {"op": shape.op, "name": shape.name, "m": m, "per_step": shape.calls_per_layer * model.layers}
            row |= {"vllm_ms": timer.measure(case), "cublas_ms": timer.measure(cublas)}
            row["floor_ms"] = traffic_bytes(shape, m) / bandwidth * 1000
            row["relative_difference"] = agreement(case, cublas)
            rows.append(row)
            print(
                f"{shape.label:16} m={m:<6} vllm {row['vllm_ms'] * 1e3:8.1f} us  "
                f"cublas {row['cublas_ms'] * 1e3:8.1f} us  floor {row['floor_ms'] * 1e3:8.1f} us  "
                f"diff {row['relative_difference']:.1e}",
                file=sys.stderr,
                flush=True,
            )
            del case, cublas
            torch.cuda.empty_cache()
        for layout in args.fold_layouts:
            for align in args.fold_align:
                folds += fold_rows(model, args.rank, m, args.layers, timer, align, layout)
    lines = [
        f"{torch.cuda.get_device_name()}: one adapter (rank {args.rank}) on every token, LoRA time per engine step "
        f"({model.layers} layers, all shrink and expand calls); copy bandwidth {bandwidth / 1e12:.2f} TB/s",
        "| tokens in step | vLLM's kernels ms | cuBLAS ms | traffic floor ms "
        "| fold's layout, K alignment | fold (qkv, gate_up) + vLLM's (o, down) ms "
        "| base GEMMs on the folded layout's view, ms more |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for m in args.tokens:
        step = [r for r in rows if r["m"] == m]
        v, c, f = (sum(r[k] * r["per_step"] for r in step) for k in ("vllm_ms", "cublas_ms", "floor_ms"))
        unfolded = sum(r["vllm_ms"] * r["per_step"] for r in step if r["name"] in ("o", "down", "o+down"))
        for layout, align in sorted({(r["layout"], r["align"]) for r in folds}):
            fold_step = [r for r in folds if r["m"] == m and r["align"] == align and r["layout"] == layout]
            folded = unfolded + sum((r["folded_ms"] - r["base_ms"]) * r["per_step"] for r in fold_step)
            view = sum((r["base_view_ms"] - r["base_ms"]) * r["per_step"] for r in fold_step)
            lines.append(f"| {m} | {v:.2f} | {c:.2f} | {f:.2f} | {layout}, {align} | {folded:.2f} | {view:+.2f} |")
    worst = max(r["relative_difference"] for r in rows)
    lines.append(f"largest difference cuBLAS vs vLLM's kernels: {worst:.1e}; {time.monotonic() - began:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_bytes_per_s": bandwidth, "rank": args.rank}
    (args.out / "floor.json").write_text(json.dumps(summary | {"rows": rows, "fold_rows": folds}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
