"""The answer to a generation request once its upstream call has started: the same for chat and completions."""

from __future__ import annotations

from typing import Any, Protocol

from fastapi.responses import JSONResponse
from starlette.responses import Response
from starlette.types import Receive

from lorafleet_gateway.generation.aggregate import Choice, Usage, collect
from lorafleet_gateway.generation.sse import EventRenderer, SSEResponse, unless_disconnected
from lorafleet_gateway.upstream.inference import GenerationStream


class GenerationView(EventRenderer, Protocol):
    """A route's rendering of its answer: server-sent events (``EventRenderer``) or one JSON body."""

    def completion(self, choices: list[Choice], usage: Usage) -> dict[str, Any]: ...


async def reply(
    view: GenerationView, upstream: GenerationStream, *, stream: bool, n: int, receive: Receive
) -> Response:
    """Server-sent events for a stream; otherwise all ``n`` choices in one body, unless the client leaves first."""
    if stream:
        return SSEResponse(view, upstream)
    choices, usage = await unless_disconnected(receive, collect(upstream, n), upstream)
    return JSONResponse(view.completion(choices, usage))
