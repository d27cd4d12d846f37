"""The gRPC face of InferenceService: a thin servicer, the health service, and the server factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lorafleet.inference.v1 import inference_pb2 as pb
from lorafleet.inference.v1 import inference_pb2_grpc as pb_grpc
from lorafleet_common.grpc_tls import GrpcTls, add_port
from lorafleet_inference.errors import ServiceUnavailable, grpc_status
from lorafleet_inference.service import InferenceService

log = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_NAME = "lorafleet.inference.v1.InferenceService"


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """Adapts gRPC calls to the service; the service is attached once the engine is up."""

    def __init__(self, service: InferenceService | None = None) -> None:
        self.service = service

    def _ready(self) -> InferenceService:
        if self.service is None:
            raise ServiceUnavailable("the engine is still starting")
        return self.service

    async def Generate(  # noqa: N802 (gRPC method names)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in self._ready().generate(request):
                yield chunk
        except Exception as exc:
            await _abort(context, exc)

    async def LoadAdapter(  # noqa: N802
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        return await _unary(context, lambda: self._ready().load_adapter(request))

    async def UnloadAdapter(  # noqa: N802
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        return await _unary(context, lambda: self._ready().unload_adapter(request))

    async def ListAdapters(  # noqa: N802
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return await _unary(context, lambda: _now(self._ready().list_adapters))

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:  # noqa: N802
        return await _unary(context, lambda: _now(self._ready().stats))

    async def MergeAdapter(  # noqa: N802
        self, request: pb.MergeAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.MergeAdapterResponse:
        return await _unary(context, lambda: self._ready().merge_adapter(request))


async def _now(fn: Callable[[], T]) -> T:
    return fn()


async def _unary(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except Exception as exc:
        await _abort(context, exc)
        raise  # unreachable: context.abort raises


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    """End the call with the status the error table gives ``exc`` (INTERNAL if it has none)."""
    mapped = grpc_status(exc)
    if mapped is None:
        log.exception("unexpected error", exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")
    else:
        code, message = mapped
        log.info("request failed: %s: %s", code.name, message)
        await context.abort(code, message)


def build_server(
    servicer: InferenceServicer,
    health_servicer: health.aio.HealthServicer,
    host: str,
    port: int,
    tls: GrpcTls | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server with the inference and health services on host:port; returns it and the bound port.

    With ``tls`` the port requires mTLS: only clients with a certificate the CA bundle signed get in.
    """
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = add_port(server, f"{host}:{port}", tls)
    if bound == 0:
        raise OSError(f"could not bind gRPC to {host}:{port}")
    return server, bound


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
