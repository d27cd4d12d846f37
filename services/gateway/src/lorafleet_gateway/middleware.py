"""Pure ASGI middleware (no BaseHTTPMiddleware: it would buffer SSE and break disconnect handling)."""

from __future__ import annotations

import contextlib
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet_gateway.errors import BodyTooLarge, error_response
from lorafleet_gateway.metrics import GatewayMetrics


class BodyLimitMiddleware:
    """Answers 413 for bodies over the limit, whether announced by Content-Length or streamed.

    Uploads to ``upload_path`` get ``file_limit``; everything else ``limit``.
    """

    def __init__(self, app: ASGIApp, *, limit: int, file_limit: int, upload_path: str = "/v1/files") -> None:
        self.app = app
        self.limit = limit
        self.file_limit = file_limit
        self.upload_path = upload_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.file_limit if scope["path"].rstrip("/") == self.upload_path else self.limit
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                await error_response(_too_large(limit))(scope, receive, send)
                return
            # The server delivers no more than a declared length: nothing to watch, and no wrappers on every
            # receive and send (each event of a streamed completion is a send).
            await self.app(scope, receive, send)
            return

        too_large = _too_large(limit)
        received = 0
        exceeded = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise too_large
            return message

        async def guarded_send(message: Message) -> None:
            # Once over the limit the framework may render our exception as its own 400; drop that.
            if not exceeded:
                await send(message)

        with contextlib.suppress(BodyTooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if exceeded:
            await error_response(too_large)(scope, receive, send)


def _too_large(limit: int) -> BodyTooLarge:
    return BodyTooLarge(f"Request body is larger than this server's limit of {limit} bytes.")


class MetricsMiddleware:
    """Counts requests and times them to the last byte sent (whole stream for SSE).

    Labels come from the matched route template (never the raw path, to bound
    cardinality), the authenticated principal's tenant, and ``model_kind`` and
    ``model_label``, which generation routes put in ``request.state`` once the
    model resolved (so only real model ids become label values).
    """

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        scope.setdefault("state", {})  # where the handlers leave the labels (observe_request)
        status = 500

        async def observing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observing_send)
        finally:
            observe_request(self.metrics, scope, status, started)


def observe_request(metrics: GatewayMetrics, scope: Scope, status: int, started: float) -> None:
    """Count and time one request with the labels its handling left in ``scope`` (see MetricsMiddleware)."""
    state = scope["state"]
    route = getattr(scope.get("route"), "path", None) or "unmatched"
    kind = str(state.get("model_kind", "none"))
    model = str(state.get("model_label", "none"))
    tenant = getattr(state.get("principal"), "tenant", "none")
    metrics.observe_request(route, tenant, model, kind, status, time.perf_counter() - started)
