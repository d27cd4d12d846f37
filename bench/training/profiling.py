"""Where a micro-batch's time goes (bench/trainer.py --profile): host or GPU, which kernels, how many syncs.

A few full micro-batches of the case's first epoch plan run through ``train_loop.share_loss_sum`` (the code a job
runs for a step's micro-batches: collate, forward, loss, backward; compiled layers when the case compiles), after
the case's warm-up and timed epochs, so kernels, allocator and compiled graphs are warm:

1. unprofiled, timed: wall time per micro-batch (GPU synchronized at the end) and the host's time to issue each
   one (the call's own duration: with no sync inside, the host runs ahead of the GPU by up to this much); on CUDA
   under ``torch.cuda.set_sync_debug_mode("warn")``, whose warnings count the host's waits for the device;
2. under torch.profiler: the sum of kernel times per micro-batch (GPU busy = kernels / wall: well under 1, the
   GPU waits for the host), the top kernels by GPU time and the top host ops by self CPU time, and the runtime's
   synchronizing calls (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize) and device-to-host
   copies.
"""

from __future__ import annotations

import contextlib
import random
import time
import warnings
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from lorafleet_trainer import train_loop
from lorafleet_trainer.compiled_layers import compiled_layers
from lorafleet_trainer.manifest import TrainingSpec
from lorafleet_trainer.tokenize import TokenizedExample

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
TOP_OPS = 15


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _micro_batches(rows: list[TokenizedExample], training: TrainingSpec, count: int) -> list[list[list[int]]]:
    """The first ``count`` full micro-batches of the epoch plan (a full one has the shape the compiled layers know)."""
    plan = train_loop.plan_batches([len(r.input_ids) for r in rows], training, random.Random(training.seed))
    full = [batch for batch in plan if len(batch) == training.batch_size]
    return (full or plan)[:count]


def profile_micro_batches(
    model: Any,
    rows: list[TokenizedExample],
    training: TrainingSpec,
    pad_id: int,
    device: torch.device,
    *,
    compile_backend: str = "inductor",
    count: int = 3,
) -> dict[str, Any]:
    layers = compiled_layers(model, packed=training.packing, backend=compile_backend) if training.compile else None
    batches = [[[rows[i] for i in sequence] for sequence in batch] for batch in _micro_batches(rows, training, count)]
    tokens = sum(len(r.input_ids) for batch in batches for sequence in batch for r in sequence)
    train_loop.set_gradient_checkpointing(model, train_loop.gradient_checkpointing_wanted(training, device))
    model.train()

    def run_all(issue_seconds: list[float] | None = None) -> None:
        for batch in batches:
            labels = sum(r.trained_tokens for sequence in batch for r in sequence)
            began = time.perf_counter()
            train_loop.share_loss_sum(model, [batch], labels, pad_id, device, training, layers)
            if issue_seconds is not None:
                issue_seconds.append(time.perf_counter() - began)

    active = layers.active() if layers is not None else contextlib.nullcontext()
    issue: list[float] = []
    sync_warnings = None
    with active:
        _sync(device)
        began = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                run_all(issue)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
            _sync(device)
        wall = time.perf_counter() - began
        if device.type == "cuda":
            sync_warnings = sum("synchronizing" in str(w.message) for w in caught)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            run_all()
            _sync(device)
    model.zero_grad(set_to_none=True)
    return summarize(prof, len(batches), tokens, wall, issue, sync_warnings, device)


def summarize(
    prof: Any,
    micro_batches: int,
    tokens: int,
    wall: float,
    issue: list[float],
    sync_warnings: int | None,
    device: torch.device,
) -> dict[str, Any]:
    """The profile as numbers per micro-batch (milliseconds), and the top kernels and host ops with their share.

    The kernel time is the sum over the device's own events (kernels, copies) only: an op's ``self_device_time``
    counts the kernels it launched a second time. On one stream kernels do not overlap, so the sum is the time the
    GPU was busy.
    """
    averages = list(prof.key_averages())
    on_gpu = device.type == "cuda"
    per = max(1, micro_batches)
    host_ops = [e for e in averages if e.device_type == DeviceType.CPU]
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA] if on_gpu else []

    def top(events: list[Any], own_time: Any) -> list[dict[str, Any]]:
        total = sum(own_time(e) for e in events)
        return [
            {
                "name": e.key,
                "ms": own_time(e) / 1e3 / per,
                "share": own_time(e) / total if total else 0.0,
                "calls": e.count / per,
            }
            for e in sorted(events, key=own_time, reverse=True)[:TOP_OPS]
        ]

    def gpu_time(event: Any) -> float:  # microseconds
        return float(event.self_device_time_total)

    def host_time(event: Any) -> float:
        return float(event.self_cpu_time_total)

    counts = {e.key: int(e.count) for e in averages}
    kernels_ms = sum(gpu_time(e) for e in kernels) / 1e3 / per if on_gpu else None
    wall_ms = wall * 1e3 / per
    syncs: dict[str, Any] = {"sync_debug_warnings": sync_warnings}
    if on_gpu:
        syncs |= {name: counts.get(name, 0) / per for name in SYNC_CALLS}
        syncs["memcpy_dtoh"] = sum(n for key, n in counts.items() if "DtoH" in key or "Device -> Pageable" in key) / per
        if sync_warnings is not None:
            syncs["sync_debug_warnings"] = sync_warnings / per
    return {
        "micro_batches": micro_batches,
        "tokens_per_micro_batch": tokens / per,
        "wall_ms": wall_ms,
        "host_issue_ms": sum(issue) * 1e3 / per,
        "kernel_ms": kernels_ms,
        "gpu_busy": kernels_ms / wall_ms if kernels_ms is not None and wall_ms > 0 else None,
        "host_ops_per_micro_batch": sum(e.count for e in host_ops) / per,
        "syncs_per_micro_batch": syncs,
        "top": top(kernels, gpu_time) if on_gpu else top(host_ops, host_time),
        "top_by": "GPU kernel time" if on_gpu else "self CPU time",
        "top_host": top(host_ops, host_time) if on_gpu else [],
    }


def report_lines(case: str, profile_result: dict[str, Any]) -> list[str]:
    p = profile_result
    if "error" in p:
        return [f"profile {case}: FAILED {p['error'][:200]}"]
    line = (
        f"profile {case}: {p['micro_batches']} micro-batches of {p['tokens_per_micro_batch']:.0f} tokens; "
        f"per micro-batch: wall {p['wall_ms']:.1f} ms, host issue {p['host_issue_ms']:.1f} ms"
    )
    if p["kernel_ms"] is not None:
        line += f", GPU kernels {p['kernel_ms']:.1f} ms (GPU busy {p['gpu_busy']:.0%})"
    syncs = ", ".join(f"{k} {v:g}" for k, v in p["syncs_per_micro_batch"].items() if v is not None)
    lines = [line, f"  syncs per micro-batch: {syncs or 'n/a on CPU'}"]
    if p.get("host_ops_per_micro_batch") is not None:
        lines.append(f"  host ops per micro-batch: {p['host_ops_per_micro_batch']:.0f}")
    for key, by in (("top", p["top_by"]), ("top_host", "self host CPU time")):
        if p.get(key):
            lines.append(f"  top {len(p[key])} by {by} (share of the total; time and calls per micro-batch):")
            lines += [f"  {t['share']:6.1%} {t['ms']:9.2f} ms {t['calls']:7g} calls  {t['name'][:90]}" for t in p[key]]
    return lines
