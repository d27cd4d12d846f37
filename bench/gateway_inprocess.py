"""Gateway CPU per request and per streamed token, in-process: the ASGI app called directly (no HTTP server or
client), so only the gateway's own work on its event loop is measured (main-thread CPU), with far less noise than
bench/gateway_cpu.py's whole-process numbers. The gRPC call to a paced fake replica (bench/fake_replica.py, its own
process) is included, as in production.

Per round: ``--requests`` streamed chat requests with max_tokens=1, then as many at the replica's full length,
``--concurrency`` at a time, with a tenant key (authentication, rate limits, routing and metrics on the path).
CPU per request is the 1-token figure, CPU per further token the slope between the two. Medians over rounds.

    python bench/gateway_inprocess.py                              # this checkout
    python bench/gateway_inprocess.py --trees /tmp/old .           # alternating rounds, one process per tree and round
    python bench/gateway_inprocess.py --profile /tmp/gw.prof       # cProfile of the 1-token requests of one round
    python bench/gateway_inprocess.py --model adapter              # an adapter request (reads the store's LATEST)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
from gateway import MODEL, start_replica  # bench/ is on sys.path: this file runs as a script

HERE = Path(__file__).resolve().parent
BARE_RELAY = Path("bare-relay")  # as a --trees entry: bench/bare_relay.py's app, the floor
ADMIN_KEY = "bench-admin-0123456789abcdef"
ADAPTER = "bench-adapter"

Asgi = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def call(app: Asgi, method: str, path: str, key: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request straight into the ASGI app; returns status and the whole body. After the body was received,
    receive() waits until the response is complete, then reports the disconnect, as a server would."""
    headers = [(b"host", b"bench"), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    headers.append((b"authorization", f"Bearer {key}".encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    done = asyncio.Event()
    delivered = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                done.set()

    await app(scope, receive, send)
    done.set()
    return status, b"".join(chunks)


async def load(app: Asgi, key: str, body: bytes, concurrency: int, requests: int) -> None:
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            status, text = await call(app, "POST", "/v1/chat/completions", key, body)
            if status != 200 or not text.endswith(b"data: [DONE]\n\n"):
                raise SystemExit(f"request failed: {status} {text[:300]!r}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def request_body(model: str, max_tokens: int | None) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": True}
    if max_tokens:
        body["max_tokens"] = max_tokens
    return json.dumps(body).encode()


async def tenant_key(app: Asgi) -> str:
    status, text = await call(app, "POST", "/v1/admin/tenants", ADMIN_KEY, b'{"id": "bench", "name": "Bench"}')
    assert status == 201, text
    limits = json.dumps({"rpm_limit": 10**8, "tpm_limit": 10**9}).encode()
    status, text = await call(app, "POST", "/v1/admin/tenants/bench/keys", ADMIN_KEY, limits)
    assert status == 201, text
    return str(json.loads(text)["key"])


@contextlib.asynccontextmanager
async def lifespan(app: Asgi) -> AsyncIterator[None]:
    """The ASGI lifespan protocol, as a server drives it (works for any ASGI app)."""
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    task = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, from_app.put))
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(f"start-up failed: {started}")
    try:
        yield
    finally:
        await to_app.put({"type": "lifespan.shutdown"})
        await from_app.get()
        await task


def publish_adapter(store: Any) -> None:
    """A store entry the catalog resolves (LATEST + metadata); the fake replica never loads it."""
    store.put(f"adapters/bench/{ADAPTER}/LATEST", b"v1")


async def measure_one_round(args: argparse.Namespace, replica_port: int, home: Path) -> dict[str, float]:
    from prometheus_client import CollectorRegistry

    from lorafleet_gateway.app import create_app
    from lorafleet_gateway.deps import GatewayDeps
    from lorafleet_gateway.settings import GatewaySettings

    if args.bare_relay:
        from bare_relay import relay

        app: Asgi = relay(f"127.0.0.1:{replica_port}")
        return await measure_app(args, app, lambda: asyncio.sleep(0, "none"), MODEL)
    settings = GatewaySettings(
        admin_key=ADMIN_KEY,
        home=home,
        base_model=MODEL,
        inference_targets=[f"127.0.0.1:{replica_port}"],
        trainer_target="127.0.0.1:9",
    )
    store = settings.open_store()
    app = create_app(settings, GatewayDeps(store=store, registry=CollectorRegistry()))
    model = MODEL
    if args.model == "adapter":
        publish_adapter(store)
        model = ADAPTER
    return await measure_app(args, app, lambda: tenant_key(app), model)


async def measure_app(
    args: argparse.Namespace, app: Asgi, make_key: Callable[[], Awaitable[str]], model: str
) -> dict[str, float]:
    async with lifespan(app):
        key = await make_key()
        one, full = request_body(model, 1), request_body(model, None)
        await load(app, key, one, 4, 100)  # warm up: connections, caches, lazy imports
        await load(app, key, full, 4, 20)
        profiler = cProfile.Profile() if args.profile else None
        before = time.thread_time()
        if profiler:
            profiler.enable()
        await load(app, key, one, args.concurrency, args.requests)
        if profiler:
            profiler.disable()
            profiler.dump_stats(args.profile)
        middle = time.thread_time()
        if args.tokens > 1:
            await load(app, key, full, args.concurrency, args.requests)
        after = time.thread_time()
    per_request = (middle - before) / args.requests * 1e6
    per_token = ((after - middle) - (middle - before)) / args.requests / max(1, args.tokens - 1) * 1e6
    return {"request_us": per_request, "token_us": per_token}


def run_trees(args: argparse.Namespace) -> None:
    results: dict[Path, list[dict[str, float]]] = {tree: [] for tree in args.trees}
    inherited = os.environ.get("PYTHONPATH", "")
    for round_ in range(args.rounds):
        for tree in args.trees if round_ % 2 == 0 else args.trees[::-1]:
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join([str(tree.resolve() / "services/gateway/src"), inherited])
            )
            command = [sys.executable, __file__, "--rounds", "1", "--json", "--requests", str(args.requests)]
            command += ["--concurrency", str(args.concurrency), "--model", args.model, "--tokens", str(args.tokens)]
            if tree == BARE_RELAY:
                command.append("--bare-relay")
            out = subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=600).stdout
            results[tree].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    report({str(tree): rows for tree, rows in results.items()})


def report(results: dict[str, list[dict[str, float]]]) -> None:
    med = statistics.median
    print(f"{'tree':>24} | {'main-thread CPU/request':>24} | {'CPU/further token':>17}")
    for name, rows in results.items():
        one = [r["request_us"] for r in rows]
        token = [r["token_us"] for r in rows]
        print(f"{name[-24:]:>24} | {med(one):>7.0f} us ({min(one):.0f}-{max(one):.0f}) | {med(token):>14.1f} us")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", type=Path, help="repository copies to compare (alternating rounds)")
    parser.add_argument("--tokens", type=int, default=32, help="full response length (default 32)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests at once (default 8)")
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement (default 400)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, medians reported (default 4)")
    parser.add_argument("--model", choices=("base", "adapter"), default="base", help="what the requests name")
    parser.add_argument("--bare-relay", action="store_true", help="measure bench/bare_relay.py instead (the floor)")
    parser.add_argument("--profile", help="write a cProfile of one round's 1-token requests here")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one round's numbers, for --trees
    args = parser.parse_args()
    if args.trees:
        run_trees(args)
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    replica, port = start_replica(args.tokens, 0.5)
    try:
        rows = []
        for _ in range(args.rounds):
            # uvloop, as the gateway's main.py runs it (asyncio's own loop costs more per request and token).
            with (
                tempfile.TemporaryDirectory(prefix="lorafleet-inprocess-") as home,
                asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner,
            ):
                rows.append(runner.run(measure_one_round(args, port, Path(home))))
        if args.json:
            print(json.dumps(rows[-1]))
        else:
            report({"this tree": rows})
    finally:
        replica.terminate()
        replica.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
