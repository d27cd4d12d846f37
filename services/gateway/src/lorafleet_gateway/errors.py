"""Domain exceptions and the ONE table that turns them into OpenAI error responses.

Code anywhere in the gateway raises a ``GatewayError`` subclass; the handlers
installed by ``install_error_handlers`` render it as
``{"error": {"message", "type", "param", "code"}}`` with the status from
``ERROR_TABLE``. Upstream gRPC failures enter the same table through
``from_grpc`` (``GRPC_STATUS_TABLE``), so a status means the same thing
whichever upstream produced it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


class InvalidRequest(GatewayError):
    """The request is malformed or asks for something impossible."""


class ContextLengthExceeded(InvalidRequest):
    """The prompt (plus max_tokens) does not fit the model's context; inference says OUT_OF_RANGE."""


class AdapterRejected(InvalidRequest):
    """An inference replica refused to load the adapter (rank too high, wrong base model, DoRA...)."""


class AuthenticationFailed(GatewayError):
    """Missing, malformed or wrong API key."""


class PermissionDenied(GatewayError):
    """A valid key asked for something only the admin key may do."""


class NotFound(GatewayError):
    """The named object (file, job...) does not exist, or belongs to another tenant (indistinguishable)."""


class Conflict(GatewayError):
    """The object to create already exists (admin API)."""


class ModelNotFound(NotFound):
    """The ``model`` is neither the base model nor a published adapter."""


class BodyTooLarge(GatewayError):
    """The request body is over the configured limit."""


class Overloaded(GatewayError):
    """An upstream said RESOURCE_EXHAUSTED: try again later."""


class RequestRateLimited(GatewayError):
    """The key used up its requests per minute; ``headers`` carries Retry-After."""


class TokenRateLimited(GatewayError):
    """The key used up its tokens per minute; ``headers`` carries Retry-After."""


class ServiceUnavailable(GatewayError):
    """No healthy upstream could take the request."""


class UpstreamTimeout(GatewayError):
    """An upstream did not answer in time."""


class UpstreamFailed(GatewayError):
    """An upstream failed in a way the client cannot fix."""


class ClientClosedRequest(GatewayError):
    """The client disconnected before its response was ready (nobody reads this one; it labels metrics)."""


@dataclass(frozen=True)
class ErrorKind:
    status: int
    type: str
    code: str | None = None


# The one exception -> HTTP table. Lookup walks the exception's MRO, so a
# subclass without its own row inherits its parent's.
ERROR_TABLE: dict[type[GatewayError], ErrorKind] = {
    InvalidRequest: ErrorKind(400, "invalid_request_error"),
    AdapterRejected: ErrorKind(400, "invalid_request_error", "adapter_rejected"),
    ContextLengthExceeded: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    AuthenticationFailed: ErrorKind(401, "invalid_request_error", "invalid_api_key"),
    PermissionDenied: ErrorKind(403, "invalid_request_error", "permission_denied"),
    NotFound: ErrorKind(404, "invalid_request_error"),
    Conflict: ErrorKind(409, "invalid_request_error", "already_exists"),
    ModelNotFound: ErrorKind(404, "invalid_request_error", "model_not_found"),
    BodyTooLarge: ErrorKind(413, "invalid_request_error", "request_too_large"),
    Overloaded: ErrorKind(429, "rate_limit_error", "rate_limit_exceeded"),
    # OpenAI's own rate-limit bodies: type names the exhausted limit, code is rate_limit_exceeded.
    RequestRateLimited: ErrorKind(429, "requests", "rate_limit_exceeded"),
    TokenRateLimited: ErrorKind(429, "tokens", "rate_limit_exceeded"),
    ServiceUnavailable: ErrorKind(503, "server_error", "service_unavailable"),
    UpstreamTimeout: ErrorKind(504, "server_error", "timeout"),
    UpstreamFailed: ErrorKind(502, "server_error", "upstream_error"),
    ClientClosedRequest: ErrorKind(499, "invalid_request_error", "client_closed_request"),
    GatewayError: ErrorKind(500, "server_error"),
}

# How upstream gRPC statuses enter the table.
GRPC_STATUS_TABLE: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: ContextLengthExceeded,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: AdapterRejected,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.ABORTED: ServiceUnavailable,
    grpc.StatusCode.CANCELLED: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: UpstreamTimeout,
}


def kind_of(exc: GatewayError | type[GatewayError]) -> ErrorKind:
    for cls in (exc if isinstance(exc, type) else type(exc)).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    return ERROR_TABLE[GatewayError]


def from_grpc(
    exc: grpc.RpcError, *, upstream: str, not_found: type[NotFound] = NotFound, param: str | None = None
) -> GatewayError:
    """The domain error for a failed upstream call (``upstream`` names it in 5xx messages)."""
    status = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(status)
    cls = GRPC_STATUS_TABLE.get(status, UpstreamFailed)
    if cls is NotFound:
        cls = not_found
    if kind_of(cls).status >= 500:
        return cls(f"{upstream}: {details}")
    # param names the request field the upstream objected to (model, job id); generic 400s have none.
    return cls(details, param=param if cls in (not_found, AdapterRejected) else None)


MAX_MESSAGE_CHARS = 2_000


def _printable(text: str | None) -> str | None:
    """Messages quote what the client sent: a 10k-character model id is cut, and a lone surrogate (which
    would make the error itself unsendable as UTF-8) is spelled out."""
    if text is None:
        return None
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}... ({len(text) - MAX_MESSAGE_CHARS} more characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_payload(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _printable(message), "type": type_, "param": _printable(param), "code": code}}


def payload_for(exc: GatewayError) -> dict[str, Any]:
    kind = kind_of(exc)
    return error_payload(exc.message, kind.type, exc.param, exc.code or kind.code)


def error_response(exc: GatewayError) -> JSONResponse:
    headers = dict(exc.headers or {})
    if isinstance(exc, AuthenticationFailed):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(payload_for(exc), status_code=kind_of(exc).status, headers=headers or None)


# Pydantic error types meaning "the body as a whole is not the JSON object we expect".
_BODY_NOT_AN_OBJECT = {"missing", "model_attributes_type", "dict_type", "model_type"}


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """One InvalidRequest naming every problem; param is the first offending field."""
    errors = list(exc.errors())
    if any(err.get("type") == "json_invalid" for err in errors):
        detail = next(err for err in errors if err.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return InvalidRequest(f"We could not parse the JSON body of your request: {detail}".rstrip(": "))
    messages = []
    for err in errors:
        param = _param_from_loc(tuple(err.get("loc", ())))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if param is None and err.get("type") in _BODY_NOT_AN_OBJECT:
            msg = "The request body must be a JSON object sent with Content-Type: application/json"
        messages.append(f"Invalid '{param}': {msg}" if param else msg)
    first = _param_from_loc(tuple(errors[0].get("loc", ()))) if errors else None
    return InvalidRequest("; ".join(messages) or "invalid request", param=first)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's 405 lists only the first route's."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


async def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The 500 for an exception no other handler took (logged with its traceback)."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(error_payload("internal server error", "server_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error path through ERROR_TABLE."""

    async def on_gateway_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GatewayError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # FastAPI parses the body before dependencies run; check the key first so an
        # unauthenticated caller learns nothing about our schema (401 before 400).
        authenticator = getattr(request.app.state, "authenticator", None)
        if authenticator is not None and request.url.path.startswith("/v1/"):
            try:
                principal = await authenticator.authenticate(request.headers.get("authorization"))
            except (AuthenticationFailed, ServiceUnavailable) as auth_exc:
                return error_response(auth_exc)
            if request.url.path.startswith("/v1/admin/") and not principal.is_admin:
                return error_response(PermissionDenied("This endpoint needs the admin API key."))
        return error_response(validation_error(exc))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = "server_error" if exc.status_code >= 500 else "invalid_request_error"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return JSONResponse(error_payload(str(exc.detail), type_), status_code=exc.status_code, headers=headers or None)

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, unexpected_error_response)
