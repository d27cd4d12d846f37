"""A lean ASGI path for the two generation routes, in front of the FastAPI app's whole middleware stack.

Every ``POST /v1/chat/completions`` and ``POST /v1/completions`` used to go through three middleware
layers, Starlette's router, FastAPI's request handler (an ``email.message`` parse of the Content-Type,
``json.loads``), its dependency solver and its exception wrappers: about half of the gateway's CPU per
request, more than its own work, and a wrapper around every streamed event. ``GenerationFastPath`` serves
those two method + path pairs directly: the body is read and validated in one pydantic call on the raw
bytes, the caller authenticated and admitted by the functions the FastAPI dependencies call, the route's
``respond`` (shared with its FastAPI endpoint) builds the response, and the request is counted as
``MetricsMiddleware`` counts it.

It takes only requests it can answer exactly as the app would: a declared Content-Length within the
body limit and a JSON body that validates. Anything else (a streamed or oversized body, another content
type, bad JSON, a body that fails validation, a client gone while sending it) goes to the app as it
came, the body already read replayed, so every error a client can see keeps the app's status and body,
including the 413s and the 401-before-400 order of ``errors.py``. Nothing with a side effect
(authentication, the rate limits) runs before that decision, so a request handed over is not counted
twice. FastAPI still declares both routes: the OpenAPI schema, ``/docs`` and the 405s for other methods
are unchanged. Domain errors are rendered through the one table (``error_response``); an unexpected
exception gets the app's 500 (``unexpected_error_response``) and is re-raised, as Starlette's
ServerErrorMiddleware does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet_gateway.auth import Principal
from lorafleet_gateway.errors import GatewayError, error_response, unexpected_error_response
from lorafleet_gateway.generation.service import GenerationService
from lorafleet_gateway.metrics import GatewayMetrics
from lorafleet_gateway.middleware import observe_request
from lorafleet_gateway.quotas import admit

B = TypeVar("B", bound=BaseModel)

# The route's work once the body is valid and the caller admitted: (body, service, caller, the request's
# state dict (metrics labels go there), receive) -> the ASGI response.
Responder = Callable[[B, GenerationService, Principal, dict[str, Any], Receive], Awaitable[Response]]


@dataclass(frozen=True)
class GenerationRoute(Generic[B]):
    """One generation route as both paths serve it: its path, body schema and response."""

    path: str
    schema: type[B]
    respond: Responder[B]


@dataclass(frozen=True)
class BoundRoute:
    route: GenerationRoute[Any]
    declared: APIRoute  # FastAPI's route of the same path: the scope names it, as Starlette's router would


def bind_routes(app: FastAPI, routes: Sequence[GenerationRoute[Any]]) -> dict[str, BoundRoute]:
    """The fast path's table: each route with FastAPI's declaration of it (which must exist: it serves the
    requests handed over, and the OpenAPI schema)."""
    declared = {r.path: r for r in app.routes if isinstance(r, APIRoute) and "POST" in r.methods}
    return {route.path: BoundRoute(route, declared[route.path]) for route in routes}


def _is_json(content_type: bytes) -> bool:
    # FastAPI parses application/json and application/*+json; only the plain one is common enough to matter
    # here, and anything it does not recognise goes to FastAPI, which decides as before.
    return content_type.partition(b";")[0].strip().lower() == b"application/json"


def _replaying(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that first returns ``messages`` again (the body already taken off the connection)."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class GenerationFastPath:
    """ASGI middleware: serves the bound generation routes' valid requests, hands everything else to ``app``."""

    def __init__(
        self, app: ASGIApp, *, routes: dict[str, BoundRoute], metrics: GatewayMetrics, body_limit: int
    ) -> None:
        self.app = app
        self.routes = routes
        self.metrics = metrics
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        bound = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if bound is None or scope.get("root_path"):  # a root path: leave path matching to Starlette
            await self.app(scope, receive, send)
            return
        content_type = authorization = length = None
        for name, value in scope["headers"]:
            if name == b"content-type" and content_type is None:
                content_type = value
            elif name == b"authorization" and authorization is None:
                authorization = value
            elif name == b"content-length":
                length = value  # the last one, as the body-limit middleware reads it
        if length is None or not length.isdigit() or int(length) > self.body_limit:
            await self.app(scope, receive, send)  # the body-limit middleware answers or watches it
            return
        started = time.perf_counter()
        messages: list[Message] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        request = None
        if content_type is not None and _is_json(content_type) and message["type"] == "http.request":
            with contextlib.suppress(ValidationError):  # the app words the error (and checks the key first)
                request = bound.route.schema.model_validate_json(body)
        if request is None:
            await self.app(scope, _replaying(messages, receive), send)
            return
        await self._serve(bound, request, authorization, scope, receive, send, started)

    async def _serve(
        self,
        bound: BoundRoute,
        request: BaseModel,
        authorization: bytes | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        started: float,
    ) -> None:
        scope["route"] = bound.declared
        state: dict[str, Any] = scope.setdefault("state", {})
        status = 500
        try:
            app_state = scope["app"].state
            try:
                caller = await admit(
                    app_state, None if authorization is None else authorization.decode("latin-1"), state
                )
                response = await bound.route.respond(request, app_state.services.generation, caller, state, receive)
            except GatewayError as exc:
                response = error_response(exc)
            except Exception as exc:  # nothing was sent yet: the app's 500, and the error goes on up
                await (await unexpected_error_response(Request(scope), exc))(scope, receive, send)
                raise
            status = response.status_code
            await response(scope, receive, send)
        finally:
            observe_request(self.metrics, scope, status, started)


class GatewayApp(FastAPI):
    """FastAPI with a ``GenerationFastPath`` in front of its whole middleware stack, once ``fast_path`` is set
    (a factory: the stack is built at the first request, after every middleware was added)."""

    fast_path: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.fast_path is None else self.fast_path(stack)
