"""Server-sent events for streamed completions, and cancelling upstream work when the client leaves.

A streamed completion is the hot path of the gateway: every generated token passes through here.
So the response is a small pure-ASGI loop rather than Starlette's StreamingResponse (which spawns an
anyio task group per request and runs the body through two more async generators), the views render
each upstream chunk straight to the bytes of its event (see ``EventRenderer``), and events that are
ready together leave in one write: the role events with the first token, the usage event and
``[DONE]`` with the end of the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from lorafleet.inference.v1 import inference_pb2
from lorafleet_gateway.errors import ClientClosedRequest, GatewayError, UpstreamFailed, payload_for
from lorafleet_gateway.generation.aggregate import Usage
from lorafleet_gateway.upstream.inference import GenerationStream

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
# What Starlette's StreamingResponse(media_type="text/event-stream", headers=...) sent, byte for byte.
_SSE_HEADERS = [
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
    (b"content-type", b"text/event-stream; charset=utf-8"),
]

# One encoder for every event: json.dumps with options would build a new one per chunk.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
# What _ENCODER does to a str (the C function it calls), for views that splice strings into pre-encoded events.
encode_string = json.encoder.encode_basestring


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {_ENCODER.encode(payload)}\n\n".encode()


def encode_json(value: Any) -> str:
    """``value`` as it appears inside an event (compact separators, UTF-8 kept as is)."""
    return _ENCODER.encode(value)


def chunk_frame(object_name: str, completion_id: str, created: int, model: str, include_usage: bool) -> tuple[str, str]:
    """The constant head (``data: {...,"choices":[``) and tail (``]...}`` and the blank line) of every streamed
    chunk event of one response: only the choice between them changes, so they are encoded once per request."""
    head = (
        f'data: {{"id":{encode_string(completion_id)},"object":"{object_name}","created":{created},'
        f'"model":{encode_string(model)},"system_fingerprint":null,"choices":['
    )
    return head, ('],"usage":null}' if include_usage else "]}") + "\n\n"


class EventRenderer(Protocol):
    """Turns one request's upstream chunks into the bytes of its server-sent events."""

    def opening(self) -> bytes:
        """Events due before the first chunk's (chat: a role event per choice)."""
        ...

    def render(self, chunk: inference_pb2.GenerateChunk) -> bytes:
        """The event of one upstream chunk; b"" for a chunk that shows nothing. May raise a GatewayError."""
        ...

    def closing(self, usage: Usage) -> bytes:
        """Events after the last chunk (the usage event, when the request asked for one)."""
        ...


class SSEResponse(Response):
    """Streams ``upstream`` as server-sent events, ending with ``data: [DONE]``; always ends its upstream call.

    A failure after the 200 went out travels as an error event, then the
    stream ends. A client that leaves cancels the upstream generation at once,
    also while the upstream is silent: a watcher task waits for the
    disconnect and cancels the request's task, which this response then
    treats as a normal end (its replica slot is released, nothing is raised).
    """

    media_type = "text/event-stream"

    def __init__(self, renderer: EventRenderer, upstream: GenerationStream) -> None:
        # Response.__init__ would render a body; a stream has none.
        self.status_code = 200
        self.raw_headers = list(_SSE_HEADERS)
        self.background: BackgroundTask | None = None
        self.renderer = renderer
        self.upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None  # ASGI servers run each request in a task
        client_gone = finished = False

        def on_disconnect(watcher: asyncio.Future[None]) -> None:
            nonlocal client_gone
            # Runs on a later loop turn: once this response has returned, the task has moved on; leave it be.
            if not finished and not watcher.cancelled() and watcher.exception() is None:
                client_gone = True
                task.cancel()

        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await self._stream(send, watcher)
        except asyncio.CancelledError:
            if client_gone and task.uncancel() == 0:
                return  # the client left: the end of this response, not an error (nobody is waiting for it)
            raise
        finally:
            finished = True
            watcher.cancel()
            # Normal end: a no-op. Client gone (we were cancelled) or error: stops the upstream generation.
            self.upstream.cancel()
        if self.background is not None:
            await self.background()

    async def _stream(self, send: Send, watcher: asyncio.Future[None]) -> None:
        renderer, upstream = self.renderer, self.upstream
        pending = renderer.opening()  # leaves with the first chunk's event: that chunk is already here
        while True:
            # Failures of the upstream or of rendering become an error event; a failing send is the server's to see.
            try:
                try:
                    chunk = await anext(upstream)
                except StopAsyncIteration:
                    pending += renderer.closing(upstream.usage.usage)
                    break
                pending += renderer.render(chunk)
            except GatewayError as exc:
                # Headers (200) are gone: the failure travels as an error event, then the stream ends.
                logger.warning("stream from %s failed: %s", upstream.replica.target, exc.message)
                pending += sse_event(payload_for(exc))
                break
            except Exception:
                logger.exception("stream from %s failed", upstream.replica.target)
                pending += sse_event(payload_for(UpstreamFailed("internal error while streaming")))
                break
            if pending:
                await send({"type": "http.response.body", "body": pending, "more_body": True})
                pending = b""
        # The final send completes the response, which wakes the watcher: it must not take that for a disconnect.
        watcher.cancel()
        await send({"type": "http.response.body", "body": pending + DONE, "more_body": False})


async def unless_disconnected(receive: Receive, work: Awaitable[T], upstream: GenerationStream) -> T:
    """Await ``work``; if the client disconnects first, cancel it and the upstream call.

    Starlette does not cancel a non-streaming handler when its client leaves,
    so without this a long generation would run to the end for nobody.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
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


async def _wait_for_disconnect(receive: Receive) -> None:
    # The body has been read; the next receive() returns only when the client disconnects.
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
