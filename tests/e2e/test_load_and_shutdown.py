"""Load, soak and graceful shutdown (issue 7), on the services' real processes (``python -m lorafleet_<service>``).

1. trainer: SIGTERM while a job is RUNNING; the job goes back to the queue (not failed, not lost), the worker's
   process group is gone, the trainer exits 0 in time; restarted on the same home, the job resumes from its
   checkpoint and succeeds. It comes first: it needs no engine, so no idle one shares the two cores.
2. soak: many concurrent streams through the gateway in front of an inference replica (vLLM on the CPU, the
   embedded model) for a fixed time. Four tenants with two real LoRA adapters each: eight adapters for four
   engine slots, so adapters are swapped in and out under load; every tenant also uses the base model. Every
   stream must complete with its exact usage; the memory of both services is sampled during the soak.
3. gateway: SIGTERM to a second gateway while streams are mid-flight; they finish whole (usage chunk included),
   new connections are refused from the signal on, the process exits 0 within its graceful_shutdown_s.
4. inference: SIGTERM while short and long streams run; the short ones finish within the drain deadline, the
   long ones (more work than the deadline allows) end with an error event naming it, not a hang; a new request
   gets 503; the process exits 0. Then the last gateway stops: nothing the fleet started is left.

One replica serves tests 2-4 (an engine start costs a minute on two cores); they run in this order, the last
one stopping it. The summary lines (``-s``) are the figures of docs/reliability.md. SOAK_SECONDS and
SOAK_STREAMS (environment) make the soak longer or wider than CI's 60 s and 16 streams.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from lorafleet.trainer.v1 import trainer_pb2 as S
from lorafleet.trainer.v1 import trainer_pb2_grpc
from lorafleet_common.adapters import latest_key
from lorafleet_common.settings import EMBEDDED_BASE_MODEL as BASE_MODEL
from lorafleet_common.store import LocalStore
from tests.conftest import free_port
from tests.e2e.fault_fleet import service_home
from tests.e2e.load_fleet import (
    StreamResult,
    async_client,
    create_tenant_keys,
    percentile,
    publish_tenant_adapters,
    start_gateway,
    start_inference,
    start_trainer,
    stream_chat,
)
from tests.service_processes import ServiceProcess, descendants, group_members, wait_gone
from tests.trainer.conftest import seed_dataset, tiny_manifest

pytestmark = [pytest.mark.e2e, pytest.mark.engine, pytest.mark.timeout(600)]

CANCEL_GRACE_S, SHUTDOWN_GRACE_S = 5.0, 2.0  # LORAFLEET_TRAINER_CANCEL_GRACE_S, _SHUTDOWN_GRACE_S

TENANTS = ["acme", "globex", "initech", "umbrella"]
ADAPTERS = [(tenant, f"{tenant}-{kind}") for tenant in TENANTS for kind in ("support", "legal")]
STREAMS = int(os.environ.get("SOAK_STREAMS", "16"))
SOAK_S = float(os.environ.get("SOAK_SECONDS", "60"))
MAX_TOKENS = 24
RSS_SAMPLE_S = 2.0
# Growth allowed from the first full wave of streams to the end of the soak. Freed memory is not always given
# back to the OS, so these are ceilings that catch leaks, not measures of use; ~50 requests follow the first
# wave. Our two processes (the gateway; the inference service's gRPC server, adapter manager and streams) get
# 16 MiB: a leak of 0.5 MiB per request (a response or a stream's chunks kept) fails it, a smaller one passes.
# vLLM's CPU engine keeps oneDNN kernels per matmul shape, and every new batch size is a new shape: measured
# offline on the embedded model, 40 new batch sizes added 164 MiB and the same 40 again 0; a 360 s soak grew
# it 182 MiB in steps, one CI soak 50 MiB in 60 s. Its ceiling still fails a request's logits kept (24 tokens
# x 49,152 vocabulary x 4 bytes = 4.5 MiB).
RSS_GROWTH_LIMIT_MIB = {"gateway": 16.0, "inference service": 16.0, "vLLM engine": 192.0}

GATEWAY_GRACE_S = 60  # LORAFLEET_GATEWAY_GRACEFUL_SHUTDOWN_S of the drained gateway: room on a busy CI machine
# LORAFLEET_INFERENCE_DRAIN_TIMEOUT_S. Room for the short streams on a busy CI machine: one run there took 17 s for
# 12 tokens that take 2-3 s here. The long ones still cannot finish: 450 tokens (512-token context) would need
# 18 tokens/s per stream, 3-4 times what six streams get on two cores.
INFERENCE_DRAIN_S = 25
SHORT_TOKENS, LONG_TOKENS = 8, 450
DRAIN_TENANT = "acme"
DRAIN_MODELS = [BASE_MODEL, "acme-support", "acme-legal"]


# ----- 1. trainer --------------------------------------------------------------------------------------------------


def watch(port: int, job_id: str, timeout_s: float) -> Iterator[S.JobEvent]:
    """The job's events from the first, live, until it ends or the caller stops."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = trainer_pb2_grpc.TrainerServiceStub(channel)
        yield from stub.WatchJob(S.WatchJobRequest(job_id=job_id), timeout=timeout_s)


def test_trainer_requeues_the_running_job_on_sigterm_and_resumes_it_after_a_restart(tmp_path: Path) -> None:
    home = service_home(tmp_path / "home")
    store = LocalStore(home / "store")
    store.put("d.jsonl", seed_dataset())
    manifest = tiny_manifest(
        "drained", "d.jsonl#4", epochs=2, batch_size=1, checkpoint_every_steps=2, checkpoint_every_minutes=0
    )
    store.put("m.json", manifest)
    port = free_port()
    settings = {
        "torch_threads": 1,
        "cancel_grace_s": CANCEL_GRACE_S,
        "shutdown_grace_s": SHUTDOWN_GRACE_S,
        "job_poll_interval_s": 0.5,
    }
    trainer = start_trainer(home, port, **settings)
    restarted: ServiceProcess | None = None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            stub.CreateJob(S.CreateJobRequest(manifest_uri="m.json", job_id="drained"), timeout=30)
        checkpointed = step = 0
        for event in watch(port, "drained", 300):
            assert event.state != S.JOB_STATE_SUCCEEDED, "the job ended before the SIGTERM"
            if event.kind == "checkpoint":
                checkpointed = event.progress.step
            elif event.kind == "progress" and checkpointed and event.progress.step > checkpointed:
                step = event.progress.step
                break  # RUNNING, with a checkpoint behind it and a step beyond it
        workers = [p for p in trainer.tree() if p.pid != trainer.pid]
        assert workers, "no worker process while the job runs"
        code, took = trainer.terminate(CANCEL_GRACE_S + SHUTDOWN_GRACE_S + 30)
        print(f"\ntrainer: SIGTERM after step {step} (checkpoint at {checkpointed}): exit {code} in {took:.1f} s")
        assert code == 0, trainer.log_tail()
        # The worker is SIGTERMed first and needs no SIGKILL; the gRPC grace follows.
        assert took < CANCEL_GRACE_S + SHUTDOWN_GRACE_S + 5, trainer.log_tail()
        assert wait_gone(workers) == [] and group_members(trainer.pid) == []
        assert all(group_members(w.pid) == [] for w in workers)

        restarted = start_trainer(home, port, name="trainer-restarted", **settings)
        events = list(watch(port, "drained", 300))
        idle_code, idle_took = restarted.terminate(30)
    finally:
        for proc in (trainer, restarted):
            if proc is not None and proc.popen.poll() is None:
                proc.kill()
    states = [(e.kind, e.state, e.message) for e in events if e.kind == "state"]
    requeued = ("state", S.JOB_STATE_QUEUED, "re-queued: the trainer is shutting down")
    assert requeued in states, states  # recorded by the stopping trainer, not found at the next start
    assert not any("restarted while the job was" in message for _, _, message in states), states
    assert not any(e.state in (S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED) for e in events), states
    [resumed] = [m for _, state, m in states[states.index(requeued) :] if state == S.JOB_STATE_RUNNING]
    assert f"resumed from the checkpoint at step {checkpointed}" in resumed, resumed
    assert events[-1].kind == "published" and events[-1].state == S.JOB_STATE_SUCCEEDED
    assert store.get(latest_key("drained")) == b"drained"
    print(f"trainer: restarted, {resumed}; succeeded and published; idle stop: exit {idle_code} in {idle_took:.1f} s")
    assert idle_code == 0


# ----- 2. soak -----------------------------------------------------------------------------------------------


@dataclass
class Fleet:
    home: Path
    inference: ServiceProcess
    port: int  # the replica's gRPC port
    gateway: ServiceProcess  # stopped last, by the inference drain test
    url: str
    keys: dict[str, str]  # tenant -> API key
    baseline_children: set[int]

    def rss(self) -> dict[str, float]:
        """RSS (MiB) of the gateway's tree, of the inference service's own process, and of the vLLM engine it
        started (engine core, worker, multiprocessing's helper)."""
        inference = self.inference.rss_mib()
        return {
            "gateway": self.gateway.rss_mib()["tree"],
            "inference service": inference["main"],
            "vLLM engine": inference["tree"] - inference["main"],
        }


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, embedded_model_path: Path) -> Iterator[Fleet]:
    baseline = descendants()  # other suites' servers (a session's PostgreSQL, ...) are not ours to check
    home = service_home(tmp_path_factory.mktemp("fleet") / "home")
    publish_tenant_adapters(home, embedded_model_path, ADAPTERS)
    started: list[ServiceProcess] = []
    try:
        inference, port = start_inference(home, max_loras=4, max_cpu_loras=8, drain_timeout_s=INFERENCE_DRAIN_S)
        started.append(inference)
        # A first token may wait for an engine slot behind many streams on a busy 2-core CI machine: the
        # gateway's default (60 s) would turn CI overload into failures these tests are not about.
        gateway, url = start_gateway(home, port, first_token_timeout_s=240)
        started.append(gateway)
        yield Fleet(home, inference, port, gateway, url, create_tenant_keys(url, TENANTS), baseline)
    finally:
        for proc in reversed(started):  # the last test stops them; this only cleans up after a failure
            if proc.popen.poll() is None:
                proc.kill()


def request_plan() -> Iterator[tuple[str, str]]:
    """(tenant, model) round robin: each tenant's two adapters and the base model."""
    plan = [(tenant, model) for tenant in TENANTS for model in (f"{tenant}-support", BASE_MODEL, f"{tenant}-legal")]
    return itertools.cycle(plan)


async def run_load(fleet: Fleet, seconds: float, streams: int, results: list[StreamResult]) -> None:
    """``streams`` workers, each starting a new stream as soon as its last one ended, until ``seconds`` pass."""
    clients = {tenant: async_client(fleet.url, key, timeout_s=300) for tenant, key in fleet.keys.items()}
    plan = request_plan()
    deadline = time.monotonic() + seconds

    async def worker(index: int) -> None:
        for n in itertools.count():
            if time.monotonic() >= deadline:
                return
            tenant, model = next(plan)
            prompt = f"Request {index}.{n}: write a short note for the {tenant} team."
            results.append(await stream_chat(clients[tenant], model, prompt, MAX_TOKENS))

    try:
        await asyncio.gather(*(worker(i) for i in range(streams)))
    finally:
        for client in clients.values():
            await client.close()


async def sample_rss(fleet: Fleet, results: list[StreamResult], samples: list[tuple[int, dict[str, float]]]) -> None:
    """(requests finished, RSS by service) every RSS_SAMPLE_S until cancelled."""
    while True:
        samples.append((len(results), await asyncio.to_thread(fleet.rss)))
        await asyncio.sleep(RSS_SAMPLE_S)


def assert_exact(results: list[StreamResult]) -> None:
    failed = [r for r in results if not r.complete]
    assert not failed, f"{len(failed)} of {len(results)} streams failed: {[(r.model, r.error) for r in failed[:5]]}"
    inexact = [
        r for r in results if (r.completion_tokens, r.tokens, r.finish_reason) != (MAX_TOKENS,) * 2 + ("length",)
    ]
    assert not inexact, [(r.model, r.tokens, r.completion_tokens, r.finish_reason) for r in inexact[:5]]


async def test_soak_many_streams_over_many_adapters(fleet: Fleet) -> None:
    # Warm-up: every adapter fetched, validated and loaded once, every model's first request served.
    warm_plan = ADAPTERS + [(tenant, BASE_MODEL) for tenant in TENANTS]
    clients = [async_client(fleet.url, fleet.keys[tenant]) for tenant, _ in warm_plan]
    warm = await asyncio.gather(
        *(stream_chat(c, m, "Warm up.", MAX_TOKENS) for c, (_, m) in zip(clients, warm_plan, strict=True))
    )
    for client in clients:
        await client.close()
    assert_exact(list(warm))

    results: list[StreamResult] = []
    samples: list[tuple[int, dict[str, float]]] = []
    sampler = asyncio.ensure_future(sample_rss(fleet, results, samples))
    started = time.monotonic()
    try:
        await run_load(fleet, SOAK_S, STREAMS, results)
    finally:
        sampler.cancel()
    elapsed = time.monotonic() - started
    end = fleet.rss()

    assert_exact(results)
    models = {r.model for r in results}
    assert models == {m for _, m in ADAPTERS} | {BASE_MODEL}, "every adapter and the base model were used"
    # The baseline: once a first full wave of streams has finished, every code path has allocated what it needs.
    after_wave = [rss for done, rss in samples if done >= STREAMS]
    assert after_wave, f"the soak ended before {STREAMS} requests finished: too short to measure memory"
    start = after_wave[0]
    growth = {name: end[name] - start[name] for name in end}
    latencies = [r.seconds for r in results]
    first_tokens = [r.first_token_s for r in results if r.first_token_s is not None]
    tokens = sum(r.completion_tokens or 0 for r in results)
    print(
        f"\nsoak: {len(results)} requests, {STREAMS} concurrent streams over {len(models)} models for {elapsed:.0f} s, "
        f"0 failed; {tokens} tokens ({tokens / elapsed:.1f}/s); latency p50 {percentile(latencies, 50):.1f} s "
        f"p99 {percentile(latencies, 99):.1f} s; first token p50 {percentile(first_tokens, 50):.1f} s "
        f"p99 {percentile(first_tokens, 99):.1f} s"
    )
    for name in end:
        print(f"soak: {name} RSS {start[name]:.0f} -> {end[name]:.0f} MiB ({growth[name]:+.1f} MiB)")
    for name, limit in RSS_GROWTH_LIMIT_MIB.items():
        assert growth[name] < limit, f"{name} grew {growth[name]:.1f} MiB over the soak (limit {limit:.0f})"


# ----- 3, 4. gateway and inference drains ---------------------------------------------------------------------


async def start_streams(
    client: openai.AsyncOpenAI, plan: list[tuple[str, int]]
) -> tuple[list[StreamResult], list[asyncio.Task[StreamResult]]]:
    """One stream per (model, max_tokens); returns once every one has received its first token."""
    results = [StreamResult(model) for model, _ in plan]
    tasks = [
        asyncio.ensure_future(stream_chat(client, model, f"Stream {i}: tell a long story.", tokens, results[i]))
        for i, (model, tokens) in enumerate(plan)
    ]
    deadline = time.monotonic() + 240
    while not all(r.first_token_at or r.ended_at for r in results):
        assert time.monotonic() < deadline, "the streams did not start"
        await asyncio.sleep(0.05)
    assert not any(r.ended_at for r in results), [r.error for r in results]  # all in flight
    return results, tasks


async def test_gateway_drains_in_flight_streams_on_sigterm(fleet: Fleet) -> None:
    """A second gateway on the same home (database, store) in front of the replica: SIGTERM mid-stream."""
    gateway, url = start_gateway(fleet.home, fleet.port, name="gateway-drain", graceful_shutdown_s=GATEWAY_GRACE_S)
    key = fleet.keys[DRAIN_TENANT]
    try:
        warm = async_client(url, key)
        for model in DRAIN_MODELS[1:]:  # the adapters in engine slots: the streams below start together
            assert (await stream_chat(warm, model, "Warm up.", 2)).complete
        await warm.close()
        client = async_client(url, key, timeout_s=300)
        results, tasks = await start_streams(client, [(DRAIN_MODELS[i % 3], 32) for i in range(6)])
        signalled = time.monotonic()
        gateway.popen.send_signal(signal.SIGTERM)

        # New connections are refused as soon as the server noticed the signal, while the streams go on.
        refused_after = None
        while time.monotonic() - signalled < 10:
            try:
                httpx.get(f"{url}/health", timeout=2)
            except httpx.ConnectError:
                refused_after = time.monotonic() - signalled
                break
            await asyncio.sleep(0.05)
        in_flight = sum(r.ended_at is None for r in results)
        assert refused_after is not None, "the gateway still accepted connections 10 s after SIGTERM"
        assert in_flight > 0, "every stream had ended before the listener closed: nothing was drained"

        await asyncio.gather(*tasks)
        await client.close()
        code = await asyncio.to_thread(gateway.popen.wait, GATEWAY_GRACE_S + 15)
        exited = time.monotonic() - signalled
    finally:
        if gateway.popen.poll() is None:
            gateway.kill()
    for r in results:
        assert r.complete and r.completion_tokens == r.tokens == 32 and r.finish_reason == "length", r
    drained = max(r.ended_at or 0 for r in results) - signalled
    print(
        f"\ngateway: SIGTERM with {len(results)} streams in flight; new connections refused after "
        f"{refused_after:.2f} s ({in_flight} streams still running); all {len(results)} completed with usage "
        f"(last {drained:.1f} s after the signal); exit {code} after {exited:.1f} s (grace {GATEWAY_GRACE_S} s)"
    )
    assert code == 0, gateway.log_tail()
    assert exited < GATEWAY_GRACE_S
    assert group_members(gateway.pid) == []


async def test_inference_drains_then_cuts_what_outlasts_its_deadline(fleet: Fleet) -> None:
    inference = fleet.inference
    engine = [p for p in inference.tree() if p.pid != inference.pid]
    engine_names = sorted(p.name() for p in engine)
    assert "VLLM::EngineCore" in engine_names  # what must be gone after the stop
    plan = [(DRAIN_MODELS[i % 3], n) for n in (SHORT_TOKENS, LONG_TOKENS) for i in range(3)]
    client = async_client(fleet.url, fleet.keys[DRAIN_TENANT], timeout_s=300)
    results, tasks = await start_streams(client, plan)
    signalled = time.monotonic()
    inference.popen.send_signal(signal.SIGTERM)

    # While it drains, the replica takes no new request: the gateway answers 503 (it has no other replica).
    await asyncio.sleep(0.5)  # the signal handler runs on the replica's event loop
    with pytest.raises(openai.APIStatusError) as refused:
        await client.chat.completions.create(model=BASE_MODEL, messages=[{"role": "user", "content": "hi"}])
    refused_after = time.monotonic() - signalled
    assert refused.value.status_code == 503, refused.value
    assert sum(r.ended_at is None for r in results) > 0, "nothing was in flight when the new request was refused"

    code = await asyncio.to_thread(inference.popen.wait, INFERENCE_DRAIN_S + 60)
    took = time.monotonic() - signalled
    assert code == 0, inference.log_tail()
    # The replica drained for at most its deadline, then stopped its server and shut the engine down.
    assert took < INFERENCE_DRAIN_S + 45, inference.log_tail()
    ends = await asyncio.wait_for(asyncio.gather(*tasks), 30)  # never a hang: each ended, one way or the other
    await client.close()

    short, long = ends[:3], ends[3:]
    # On failure: where each stream's time went (seconds from the signal), and when the new request was refused.
    timings = [r.timeline(signalled) for r in ends] + [f"new request refused {refused_after:+.2f}"]
    for r in short:  # within the deadline: whole, with usage
        assert r.complete and r.completion_tokens == r.tokens == SHORT_TOKENS, (r, timings)
        assert (r.ended_at or 0) - signalled < INFERENCE_DRAIN_S, (timings, inference.log_tail(60))
    for r in long:  # beyond it: cut, and the client is told
        assert r.completion_tokens is None and 0 < r.tokens < LONG_TOKENS, (r, timings)
        assert f"shutting down: its drain deadline ({INFERENCE_DRAIN_S} s) passed" in r.error, r.error
    print(
        f"\ninference: SIGTERM with {len(ends)} streams in flight; {len(short)} short ({SHORT_TOKENS} tokens) "
        f"completed with usage within {max((r.ended_at or 0) - signalled for r in short):.1f} s; {len(long)} long "
        f"({LONG_TOKENS} tokens) cut at the {INFERENCE_DRAIN_S} s deadline after {[r.tokens for r in long]} tokens "
        f"with: {long[0].error[:160]}; a new request during the drain: 503 after {refused_after:.1f} s; "
        f"exit {code} after {took:.1f} s"
    )
    assert wait_gone(engine) == [] and group_members(inference.pid) == []

    # The last gateway stops too: nothing the fleet started is left (engine core, its worker, their helpers).
    gateway = fleet.gateway.tree()
    code, took = fleet.gateway.terminate(30)
    assert code == 0, fleet.gateway.log_tail()
    assert wait_gone(gateway) == [] and group_members(fleet.gateway.pid) == []
    assert descendants() - fleet.baseline_children == set()
    print(f"fleet: gateway stopped in {took:.1f} s (exit 0); engine processes {engine_names} gone")
