"""Gateway overhead: the same streaming load through the gateway and straight to an inference replica.

Starts a paced fake replica (bench/fake_replica.py, its own process) and the real gateway
(`python -m lorafleet_gateway`, its own process, SQLite, a tenant API key so auth and rate limits
are on the path), then at each concurrency runs the same number of streamed chat requests
  * direct:  gRPC Generate on the replica, and
  * gateway: POST /v1/chat/completions with stream=true (SSE) through the gateway,
and prints time to first token and total time (p50/p99), what the gateway adds, and the
throughput ratio gateway/direct.

    python bench/gateway.py                 # full run (about a minute)
    python bench/gateway.py --quick         # smoke run (seconds)
    python bench/gateway.py --gateway-workers 1,8   # one gateway per worker count, each level through each
    python bench/gateway.py --http-client httpx,lean   # each gateway through httpx (the openai SDK's client) and
        # through bench/serving/lean_http.py, whose own cost is next to none: what the gateway itself adds
    python bench/gateway.py --clients 8 --gateway-workers 1,4 --bare-relay --interleave 8 [--spread-s 0.64]
        # load from 8 processes; bench/bare_relay.py (the floor) as one more column; every level in 8 rounds
        # alternating the paths, pooled per path (a drift of the machine hits every path alike); with
        # --spread-s the streams start spread over that time (one request's length: steady arrivals) instead
        # of in one burst
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import serving.stack  # bench/ is on sys.path: this file runs as a script
from serving.stack import free_port, tree_cpu_seconds

from lorafleet.inference.v1 import inference_pb2, inference_pb2_grpc

HERE = Path(__file__).resolve().parent
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0

    def pct(self, attr: str, q: float) -> float:
        values = sorted(getattr(s, attr) for s in self.samples)
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))] if values else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s if self.wall_s else 0.0


async def load(concurrency: int, requests: int, one: Callable[[], Awaitable[Sample]]) -> Run:
    """``requests`` calls of ``one``, ``concurrency`` at a time."""
    run = Run()
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            try:
                run.samples.append(await one())
            except Exception as exc:  # counted and shown, never silently dropped
                run.errors += 1
                print(f"  request failed: {exc!r}", file=sys.stderr)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.wall_s = time.perf_counter() - started
    return run


def direct_call(stub: Any) -> Callable[[], Awaitable[Sample]]:
    request = inference_pb2.GenerateRequest(
        chat=inference_pb2.ChatInput(messages=[inference_pb2.ChatMessage(role="user", content="hello")]),
        sampling=inference_pb2.SamplingParams(),
    )

    async def one() -> Sample:
        started = time.perf_counter()
        first = None
        tokens = 0
        async for chunk in stub.Generate(request, timeout=120):
            if first is None:
                first = time.perf_counter()
            tokens += chunk.token_count
        end = time.perf_counter()
        return Sample((first or end) - started, end - started, tokens)

    return one


def chat_body(max_tokens: int | None) -> dict[str, object]:
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    return body


async def chat_sample(events: AsyncIterator[object], started: float) -> Sample:
    """A streamed chat completion's Sample from its SSE data events, [DONE] included, read to the end."""
    first = None
    count = 0
    async for _ in events:
        count += 1
        if count == 2:  # event 1 is the role chunk; event 2 the first token
            first = time.perf_counter()
    end = time.perf_counter()
    return Sample((first or end) - started, end - started, max(0, count - 2))  # minus role and [DONE]


def gateway_call(http: httpx.AsyncClient, max_tokens: int | None = None) -> Callable[[], Awaitable[Sample]]:
    body = chat_body(max_tokens)

    async def one() -> Sample:
        started = time.perf_counter()
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code} {(await response.aread())[:200]!r}")
            lines = response.aiter_lines()
            return await chat_sample((line async for line in lines if line.startswith("data: ")), started)

    return one


def lean_gateway_call(url: str, key: str, max_tokens: int | None = None) -> Callable[[], Awaitable[Sample]]:
    """``gateway_call`` through serving/lean_http.py: keep-alive connections reused from a free list."""
    from serving.lean_http import LeanConnection, sse_events

    payload = json.dumps(chat_body(max_tokens)).encode()
    idle: list[LeanConnection] = []

    async def one() -> Sample:
        conn = idle.pop() if idle else LeanConnection(url, {"Authorization": f"Bearer {key}"})
        # read to the end (chat_sample does): the connection is then reusable
        sample = await chat_sample(sse_events(conn.post_stream("/v1/chat/completions", payload)), time.perf_counter())
        idle.append(conn)
        return sample

    return one


def start_replica(tokens: int, delay_ms: float) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "fake_replica.py"), "--tokens", str(tokens), "--token-delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        proc.kill()
        raise SystemExit("the fake replica did not start")
    return proc, int(line[1])


def start_bare_relay(replica_port: int, logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """bench/bare_relay.py in front of the fake replica, ready; its log in ``logs``."""
    relay, url = serving.stack.start_bare_relay(logs, f"127.0.0.1:{replica_port}", "")
    serving.stack.wait_ready(relay, url, 30)
    return relay.proc, url


def start_gateway(
    home: Path, replica_port: int, admin_key: str, workers: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
    env.update(
        LORAFLEET_GATEWAY_WORKERS=str(workers),
        LORAFLEET_HOME=str(home),
        LORAFLEET_ADMIN_KEY=admin_key,
        LORAFLEET_BASE_MODEL=MODEL,
        LORAFLEET_LOG_LEVEL="WARNING",
        LORAFLEET_GATEWAY_PORT=str(port),
        LORAFLEET_GATEWAY_INFERENCE_TARGETS=f"127.0.0.1:{replica_port}",
        LORAFLEET_GATEWAY_TRAINER_TARGET="127.0.0.1:9",  # unused here
    )
    log = (home / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet_gateway"], env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the gateway exited:\n{(home / 'gateway.log').read_text()[-2000:]}")
        try:
            ready = httpx.get(f"{url}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            ready = False
        # Every worker listening: a connection opened before a worker listens never reaches it (SO_REUSEPORT).
        if ready and (workers == 1 or listening_workers(proc.pid, port) == workers):
            return proc, url
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the gateway did not become ready")


def listening_workers(supervisor_pid: int, port: int) -> int:
    """How many of a gateway's worker processes listen on ``port`` now (Linux /proc; 0 elsewhere)."""
    try:
        listening = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    listening.add(fields[9])  # the socket's inode
        children = [
            int(c) for t in Path(f"/proc/{supervisor_pid}/task").iterdir() for c in (t / "children").read_text().split()
        ]
    except OSError:
        return 0
    count = 0
    for child in children:
        try:
            links = {os.readlink(fd) for fd in Path(f"/proc/{child}/fd").iterdir()}
        except OSError:
            continue
        count += any(f"socket:[{inode}]" in links for inode in listening)
    return count


def tenant_key(url: str, admin_key: str) -> str:
    """A tenant with generous limits, so the benchmark pays for auth and rate limiting like real traffic."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    httpx.post(f"{url}/v1/admin/tenants", json={"id": "bench", "name": "Bench"}, headers=admin).raise_for_status()
    limits = {"rpm_limit": 10**8, "tpm_limit": 10**9}
    created = httpx.post(f"{url}/v1/admin/tenants/bench/keys", json=limits, headers=admin)
    created.raise_for_status()
    return str(created.json()["key"])


@dataclass
class Gateway:
    workers: int  # 0: the bare relay (bench/bare_relay.py), the floor any Python relay of this design sits on
    url: str
    key: str
    pid: int

    @property
    def label(self) -> str:
        return str(self.workers) if self.workers else "bare"


def measure_with_clients(args: argparse.Namespace, replica_port: int, gateways: list[Gateway]) -> list[dict[str, Any]]:
    """``measure`` with the load sent from ``args.clients`` processes (serving/load.py): at 64 streams one client
    event loop is itself busy for tens of ms sending a burst and parsing its events. Completions, not chat.

    With ``args.interleave`` N, each level runs as N rounds, every round direct and then each gateway in turn,
    and each path's rounds are pooled: a drift of the machine over the level (another tenant, clocks) then hits
    every path alike instead of the one measured at that moment."""
    from serving.load import Level, LoadPool

    pool = LoadPool(args.clients)
    direct_target, rows = f"127.0.0.1:{replica_port}", []
    # Every gateway through every HTTP client: a path each.
    paths = [(g, client) for g in gateways for client in args.http_client]
    path_kw = [{"key": g.key, "base_model": MODEL, "http_client": client} for g, client in paths]
    try:
        pool.run("direct", direct_target, [("", "hello")] * 8, args.tokens, 4)  # warm-up
        for (gateway, _), kw in zip(paths, path_kw, strict=True):
            pool.run("gateway", gateway.url, [("", "hello")] * 8 * max(1, gateway.workers), args.tokens, 8, **kw)
        for concurrency in args.concurrency:
            count = args.requests or max(args.min_requests, args.rounds * concurrency)
            rounds = max(1, min(args.interleave, count // concurrency))
            calls = [("", "hello")] * -(-count // rounds)
            direct_levels: list[Level] = []
            levels: list[list[Level]] = [[] for _ in paths]
            cpu = [0.0 for _ in paths]
            for _ in range(rounds):
                direct_levels.append(pool.run("direct", direct_target, calls, args.tokens, concurrency, args.spread_s))
                for i, ((gateway, _), kw) in enumerate(zip(paths, path_kw, strict=True)):
                    cpu_before = tree_cpu_seconds(gateway.pid)
                    levels[i].append(
                        pool.run("gateway", gateway.url, calls, args.tokens, concurrency, args.spread_s, **kw)
                    )
                    cpu_after = tree_cpu_seconds(gateway.pid)
                    if cpu_before is None or cpu_after is None:
                        cpu[i] = float("nan")
                    else:
                        cpu[i] += cpu_after - cpu_before
            direct_run = pooled(direct_levels)
            for i, (gateway, client) in enumerate(paths):
                gateway_run = pooled(levels[i])
                rows.append(row(concurrency, len(gateway_run.samples) + gateway_run.errors, direct_run, gateway_run))
                label = gateway.label if len(args.http_client) == 1 else f"{gateway.label} {client}"
                rows[-1] |= {"workers": gateway.workers, "target": label, "rounds": rounds, "http_client": client}
                rows[-1] |= {"spread_s": args.spread_s}
                walls = [level.wall_s for level in levels[i]]
                rows[-1]["client_cpu_share"] = max(
                    max(level.client_cpu_s) / level.wall_s if level.wall_s else float("nan") for level in levels[i]
                )
                rows[-1]["round_walls_s"] = walls
                tokens = sum(s.tokens for s in gateway_run.samples)
                if tokens and not math.isnan(cpu[i]):
                    rows[-1]["gateway_cpu_us_per_token"] = cpu[i] / tokens * 1e6
                print_row(rows[-1])
    finally:
        pool.close()
    return rows


def pooled(levels: list[Any]) -> Run:
    """Rounds of one path as one run: every successful sample, errors counted, the rounds' wall times summed."""
    samples = [Sample(s.ttft, s.total, s.tokens) for level in levels for s in level.samples if not s.error]
    return Run(samples, sum(level.wall_s for level in levels), sum(len(level.errors) for level in levels))


async def measure(args: argparse.Namespace, replica_port: int, gateways: list[Gateway]) -> list[dict[str, Any]]:
    """At each level: direct, then through each gateway in turn, each compared with that level's direct run."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{replica_port}")
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8, max_keepalive_connections=max(args.concurrency))
    rows = []
    clients = [
        httpx.AsyncClient(base_url=g.url, headers={"Authorization": f"Bearer {g.key}"}, limits=limits, timeout=120)
        for g in gateways
    ]
    direct = direct_call(stub)
    # Every gateway through every HTTP client: a path each.
    paths = [(g, client) for g in gateways for client in args.http_client]
    throughs = [
        gateway_call(http) if client == "httpx" else lean_gateway_call(g.url, g.key)
        for (g, client), http in zip(paths, [c for c in clients for _ in args.http_client], strict=True)
    ]
    await load(4, 8, direct)  # warm up every path (connections, caches)
    for through in throughs:
        await load(4, 8 * max(max(1, g.workers) for g in gateways), through)
    for concurrency in args.concurrency:
        count = args.requests or max(args.min_requests, args.rounds * concurrency)
        direct_run = await load(concurrency, count, direct)
        for (gateway, client), through in zip(paths, throughs, strict=True):
            cpu_before, client_before = tree_cpu_seconds(gateway.pid), time.process_time()
            gateway_run = await load(concurrency, count, through)
            cpu_after, client_cpu = tree_cpu_seconds(gateway.pid), time.process_time() - client_before
            rows.append(row(concurrency, count, direct_run, gateway_run))
            label = gateway.label if len(args.http_client) == 1 else f"{gateway.label} {client}"
            rows[-1] |= {"workers": gateway.workers, "target": label, "rounds": 1, "http_client": client}
            # near 1: this benchmark's own client (one event loop) set the pace, not the gateway
            rows[-1]["client_cpu_share"] = client_cpu / gateway_run.wall_s if gateway_run.wall_s else float("nan")
            tokens = sum(s.tokens for s in gateway_run.samples)
            if cpu_before is not None and cpu_after is not None and tokens:
                rows[-1]["gateway_cpu_us_per_token"] = (cpu_after - cpu_before) / tokens * 1e6
            print_row(rows[-1])
    for http in clients:
        await http.aclose()
    await channel.close()
    return rows


def row(concurrency: int, count: int, direct: Run, gateway: Run) -> dict[str, Any]:
    ms = 1000.0
    return {
        "concurrency": concurrency,
        "requests": count,
        "direct_ttft_p50_ms": direct.pct("ttft_s", 0.5) * ms,
        "direct_ttft_p99_ms": direct.pct("ttft_s", 0.99) * ms,
        "gateway_ttft_p50_ms": gateway.pct("ttft_s", 0.5) * ms,
        "gateway_ttft_p99_ms": gateway.pct("ttft_s", 0.99) * ms,
        "added_ttft_p50_ms": (gateway.pct("ttft_s", 0.5) - direct.pct("ttft_s", 0.5)) * ms,
        "added_ttft_p99_ms": (gateway.pct("ttft_s", 0.99) - direct.pct("ttft_s", 0.99)) * ms,
        "added_total_p50_ms": (gateway.pct("total_s", 0.5) - direct.pct("total_s", 0.5)) * ms,
        "added_total_p99_ms": (gateway.pct("total_s", 0.99) - direct.pct("total_s", 0.99)) * ms,
        "direct_tokens_per_s": direct.tokens_per_s,
        "gateway_tokens_per_s": gateway.tokens_per_s,
        "throughput_ratio": gateway.tokens_per_s / direct.tokens_per_s if direct.tokens_per_s else float("nan"),
        "errors": direct.errors + gateway.errors,
    }


HEADER = (
    f"{'streams':>7} {'path':>10} {'requests':>8} | {'direct TTFT p50/p99':>19} | {'gateway TTFT p50/p99':>20} | "
    f"{'added TTFT p50/p99':>18} | {'added total p50/p99':>19} | {'direct tok/s':>12} {'gw tok/s':>9} "
    f"{'ratio':>6} {'errors':>6} {'gw CPU/token':>12}"
)


def print_row(r: dict[str, Any]) -> None:
    def pair(a: str, b: str) -> str:
        return f"{r[a]:.1f} / {r[b]:.1f} ms"

    print(
        f"{r['concurrency']:>7} {r['target']:>10} {r['requests']:>8} | "
        f"{pair('direct_ttft_p50_ms', 'direct_ttft_p99_ms'):>19} | "
        f"{pair('gateway_ttft_p50_ms', 'gateway_ttft_p99_ms'):>20} | "
        f"{pair('added_ttft_p50_ms', 'added_ttft_p99_ms'):>18} | "
        f"{pair('added_total_p50_ms', 'added_total_p99_ms'):>19} | "
        f"{r['direct_tokens_per_s']:>12.0f} {r['gateway_tokens_per_s']:>9.0f} {r['throughput_ratio']:>6.3f} "
        f"{r['errors']:>6} {cpu_per_token(r):>12}",
        flush=True,
    )


def cpu_per_token(r: dict[str, Any]) -> str:
    value = r.get("gateway_cpu_us_per_token")
    return "n/a" if value is None else f"{value:.0f} us"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=32, help="tokens per response (default 32)")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="replica pace (default 20 ms/token)")
    parser.add_argument("--rounds", type=int, default=4, help="requests per level = rounds x concurrency ...")
    parser.add_argument("--min-requests", type=int, default=32, help="... but at least this many (default 32)")
    parser.add_argument("--requests", type=int, default=0, help="fixed requests per level (overrides the two above)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 tokens at 2 ms, one round per level")
    parser.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    parser.add_argument(
        "--gateway-workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        help="one gateway per value, with that many worker processes (LORAFLEET_GATEWAY_WORKERS); default 1",
    )
    parser.add_argument(
        "--clients", type=int, default=0, help="send the load from N client processes (default: this process)"
    )
    parser.add_argument(
        "--bare-relay", action="store_true", help="also measure bench/bare_relay.py (the floor) as one more gateway"
    )
    parser.add_argument(
        "--interleave",
        type=int,
        default=1,
        help="with --clients: run each level as N rounds alternating direct and every gateway (default 1)",
    )
    parser.add_argument(
        "--http-client",
        type=lambda s: s.split(","),
        default=["httpx"],
        help="the HTTP client(s) of the gateway paths, each a path of its own: httpx (what the openai "
        "SDK uses; its own cost counts as the gateway's) or lean (bench/serving/lean_http.py: next to none; what "
        "the gateway itself adds). Default httpx",
    )
    parser.add_argument(
        "--spread-s",
        type=float,
        default=0.0,
        help="with --clients: each level's streams start evenly over this many seconds, not at once (default 0: "
        "a burst; requests of one length then stay in step)",
    )
    args = parser.parse_args()
    if (args.interleave > 1 or args.spread_s) and not args.clients:
        parser.error("--interleave and --spread-s need --clients")
    if set(args.http_client) - {"httpx", "lean"}:
        parser.error(f"--http-client: httpx or lean, not {args.http_client}")
    if args.quick:
        args.tokens, args.token_delay_ms, args.rounds, args.min_requests = 4, 2.0, 1, 4

    replica, replica_port = start_replica(args.tokens, args.token_delay_ms)
    admin_key = "bench-admin-" + secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-") as home:
        procs: list[subprocess.Popen[Any]] = []
        try:
            gateways = []
            for i, workers in enumerate(args.gateway_workers):
                (Path(home) / str(i)).mkdir()
                gateway, url = start_gateway(Path(home) / str(i), replica_port, admin_key, workers)
                procs.append(gateway)
                gateways.append(Gateway(workers, url, tenant_key(url, admin_key), gateway.pid))
            if args.bare_relay:
                relay, url = start_bare_relay(replica_port, Path(home))
                procs.append(relay)
                # the relay checks no key; it gets a header of a real key's length all the same
                gateways.append(Gateway(0, url, "unchecked-" + secrets.token_hex(16), relay.pid))
            print(
                f"Gateway overhead (fake upstream): {args.tokens} tokens/response at {args.token_delay_ms:g} ms/token; "
                f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.machine()}"
            )
            print(HEADER, flush=True)
            if args.clients:
                rows = measure_with_clients(args, replica_port, gateways)
            else:
                rows = asyncio.run(measure(args, replica_port, gateways))
        finally:
            for proc in (*procs, replica):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
