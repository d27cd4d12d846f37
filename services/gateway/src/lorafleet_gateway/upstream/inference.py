"""The inference replicas: health-checked, picked round-robin, one retry before the first chunk."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.inference.v1 import inference_pb2, inference_pb2_grpc
from lorafleet_gateway.errors import (
    GatewayError,
    ModelNotFound,
    ServiceUnavailable,
    UpstreamFailed,
    UpstreamTimeout,
    from_grpc,
)
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.upstream.channels import open_channel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceTimeouts:
    connect_s: float
    first_token_s: float
    request_s: float


@dataclass
class Replica:
    """One inference replica as the gateway sees it."""

    target: str
    channel: grpc.aio.Channel
    stub: Any = field(repr=False)
    health: Any = field(repr=False)
    # Optimistic until a check says otherwise, so a gateway that starts first serves as soon as replicas do.
    healthy: bool = True


class GenerationStream:
    """One upstream Generate call whose first chunk has arrived. Iterate for the chunks; cancel() to abort."""

    def __init__(self, call: Any, first: inference_pb2.GenerateChunk, replica: Replica, pool: InferencePool) -> None:
        self._call = call
        self._first: inference_pb2.GenerateChunk | None = first
        self._done = False
        self.replica = replica
        self._pool = pool

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
        except grpc.aio.AioRpcError as exc:
            self._done = True
            raise self._pool.upstream_error(self.replica, exc) from exc
        if chunk is grpc.aio.EOF:
            self._done = True
            raise StopAsyncIteration
        return chunk

    def cancel(self) -> None:
        """Abort the upstream call if it is still running (client gone, or we stopped reading)."""
        if not self._done:
            self._done = True
            self._call.cancel()


class InferencePool:
    """Owns one channel per replica, checks grpc.health.v1 in the background, routes Generate calls."""

    def __init__(
        self,
        targets: list[str],
        *,
        timeouts: InferenceTimeouts,
        health_interval_s: float,
        metrics: GatewayMetrics,
    ) -> None:
        self._targets = list(targets)
        self._timeouts = timeouts
        self._health_interval_s = health_interval_s
        self._metrics = metrics
        self._replicas: list[Replica] = []
        self._turn = itertools.count()
        self._health_task: asyncio.Task[None] | None = None

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas)

    async def start(self) -> None:
        for target in self._targets:
            channel = open_channel(target, connect_timeout_s=self._timeouts.connect_s)
            self._replicas.append(
                Replica(
                    target=target,
                    channel=channel,
                    stub=inference_pb2_grpc.InferenceServiceStub(channel),
                    health=health_pb2_grpc.HealthStub(channel),
                )
            )
        self._health_task = asyncio.create_task(self._health_loop(), name="inference-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(r.channel.close(grace=None) for r in self._replicas), return_exceptions=True)
        self._replicas.clear()

    async def check_health(self) -> dict[str, bool]:
        """Ask every replica now; update and return who is healthy."""
        results = await asyncio.gather(*(self._check(r) for r in self._replicas))
        return {r.target: ok for r, ok in zip(self._replicas, results, strict=True)}

    async def _check(self, replica: Replica) -> bool:
        try:
            response = await replica.health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self._timeouts.connect_s
            )
            healthy = response.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        if healthy != replica.healthy:
            logger.info("inference replica %s is now %s", replica.target, "healthy" if healthy else "unhealthy")
        replica.healthy = healthy
        return healthy

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_health()
            except Exception:  # the loop must outlive any one bad round
                logger.exception("inference health round failed")
            await asyncio.sleep(self._health_interval_s)

    def _pick(self, exclude: set[str]) -> Replica | None:
        candidates = [r for r in self._replicas if r.healthy and r.target not in exclude]
        if not candidates:
            return None
        return candidates[next(self._turn) % len(candidates)]

    def upstream_error(self, replica: Replica, exc: grpc.aio.AioRpcError) -> GatewayError:
        """Record a failed call and translate it through the error table."""
        self._metrics.upstream_errors.labels(replica=replica.target).inc()
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            replica.healthy = False  # passive health: skip it until the next check says SERVING
        logger.warning("inference replica %s failed: %s %s", replica.target, exc.code().name, exc.details())
        return from_grpc(exc, upstream=f"inference replica {replica.target}", not_found=ModelNotFound, param="model")

    async def generate(self, request: inference_pb2.GenerateRequest) -> GenerationStream:
        """Start Generate on a healthy replica and wait for its first chunk.

        A replica that is UNAVAILABLE before producing anything is skipped and
        the call is retried once on another; any other failure is final. Errors
        before the first chunk therefore reach the client as an HTTP status.
        """
        tried: set[str] = set()
        last_error: GatewayError = ServiceUnavailable("no healthy inference replica")
        for _attempt in range(2):
            replica = self._pick(tried)
            if replica is None:
                break
            tried.add(replica.target)
            call = replica.stub.Generate(request, timeout=self._timeouts.request_s)
            try:
                first = await asyncio.wait_for(call.read(), self._timeouts.first_token_s)
            except TimeoutError as exc:
                call.cancel()
                self._metrics.upstream_errors.labels(replica=replica.target).inc()
                raise UpstreamTimeout(
                    f"inference replica {replica.target} produced no output within {self._timeouts.first_token_s}s"
                ) from exc
            except grpc.aio.AioRpcError as exc:
                error = self.upstream_error(replica, exc)
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise error from exc
                last_error = error
                continue
            except BaseException:  # cancelled (client went away): do not leave the call running
                call.cancel()
                raise
            if first is grpc.aio.EOF:
                raise UpstreamFailed(f"inference replica {replica.target} ended the stream without output")
            return GenerationStream(call, first, replica, self)
        raise last_error
