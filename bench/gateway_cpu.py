"""Gateway CPU per request and per streamed token, and the first token it adds at one stream; optionally
comparing source trees side by side.

One paced fake replica (bench/fake_replica.py) and one real gateway process (`python -m lorafleet_gateway`,
SQLite, a tenant key) per source tree; every tree's gateway runs the same rounds, alternating, so a machine
whose load changes (a shared CI box) shifts them alike. Per round and gateway:
  * streamed chat requests with max_tokens=1, then with the replica's full length, ``--concurrency`` at a
    time; the gateway process's CPU time (user + system, all threads, from /proc) per request of each gives
    CPU per request (the 1-token one) and per further token (the slope between the two);
  * with ``--single N``: N requests one at a time, straight to the replica over gRPC and through the gateway,
    and the time to first token the gateway adds (p50 and p99 of the N, minus direct).
Medians over the rounds are printed.

    python bench/gateway_cpu.py                                   # this checkout
    python bench/gateway_cpu.py --trees /tmp/old /tmp/new         # each: a copy of the repository (its
                                                                  # services/gateway/src goes first on PYTHONPATH)
    python bench/gateway_cpu.py --bare-relay                      # and the floor: bench/bare_relay.py alongside
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from gateway import (
    Run,
    direct_call,
    gateway_call,
    load,
    start_bare_relay,
    start_gateway,
    start_replica,
    tenant_key,
)
from serving.stack import cpu_seconds  # bench/ is on sys.path: this file runs as a script

HERE = Path(__file__).resolve().parent


@dataclass
class Tree:
    name: str
    pid: int
    http: httpx.AsyncClient
    cpu_one: list[float] = field(default_factory=list)  # us per 1-token request, per round
    cpu_full: list[float] = field(default_factory=list)  # us per full-length request
    tokens_full: list[float] = field(default_factory=list)  # tokens per full-length request
    added_p50: list[float] = field(default_factory=list)  # ms
    added_p99: list[float] = field(default_factory=list)


async def cpu_per_request(tree: Tree, args: argparse.Namespace, max_tokens: int | None) -> tuple[float, float]:
    before = cpu_seconds(tree.pid)
    run: Run = await load(args.concurrency, args.requests, gateway_call(tree.http, max_tokens))
    after = cpu_seconds(tree.pid)
    if run.errors or before is None or after is None:
        raise SystemExit(f"{tree.name}: {run.errors} failed requests, or no /proc")
    return (after - before) / len(run.samples) * 1e6, sum(s.tokens for s in run.samples) / len(run.samples)


async def measure(args: argparse.Namespace, trees: list[Tree], replica_port: int) -> None:
    import grpc

    from lorafleet.inference.v1 import inference_pb2_grpc

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica_port}")
    direct = direct_call(inference_pb2_grpc.InferenceServiceStub(channel))
    for tree in trees:  # warm up: connections, caches, the first requests' lazy imports
        await load(4, 40, gateway_call(tree.http, None))
    for round_ in range(args.rounds):
        for tree in trees if round_ % 2 == 0 else trees[::-1]:
            one, _ = await cpu_per_request(tree, args, 1)
            full, tokens = await cpu_per_request(tree, args, None)
            tree.cpu_one.append(one)
            tree.cpu_full.append(full)
            tree.tokens_full.append(tokens)
            if args.single:
                straight = await load(1, args.single, direct)
                through = await load(1, args.single, gateway_call(tree.http, None))
                tree.added_p50.append((through.pct("ttft_s", 0.5) - straight.pct("ttft_s", 0.5)) * 1e3)
                tree.added_p99.append((through.pct("ttft_s", 0.99) - straight.pct("ttft_s", 0.99)) * 1e3)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    await channel.close()


def report(trees: list[Tree]) -> None:
    med = statistics.median
    print(f"{'tree':>12} | {'CPU/request (1 token)':>22} | {'CPU/further token':>17} | {'added TTFT p50 / p99':>20}")
    for tree in trees:
        slopes = [(f - o) / (t - 1) for o, f, t in zip(tree.cpu_one, tree.cpu_full, tree.tokens_full, strict=True)]
        spread = f"{min(tree.cpu_one):.0f}-{max(tree.cpu_one):.0f}"
        ttft = f"{med(tree.added_p50):.2f} / {med(tree.added_p99):.2f} ms" if tree.added_p50 else "-"
        print(
            f"{tree.name:>12} | {med(tree.cpu_one):>7.0f} us ({spread:>11}) | {med(slopes):>14.1f} us | {ttft:>20}",
            flush=True,
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, default=[HERE.parent], help="repository copies to compare")
    parser.add_argument("--tokens", type=int, default=32, help="full response length (default 32)")
    parser.add_argument("--token-delay-ms", type=float, default=2.0, help="replica pace (default 2 ms/token)")
    parser.add_argument("--concurrency", type=int, default=8, help="streams at once (default 8)")
    parser.add_argument("--requests", type=int, default=200, help="requests per measurement (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, medians reported (default 5)")
    parser.add_argument("--single", type=int, default=0, help="also N one-at-a-time requests per round for TTFT")
    parser.add_argument("--bare-relay", action="store_true", help="also measure bench/bare_relay.py, the floor")
    args = parser.parse_args()

    replica, replica_port = start_replica(args.tokens, args.token_delay_ms)
    admin_key = "bench-admin-" + secrets.token_hex(8)
    procs = []
    try:
        with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as work:
            started = []
            inherited = os.environ.get("PYTHONPATH", "")
            for i, root in enumerate(args.trees):
                home = Path(work) / f"gateway-{i}"
                home.mkdir()
                # start_gateway passes this process's environment on: the tree's gateway sources come first.
                os.environ["PYTHONPATH"] = os.pathsep.join([str(root.resolve() / "services/gateway/src"), inherited])
                proc, url = start_gateway(home, replica_port, admin_key)
                procs.append(proc)
                started.append((root.resolve().name or str(root), proc.pid, url, tenant_key(url, admin_key)))
            os.environ["PYTHONPATH"] = inherited
            if args.bare_relay:
                proc, url = start_bare_relay(replica_port, Path(work))
                procs.append(proc)
                started.append(("bare relay", proc.pid, url, "none"))
            print(
                f"Gateway CPU (fake upstream): {args.tokens} tokens/response at {args.token_delay_ms:g} ms/token, "
                f"{args.concurrency} streams, {args.requests} requests x {args.rounds} rounds; {os.cpu_count()} CPUs",
                flush=True,
            )

            async def run() -> None:
                limits = httpx.Limits(
                    max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8
                )
                trees = [
                    Tree(
                        name,
                        pid,
                        httpx.AsyncClient(
                            base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=120
                        ),
                    )
                    for name, pid, url, key in started
                ]
                try:
                    await measure(args, trees, replica_port)
                finally:
                    for tree in trees:
                        await tree.http.aclose()
                report(trees)

            asyncio.run(run())
    finally:
        for proc in [*procs, replica]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except Exception:
                    proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
