"""Server-sent events for streamed completions, and cancelling upstream work when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lorafleet_gateway.errors import ClientClosedRequest, GatewayError, UpstreamFailed, payload_for
from lorafleet_gateway.upstream.inference import GenerationStream

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# One encoder for every event: json.dumps with options would build a new one per chunk.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {_ENCODER.encode(payload)}\n\n".encode()


async def _sse_body(events: AsyncIterator[dict[str, Any]], upstream: GenerationStream) -> AsyncIterator[bytes]:
    try:
        try:
            async for event in events:
                yield sse_event(event)
        except GatewayError as exc:
            # Headers (200) are gone: the failure travels as an error event, then the stream ends.
            logger.warning("stream from %s failed: %s", upstream.replica.target, exc.message)
            yield sse_event(payload_for(exc))
        except Exception:
            logger.exception("stream from %s failed", upstream.replica.target)
            yield sse_event(payload_for(UpstreamFailed("internal error while streaming")))
        yield DONE
    finally:
        # Normal end: a no-op. Client disconnect (we are cancelled) or error: stops the upstream generation.
        upstream.cancel()


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always ends its upstream call, even if its body never started.

    (A client gone before the first byte makes Starlette skip the body
    generator, whose ``finally`` then never runs: the upstream generation would
    go on for nobody and its replica slot would stay taken.)
    """

    def __init__(self, events: AsyncIterator[dict[str, Any]], upstream: GenerationStream) -> None:
        super().__init__(_sse_body(events, upstream), media_type="text/event-stream", headers=_SSE_HEADERS)
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.upstream.cancel()


def sse_response(events: AsyncIterator[dict[str, Any]], upstream: GenerationStream) -> StreamingResponse:
    return SSEResponse(events, upstream)


async def unless_disconnected(request: Request, work: Awaitable[T], upstream: GenerationStream) -> T:
    """Await ``work``; if the client disconnects first, cancel it and the upstream call.

    Starlette does not cancel a non-streaming handler when its client leaves,
    so without this a long generation would run to the end for nobody.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientClosedRequest("client disconnected")
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
        upstream.cancel()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read; the next receive() returns only when the client disconnects.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
