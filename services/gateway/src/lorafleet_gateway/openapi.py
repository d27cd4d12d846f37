"""What the OpenAPI document says beyond what FastAPI infers from the routes.

FastAPI documents a 422 ``HTTPValidationError`` on every route with
parameters; the gateway never sends one: every error, whatever its status, is
the OpenAI error object (errors.py). ``ERROR_RESPONSES`` documents that for
the 4XX and 5XX ranges (declaring "4XX" also stops FastAPI adding its 422),
and ``install_openapi`` declares the bearer key that every /v1 route needs, so
clients generated from the document, and fuzzers reading it, know both.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person.")
    type: str = Field(description='"invalid_request_error", "server_error", "requests", "tokens"...')
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description='A stable machine code ("model_not_found", "invalid_api_key"...), if any.')


class ErrorResponse(BaseModel):
    """The OpenAI error object: the body of every 4xx and 5xx the gateway sends."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "The request cannot be served as sent (OpenAI error object)."},
    "5XX": {"model": ErrorResponse, "description": "An upstream or the gateway failed (OpenAI error object)."},
}

GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The completion object; with `stream: true`, server-sent events of chunks ending in "
        "`data: [DONE]`.",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}

BEARER_SCHEME = "apiKey"


def install_openapi(app: FastAPI) -> None:
    """Declare ``Authorization: Bearer <key>`` on every /v1 operation of ``app``'s document (others that need
    a key, such as /metrics, say so with ``openapi_extra={"security": [{BEARER_SCHEME: []}]}``)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes[BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "A tenant's API key (lf-...), or the admin key.",
        }
        for path, operations in schema.get("paths", {}).items():
            if path.startswith("/v1/"):
                for operation in operations.values():
                    operation["security"] = [{BEARER_SCHEME: []}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
