"""The (legacy) completions request."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, model_validator

from lorafleet_gateway.generation.schemas import GenerationRequest


def _single_prompt(value: Any) -> Any:
    # The upstream takes one prompt per call; a one-element list is the same request.
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        raise ValueError("exactly one text prompt is supported per request (no batches or token arrays)")
    return value


class CompletionRequest(GenerationRequest):
    """POST /v1/completions body."""

    prompt: Annotated[str, BeforeValidator(_single_prompt)]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _unsupported(self) -> Self:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (it must equal n when given)")
        return self
