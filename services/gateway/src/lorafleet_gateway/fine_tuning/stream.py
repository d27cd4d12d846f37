"""GET /v1/fine_tuning/jobs/{id}/events/stream: a job's events as server-sent events, live.

Backed by the trainer's WatchJob: everything recorded after the resume point,
then new events as they happen, until the job is final. Framing:

    id: ftevent-<job>-<seq>          (send it back as Last-Event-ID to resume)
    data: {fine_tuning.job.event}

    : keepalive                      (a comment after event_keepalive_s of silence)

    data: [DONE]                     (the job is final: nothing more will come)

A stream that ends without ``[DONE]`` (event_stream_s ran out, or the
gateway is shutting down) is to be resumed with Last-Event-ID. A failure after
the headers travels as one ``data: {"error": {...}}`` event, as for chat streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_gateway.errors import GatewayError, UpstreamFailed, payload_for
from lorafleet_gateway.fine_tuning.view import event_object
from lorafleet_gateway.generation.sse import DONE, sse_event
from lorafleet_gateway.upstream.trainer import JobWatch, TrainerClient

logger = logging.getLogger(__name__)

FINAL_STATES = frozenset(
    {trainer_pb2.JOB_STATE_SUCCEEDED, trainer_pb2.JOB_STATE_FAILED, trainer_pb2.JOB_STATE_CANCELLED}
)
KEEPALIVE = b": keepalive\n\n"
_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class JobEventStream:
    """One tenant's view of one WatchJob call: OpenAI event objects, and whether the job ended."""

    def __init__(self, watch: JobWatch, trainer: TrainerClient, job: trainer_pb2.Job, tenant: str) -> None:
        self._watch = watch
        self._trainer = trainer
        self._job = job
        self._tenant = tenant
        self._last_state: int | None = None
        self.finished = False  # set when the stream ended because the job is final

    async def next(self) -> dict[str, Any] | None:
        """The next event object, or None at the end of the stream (``finished`` says why)."""
        event = await self._watch.next()
        if event is not None:
            self._last_state = event.state
            return event_object(event, self._job, self._tenant)
        if self._last_state in FINAL_STATES:
            self.finished = True
        else:  # nothing new was recorded (e.g. resumed after the last event): ask the trainer
            self.finished = (await self._trainer.get_job(self._job.id)).state in FINAL_STATES
        return None

    def cancel(self) -> None:
        self._watch.cancel()


async def _body(stream: JobEventStream, keepalive_s: float) -> AsyncIterator[bytes]:
    # One read is kept pending across keepalives: cancelling a gRPC read would end the whole call.
    pending: asyncio.Task[dict[str, Any] | None] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(stream.next())
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield KEEPALIVE
                continue
            event, pending = pending.result(), None
            if event is None:
                break
            yield f"id: {event['id']}\n".encode() + sse_event(event)
        if stream.finished:
            yield DONE
    except GatewayError as exc:
        logger.warning("job event stream failed: %s", exc.message)
        yield sse_event(payload_for(exc))
    except Exception:
        logger.exception("job event stream failed")
        yield sse_event(payload_for(UpstreamFailed("internal error while streaming job events")))
    finally:
        stream.cancel()  # synchronous: runs even when we are being cancelled because the client left
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending


class JobEventResponse(StreamingResponse):
    """SSE response that ends the WatchJob call however the response ends (even before its first byte)."""

    def __init__(self, stream: JobEventStream, keepalive_s: float) -> None:
        super().__init__(_body(stream, keepalive_s), media_type="text/event-stream", headers=_HEADERS)
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.cancel()
