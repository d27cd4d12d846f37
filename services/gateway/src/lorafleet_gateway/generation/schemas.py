"""Request fields shared by /v1/chat/completions and /v1/completions."""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import BeforeValidator, Field, model_validator

from lorafleet_gateway.schemas import OpenAIRequest


def _stop_list(value: Any) -> Any:
    # OpenAI accepts one string or a list; normalise before validation so errors name `stop`, not a union branch.
    return [value] if isinstance(value, str) else value


# The inference proto's field widths (uint32 max_tokens, int64 seed): a larger number is a 400 here,
# not a ValueError out of protobuf (a 500).
UINT32_MAX = 2**32 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class StreamOptions(OpenAIRequest):
    include_usage: bool = False


class GenerationRequest(OpenAIRequest):
    """Sampling and streaming fields common to both generation APIs."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=128)
    stop: Annotated[list[str] | None, BeforeValidator(_stop_list)] = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension of the OpenAI API, same name: keep generating past end-of-sequence up to max_tokens
    # (benchmarks with fixed output lengths).
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def token_limit(self) -> int | None:
        return self.max_tokens
