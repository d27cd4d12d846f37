"""Several adapters per step: vLLM's LoRA kernels (the replica's: packaged configurations, per-adapter chunks)
against the replica's several-adapter fold (lora_fold_multi.py: qkv and gate_up as one GEMM over
``[x | (x·A_allᵀ) ⊙ M]`` and ``[W | B_1 … B_n]``, o and down still on vLLM's kernels), per engine step.

The fold's cost is its GEMM (and the copy, shrink and mask product before it) minus the base GEMM alone, timed
interleaved with it (the GPU's clock drifts as it heats up). vLLM's kernels run rank ``--rank`` slots (the
replica's max_lora_rank), the fold the adapters' own rank (``--adapter-rank``), as the replica does. Tokens are
in contiguous runs per adapter; the fold's output is checked against a per-adapter reference.

    python bench/lora_fold_multi.py --out DIR [--tokens 2048,16384] [--actives 8,16,32] [--adapter-rank 8]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from serving.lora_kernels import MODEL_SHAPES, kernel_shapes
from tune_lora_kernels import INFERENCE_SRC, PACKAGED_CONFIGS, Case, GpuTimer, ints, kernel_bench_parser

sys.path.insert(0, str(INFERENCE_SRC))  # lorafleet_inference, imported where it is used


class FoldGemm:
    """One projection (``widths`` slices over K = ``k``) at ``m`` tokens shared by ``active`` adapters of rank
    ``rank``: the base GEMM (``kind`` "base") or the several-adapter fold ("multi")."""

    def __init__(
        self, widths: tuple[int, ...], k: int, m: int, active: int, rank: int, layers: int, kind: str, device: str
    ) -> None:
        import torch

        from lorafleet_inference.lora_fold import spare_columns

        gen = torch.Generator(device=device).manual_seed(m * 7 + active)
        n, slices = sum(widths), len(widths)
        graph_columns = spare_columns(k, 16 * slices)  # the one-adapter fold's columns (rank-16 slots) come first
        columns = slices * rank * active

        def rand(*size: int) -> torch.Tensor:
            return torch.randn(*size, generator=gen, device=device, dtype=torch.bfloat16) * 0.05

        self.kind, self.k, self.start = kind, k, k + graph_columns
        self.x = rand(m, k)
        self.weights = [rand(n, self.start + columns) for _ in range(layers)]
        starts = [sum(widths[:i]) for i in range(slices)]
        for w in self.weights:
            w[:, k : self.start] = 0
            for adapter in range(active):  # slice i's columns of B are zero outside slice i's rows, as the replica's
                for index, (first, width) in enumerate(zip(starts, widths, strict=True)):
                    c = self.start + (adapter * slices + index) * rank
                    w[:first, c : c + rank] = 0
                    w[first + width :, c : c + rank] = 0
        self.a = [rand(columns, k) for _ in range(layers)]
        token_slots = torch.arange(m, device=device) * active // m  # contiguous runs per adapter
        column_slots = torch.arange(columns, device=device) // (slices * rank)
        self.mask = token_slots.unsqueeze(1).eq(column_slots.unsqueeze(0)).to(torch.bfloat16)
        self.buffer = torch.empty(m, self.start + columns, dtype=torch.bfloat16, device=device)
        self.widths, self.rank, self.active, self.token_slots = widths, rank, active, token_slots

    def launch(self, layer: int) -> Any:
        import torch

        from lorafleet_inference.lora_fold_multi import multi_folded_linear

        w = self.weights[layer % len(self.weights)]
        if self.kind == "multi":
            a = self.a[layer % len(self.a)]
            return multi_folded_linear(self.x, None, w, a, self.mask, self.buffer, self.k, self.start)
        return torch.nn.functional.linear(self.x, w[:, : self.k])

    def relative_error(self) -> float:
        """The fold against the base GEMM plus each adapter's (x·Aᵀ)·Bᵀ per slice on its own rows, in fp32."""
        w, a, x = self.weights[0].float(), self.a[0].float(), self.x.float()
        reference = x @ w[:, : self.k].t()
        slices = len(self.widths)
        for adapter in range(self.active):
            rows = self.token_slots == adapter
            first = 0
            for index, width in enumerate(self.widths):
                c = (adapter * slices + index) * self.rank
                reference[rows, first : first + width] += (x[rows] @ a[c : c + self.rank].t()) @ w[
                    first : first + width, self.start + c : self.start + c + self.rank
                ].t()
                first += width
        got = self.launch(0).float()
        return float((got - reference).abs().max()) / (float(reference.abs().max()) or 1.0)


def main(argv: list[str] | None = None) -> int:
    p = kernel_bench_parser(__doc__.split("\n")[0])
    p.add_argument("--tokens", type=ints, default=[2048, 16384])
    p.add_argument("--actives", type=ints, default=[8, 16, 32])
    p.add_argument("--adapter-rank", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    began = time.monotonic()
    os.environ["VLLM_TUNED_CONFIG_FOLDER"] = str(PACKAGED_CONFIGS)  # what the replica serves with
    import torch

    from lorafleet_inference import lora_grid

    if not lora_grid.install(lora_grid.ChunkGrid()):
        print("this vLLM's LoRA kernels do not take the chunk grid", file=sys.stderr)
        return 2
    model = MODEL_SHAPES[args.model]
    timer = GpuTimer()
    rows: list[dict[str, Any]] = []
    for m in args.tokens:
        for active in args.actives:
            row: dict[str, Any] = {"m": m, "active": active, "vllm_ms": {}, "fold_ms": {}, "relative_error": {}}
            for shape in kernel_shapes(model, args.rank):
                case = Case(shape, m, active, args.max_loras, args.layers, "cuda")
                calls = shape.calls_per_layer * model.layers
                row["vllm_ms"][shape.label] = timer.measure(case) * calls
                del case
            for name, widths in (("qkv", (model.hidden, model.kv, model.kv)), ("gate_up", (model.intermediate,) * 2)):
                kinds = ("base", "multi")
                cases = [
                    FoldGemm(widths, model.hidden, m, active, args.adapter_rank, args.layers, kind, "cuda")
                    for kind in kinds
                ]
                times: dict[str, list[float]] = {kind: [] for kind in kinds}
                for _ in range(args.rounds):
                    for kind, case in zip(kinds, cases, strict=True):
                        times[kind].append(timer.measure(case))
                extra = statistics.median(times["multi"]) - statistics.median(times["base"])
                row["fold_ms"][name] = extra * model.layers
                row["relative_error"][name] = cases[1].relative_error()
                del cases
            torch.cuda.empty_cache()
            vllm_all = sum(row["vllm_ms"].values())
            vllm_kept = sum(v for label, v in row["vllm_ms"].items() if "qkv" not in label and "gate_up" not in label)
            row["vllm_total_ms"], row["fold_total_ms"] = vllm_all, vllm_kept + sum(row["fold_ms"].values())
            rows.append(row)
            print(
                f"m={m:<6} adapters={active:<3} vLLM {vllm_all:7.2f} ms  fold {row['fold_total_ms']:7.2f} ms  "
                f"(qkv {row['fold_ms']['qkv']:.2f}, gate_up {row['fold_ms']['gate_up']:.2f}, "
                f"vLLM o/down {vllm_kept:.2f})  err {max(row['relative_error'].values()):.1e}",
                file=sys.stderr,
                flush=True,
            )
    gpu = torch.cuda.get_device_name()
    lines = [
        f"{gpu}: LoRA time per engine step ({model.layers} layers), rank-{args.adapter_rank} adapters in "
        f"rank-{args.rank} slots, {args.max_loras} slots",
        "| tokens in step | adapters | vLLM's kernels ms | fold (qkv, gate_up) + vLLM's (o, down) ms | ratio |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['m']} | {r['active']} | {r['vllm_total_ms']:.2f} | {r['fold_total_ms']:.2f} | "
        f"{r['fold_total_ms'] / r['vllm_total_ms']:.2f} |"
        for r in rows
    ]
    worst = max(max(r["relative_error"].values()) for r in rows)
    lines.append(f"largest difference of the fold from the reference: {worst:.1e}; {time.monotonic() - began:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"gpu": gpu, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "fold-multi.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
