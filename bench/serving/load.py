"""Load generation in worker processes, so the clients never share a core (or a GIL) with what they measure.

A job is a list of streamed requests, run ``concurrency`` at a time by one worker process, starting at an agreed
wall-clock instant; a level of load is split over several workers. Per request: time to the first token, total
time, tokens (the final usage), and the gaps between streamed outputs.

  direct:  gRPC ``Generate`` on the inference replica (raw prompt, ``adapter`` = store name or "" for the base)
  gateway: ``POST /v1/completions`` with ``stream: true`` (SSE) through the gateway, with a tenant API key
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any


@dataclass
class Job:
    path: str  # "direct" or "gateway"
    target: str  # "127.0.0.1:port" (direct) or "http://127.0.0.1:port" (gateway)
    calls: list[tuple[str, str]]  # (adapter store name / gateway model id, prompt)
    max_tokens: int
    concurrency: int
    start_at: float  # time.time() at which the first requests go out
    key: str = ""  # the gateway's API key
    base_model: str = ""  # the gateway's model id of the base model (used when the adapter is "")
    first_delays: list[float] = field(default_factory=list)  # per stream: seconds after start_at of its first request
    http_client: str = "httpx"  # gateway path: "httpx" (what the openai SDK uses) or "lean" (serving/lean_http.py)


@dataclass
class Sample:
    start: float  # time.time()
    ttft: float
    total: float
    tokens: int
    gaps: list[float] = field(default_factory=list)  # between successive outputs, divided by their tokens (direct)
    error: str = ""


@dataclass
class JobResult:
    samples: list[Sample]
    cpu_s: float  # the worker's CPU time during the job
    started: float
    ended: float


async def _direct_call(stub: Any, adapter: str, prompt: str, max_tokens: int) -> Sample:
    from lorafleet.inference.v1 import inference_pb2 as pb

    request = pb.GenerateRequest(
        adapter=adapter,
        prompt=prompt,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    start, t0 = time.time(), time.perf_counter()
    first = last = None
    tokens, gaps = 0, []
    async for chunk in stub.Generate(request, timeout=900):
        if not chunk.token_count:
            continue
        now = time.perf_counter()
        if first is None:
            first = now
        elif last is not None:
            gaps.append((now - last) / chunk.token_count)
        last = now
        tokens += chunk.token_count
    end = time.perf_counter()
    return Sample(start, (first or end) - t0, end - t0, tokens, gaps)


def _completion_body(job: Job, model: str, prompt: str) -> dict[str, Any]:
    return {
        "model": model or job.base_model,
        "prompt": prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


async def _gateway_call(http: Any, job: Job, model: str, prompt: str) -> Sample:
    start, t0 = time.time(), time.perf_counter()
    async with http.stream("POST", "/v1/completions", json=_completion_body(job, model, prompt)) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        return await _sample_of_events(_data_lines(response.aiter_lines()), start, t0)


async def _lean_gateway_call(conn: Any, job: Job, model: str, prompt: str) -> Sample:
    from serving.lean_http import sse_events

    body = json.dumps(_completion_body(job, model, prompt)).encode()
    start, t0 = time.time(), time.perf_counter()
    return await _sample_of_events(sse_events(conn.post_stream("/v1/completions", body)), start, t0)


async def _data_lines(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    async for line in lines:
        if line.startswith("data: "):
            yield line[6:]


async def _sample_of_events(events: AsyncIterator[str | bytes], start: float, t0: float) -> Sample:
    """A streamed completion's Sample from its SSE ``data:`` payloads (read to the end)."""
    first = last = None
    tokens, gaps = 0, []
    async for data in events:
        if data in ("[DONE]", b"[DONE]"):
            continue
        event = json.loads(data)
        if "error" in event:
            raise RuntimeError(f"error event: {event['error']}")
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if event.get("choices") and event["choices"][0].get("text"):
            now = time.perf_counter()
            if first is None:
                first = now
            elif last is not None:
                gaps.append(now - last)  # an SSE event carries text, not a token count
            last = now
    end = time.perf_counter()
    return Sample(start, (first or end) - t0, end - t0, tokens, gaps)


async def _run(job: Job) -> JobResult:
    import grpc
    import httpx

    from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
    from serving.lean_http import LeanConnection

    queue = list(reversed(job.calls))
    samples: list[Sample] = []
    channel = http = None
    conns: list[LeanConnection] = []
    headers = {"Authorization": f"Bearer {job.key}"}
    if job.path == "direct":
        channel = grpc.aio.insecure_channel(job.target)
        await channel.channel_ready()
        stub = pb_grpc.InferenceServiceStub(channel)

        def one(adapter: str, prompt: str, stream: int) -> Any:
            return _direct_call(stub, adapter, prompt, job.max_tokens)
    elif job.http_client == "lean":
        conns = [LeanConnection(job.target, headers) for _ in range(job.concurrency)]
        # Open the connections before the start: a level measures requests, not TCP handshakes.
        await asyncio.gather(*(conn.get("/health") for conn in conns))

        def one(adapter: str, prompt: str, stream: int) -> Any:
            return _lean_gateway_call(conns[stream], job, adapter, prompt)
    else:
        limits = httpx.Limits(max_connections=job.concurrency + 4, max_keepalive_connections=job.concurrency + 4)
        http = httpx.AsyncClient(base_url=job.target, headers=headers, limits=limits, timeout=900)
        await asyncio.gather(*(http.get("/health") for _ in range(job.concurrency)))

        def one(adapter: str, prompt: str, stream: int) -> Any:
            return _gateway_call(http, job, adapter, prompt)

    async def worker(delay: float, stream: int) -> None:
        await asyncio.sleep(delay)
        while queue:
            adapter, prompt = queue.pop()
            try:
                samples.append(await one(adapter, prompt, stream))
            except Exception as exc:  # counted and reported, never dropped silently
                samples.append(Sample(time.time(), 0.0, 0.0, 0, error=repr(exc)[:300]))

    await asyncio.sleep(max(0.0, job.start_at - time.time()))
    cpu0, started = time.process_time(), time.time()
    delays = job.first_delays or [0.0] * job.concurrency
    await asyncio.gather(*(worker(delay, stream) for stream, delay in enumerate(delays)))
    ended, cpu = time.time(), time.process_time() - cpu0
    if channel is not None:
        await channel.close()
    if http is not None:
        await http.aclose()
    await asyncio.gather(*(conn.close() for conn in conns))
    return JobResult(samples, cpu, started, ended)


def _worker_main(conn: Connection) -> None:
    import grpc  # noqa: F401  (imported before the first job)
    import httpx  # noqa: F401

    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(asyncio.run(_run(job)))
        except BaseException as exc:
            conn.send(exc)


@dataclass
class Level:
    """What one level of load gave: every sample, the wall time from the agreed start, clients' CPU."""

    samples: list[Sample]
    wall_s: float
    client_cpu_s: list[float]
    start_skew_s: float  # how much later the last worker started than the first

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    @property
    def errors(self) -> list[str]:
        return [s.error for s in self.samples if s.error]


class LoadPool:
    """N worker processes (spawned once, reused); ``run`` splits a level over as many as it needs."""

    def __init__(self, workers: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        for _ in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)

    def run(
        self,
        path: str,
        target: str | list[str],
        calls: list[tuple[str, str]],
        max_tokens: int,
        concurrency: int,
        spread_s: float = 0.0,
        **extra: Any,
    ) -> Level:
        """``calls`` split over the workers (round robin), ``concurrency`` in flight in all; a list of targets is
        spread over the workers too. ``spread_s``: the streams' first requests go out evenly over this long instead
        of at once (requests of one length, started together, otherwise stay in step and arrive in bursts)."""
        targets = [target] if isinstance(target, str) else target
        jobs = min(len(self._conns), concurrency, len(calls))
        start_at = time.time() + 0.5 + 0.02 * concurrency  # time for every worker to open its connections
        sent = []
        for i in range(jobs):
            share = concurrency // jobs + (1 if i < concurrency % jobs else 0)
            delays = [(i + j * jobs) * spread_s / concurrency for j in range(share)]  # stream i + j*jobs of the level
            job = Job(
                path,
                targets[i % len(targets)],
                calls[i::jobs],
                max_tokens,
                share,
                start_at,
                first_delays=delays,
                **extra,
            )
            self._conns[i].send(job)
            sent.append(self._conns[i])
        results = []
        for conn in sent:
            result = conn.recv()
            if isinstance(result, BaseException):
                raise result
            results.append(result)
        samples = [s for r in results for s in r.samples]
        first = min(r.started for r in results)
        wall = max(r.ended for r in results) - first
        return Level(samples, wall, [r.cpu_s for r in results], max(r.started for r in results) - first)

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
