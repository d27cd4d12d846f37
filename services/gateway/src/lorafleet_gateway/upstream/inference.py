"""Generate calls to the inference replicas: route, wait for the first chunk, retry elsewhere before it.

A replica may switch merge mode between two Stats polls (hot_adapters.py
switches them); it then refuses what its new mode cannot serve with
FAILED_PRECONDITION. FAILED_PRECONDITION is also a genuine answer (an adapter
whose rank the replica does not accept), so the pool asks that replica's
Stats again: if its mode changed or no longer serves the request, the refusal
was the switch, and the request is retried once more on another replica
(before any token, so nothing is lost); otherwise the refusal stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from lorafleet.inference.v1 import inference_pb2
from lorafleet_common.grpc_tls import GrpcTls
from lorafleet_gateway.errors import (
    GatewayError,
    ModelNotFound,
    ServiceUnavailable,
    UpstreamFailed,
    UpstreamTimeout,
    from_grpc,
)
from lorafleet_gateway.generation.aggregate import UsageTracker
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.upstream.replicas import Replica, ReplicaSet, Resolver, resolve_dns
from lorafleet_gateway.upstream.routing import choose

logger = logging.getLogger(__name__)

STALE_MODE_S = 0.5  # see InferencePool._refresh_modes

# Failures before the first chunk that another replica may not share: retried there.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # down or draining
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # its queue is full; another's may not be
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,  # engine trouble on that replica
        grpc.StatusCode.UNKNOWN,
    }
)

FinishCallback = Callable[[UsageTracker], None]


@dataclass(frozen=True)
class InferenceTimeouts:
    connect_s: float
    first_token_s: float
    request_s: float
    stream_idle_s: float = 60.0


@dataclass(frozen=True)
class RoutingPolicy:
    retry_attempts: int = 2
    load_factor: float = 1.25
    min_slack: int = 2
    merged_max_in_flight: int = 64


class GenerationStream:
    """One upstream Generate call whose first chunk has arrived. Iterate for the chunks; cancel() to abort.

    However it ends (last chunk, error, idle timeout, cancel) it releases its
    replica slot and reports usage to ``on_finish`` exactly once. A stream
    silent for longer than the idle timeout is cancelled by the pool's
    watchdog and ends with UpstreamTimeout (one timer for all streams: a
    timer per chunk costs more than the chunk's own handling).
    """

    def __init__(
        self,
        call: Any,
        first: inference_pb2.GenerateChunk,
        replica: Replica,
        pool: InferencePool,
        on_finish: FinishCallback | None = None,
    ) -> None:
        self._call = call
        self._first: inference_pb2.GenerateChunk | None = first
        self._done = False
        self.replica = replica
        self._pool = pool
        self._on_finish = on_finish
        self.usage = UsageTracker()
        self.usage.add(first)
        self.last_activity = time.monotonic()
        self.stalled = False
        pool.streams.add(self)

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> inference_pb2.GenerateChunk:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._call.read()
        except (asyncio.CancelledError, grpc.aio.AioRpcError) as exc:
            if self.stalled:  # the watchdog cancelled the call, not our caller
                self._finish()
                self._pool.metrics.upstream_errors.labels(replica=self.replica.target).inc()
                idle_s = self._pool.timeouts.stream_idle_s
                raise UpstreamTimeout(f"inference replica {self.replica.target} sent nothing for {idle_s}s") from None
            if isinstance(exc, asyncio.CancelledError):  # our caller is cancelled (client gone): stop upstream
                self.cancel()
                raise
            self._finish()
            raise self._pool.upstream_error(self.replica, exc) from exc
        if chunk is grpc.aio.EOF:
            self._finish()
            raise StopAsyncIteration
        self.last_activity = time.monotonic()
        self.usage.add(chunk)
        return chunk

    def stall(self) -> None:
        """Called by the watchdog: the replica went silent; the pending read ends with UpstreamTimeout."""
        self.stalled = True
        self._call.cancel()

    def cancel(self) -> None:
        """Abort the upstream call if it is still running (client gone, or we stopped reading)."""
        if not self._done:
            self._call.cancel()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self._pool.streams.discard(self)
        self._pool.replica_set.release(self.replica)
        if self._on_finish is not None:
            try:
                self._on_finish(self.usage)
            except Exception:  # accounting must never break a response
                logger.exception("usage accounting failed")


class InferencePool:
    """Routes Generate calls over a ReplicaSet (see routing.py for the policy)."""

    def __init__(
        self,
        targets: list[str],
        *,
        timeouts: InferenceTimeouts,
        health_interval_s: float,
        metrics: GatewayMetrics,
        policy: RoutingPolicy | None = None,
        dns_refresh_s: float = 30.0,
        eject_after: int = 3,
        resolver: Resolver = resolve_dns,
        tls: GrpcTls | None = None,
    ) -> None:
        self.timeouts = timeouts
        self.metrics = metrics
        self.policy = policy or RoutingPolicy()
        self.replica_set = ReplicaSet(
            targets,
            connect_timeout_s=timeouts.connect_s,
            health_interval_s=health_interval_s,
            dns_refresh_s=dns_refresh_s,
            eject_after=eject_after,
            drain_s=timeouts.request_s,
            metrics=metrics,
            resolver=resolver,
            tls=tls,
        )
        self._turn = itertools.count()
        self.streams: set[GenerationStream] = set()
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def replicas(self) -> list[Replica]:
        return self.replica_set.replicas

    async def start(self) -> None:
        await self.replica_set.start()
        self._watchdog = asyncio.create_task(self._watch_idle_streams(), name="inference-stream-watchdog")

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.replica_set.close()

    async def _watch_idle_streams(self) -> None:
        idle_s = self.timeouts.stream_idle_s
        while True:
            # Checking 4 times per period ends a stalled stream between 1 and 1.25 idle periods after its last chunk.
            await asyncio.sleep(idle_s / 4)
            deadline = time.monotonic() - idle_s
            for stream in [s for s in self.streams if s.last_activity < deadline and not s.stalled]:
                logger.warning("inference replica %s: stream silent for %ss, ending it", stream.replica.target, idle_s)
                stream.stall()

    async def check_health(self) -> dict[str, bool]:
        return await self.replica_set.check_health()

    def pick(self, adapter: str, exclude: set[str]) -> Replica | None:
        candidates = {r.target: r for r in self.replica_set.candidates(exclude)}
        choice = choose(
            [r.view() for r in candidates.values()],
            adapter,
            load_factor=self.policy.load_factor,
            min_slack=self.policy.min_slack,
            turn=next(self._turn),
            merged_max_in_flight=self.policy.merged_max_in_flight,
        )
        if choice is None:
            return None
        view, reason = choice
        self.metrics.count_routing(reason)
        return candidates[view.target]

    def upstream_error(self, replica: Replica, exc: grpc.aio.AioRpcError) -> GatewayError:
        """Record a failed call and translate it through the error table."""
        self.metrics.upstream_errors.labels(replica=replica.target).inc()
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.replica_set.record_failure(replica, f"call failed: {exc.details()}")
        logger.warning("inference replica %s failed: %s %s", replica.target, exc.code().name, exc.details())
        return from_grpc(exc, upstream=f"inference replica {replica.target}", not_found=ModelNotFound, param="model")

    async def generate(
        self, request: inference_pb2.GenerateRequest, on_finish: FinishCallback | None = None
    ) -> GenerationStream:
        """Start Generate on the routed replica and wait for its first chunk.

        A failure in RETRYABLE before anything arrived is retried on another
        replica, up to policy.retry_attempts times, and a refusal by a replica
        that switched merge mode once more (see the module docstring); any
        other failure is final. Errors before the first chunk therefore reach
        the client as an HTTP status.
        """
        tried: set[str] = set()
        last_error: GatewayError | None = None  # built when needed: most requests never raise it
        failed: Replica | None = None
        attempts_left, switch_retry_left = 1 + self.policy.retry_attempts, 1
        while attempts_left > 0:
            replica = self.pick(request.adapter, tried)
            if replica is None and not tried and await self._refresh_modes():
                replica = self.pick(request.adapter, tried)
            if replica is None:
                break
            if failed is not None:
                self.metrics.upstream_retries.labels(replica=failed.target).inc()
            tried.add(replica.target)
            attempts_left -= 1
            mode_before = replica.mode, replica.merged_adapter
            self.replica_set.acquire(replica)
            call = replica.stub.Generate(request, timeout=self.timeouts.request_s)
            try:
                async with asyncio.timeout(self.timeouts.first_token_s):
                    first = await call.read()
            except TimeoutError as exc:
                self._abandon(replica, call)
                self.metrics.upstream_errors.labels(replica=replica.target).inc()
                raise UpstreamTimeout(
                    f"inference replica {replica.target} produced no output within {self.timeouts.first_token_s}s"
                ) from exc
            except grpc.aio.AioRpcError as exc:
                self._abandon(replica, call)
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION and await self._switched(
                    replica, request.adapter, mode_before
                ):
                    logger.info("inference replica %s switched merge mode; request goes elsewhere", replica.target)
                    last_error = self._no_replica(request.adapter)
                    if switch_retry_left == 0:
                        raise last_error from exc
                    switch_retry_left, attempts_left, failed = 0, attempts_left + 1, replica
                    continue
                error = self.upstream_error(replica, exc)
                if exc.code() not in RETRYABLE:
                    raise error from exc
                last_error, failed = error, replica
                continue
            except BaseException:  # cancelled (client went away): do not leave the call running
                self._abandon(replica, call)
                raise
            if first is grpc.aio.EOF:
                self._abandon(replica, call)
                raise UpstreamFailed(f"inference replica {replica.target} ended the stream without output")
            return GenerationStream(call, first, replica, self, on_finish)
        raise last_error or self._no_replica(request.adapter)

    async def _refresh_modes(self) -> bool:
        """Ask Stats now of the replicas whose merge mode kept them out of a choice, if their last answer is older
        than STALE_MODE_S; whether any was asked. A replica that just returned to LoRA mode (its planner is in
        another gateway, or an operator called MergeAdapter) serves everything again: a 503 until the next poll
        would lose requests for nothing. The age bound keeps a fleet that is merged on purpose from being asked
        once per refused request."""
        now = time.monotonic()
        stale = [r for r in self.replica_set.candidates(set()) if r.mode != "lora" and now - r.stats_at > STALE_MODE_S]
        if not stale:
            return False
        await asyncio.gather(*(self.replica_set.refresh(r) for r in stale))
        return True

    async def _switched(self, replica: Replica, adapter: str, mode_before: tuple[str, str]) -> bool:
        """Whether ``replica`` refused because it changed merge mode since it was picked (asks its Stats now)."""
        await self.replica_set.refresh(replica)
        return (replica.mode, replica.merged_adapter) != mode_before or not replica.view().serves(adapter)

    def _no_replica(self, adapter: str) -> ServiceUnavailable:
        if not self.replicas:
            return ServiceUnavailable("no healthy inference replica")
        what = f"adapter {adapter}" if adapter else "the base model"
        return ServiceUnavailable(
            f"no inference replica can serve {what} now: replicas merged with another adapter, or switching "
            "merge mode, take nothing else"
        )

    def _abandon(self, replica: Replica, call: Any) -> None:
        call.cancel()
        self.replica_set.release(replica)

    async def unload_everywhere(self, adapter: str) -> None:
        """Best effort: ask every replica to drop ``adapter`` (all versions). Failures are only logged."""

        async def unload(replica: Replica) -> None:
            try:
                await replica.stub.UnloadAdapter(
                    inference_pb2.UnloadAdapterRequest(adapter=adapter), timeout=self.timeouts.connect_s
                )
            except grpc.aio.AioRpcError as exc:
                logger.info("could not unload %s from %s: %s", adapter, replica.target, exc.code().name)

        await asyncio.gather(*(unload(r) for r in self.replica_set.replicas))
