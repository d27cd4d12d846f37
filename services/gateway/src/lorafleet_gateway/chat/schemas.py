"""The chat completions request."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BeforeValidator, Field, model_validator

from lorafleet_gateway.generation.schemas import UINT32_MAX, GenerationRequest
from lorafleet_gateway.schemas import OpenAIRequest

# "developer" is OpenAI's newer name for "system"; tool/function messages need tool support we do not have.
Role = Literal["system", "developer", "user", "assistant"]


def _content_text(value: Any) -> Any:
    """OpenAI content is a string or a list of parts; only text parts can reach a text-only model."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
        texts.append(part["text"])
    return "".join(texts)


class ChatMessage(OpenAIRequest):
    role: Role
    content: Annotated[str | None, BeforeValidator(_content_text)] = None
    name: str | None = None

    @property
    def upstream_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> Self:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def prompt_chars(self) -> int:
        return sum(len(m.content or "") for m in self.messages)

    def token_limit(self) -> int | None:
        # max_completion_tokens is OpenAI's current name; max_tokens the deprecated one.
        return self.max_completion_tokens or self.max_tokens

    def upstream_logprobs(self) -> int | None:
        """The proto's logprobs: unset for none, else how many alternatives per token (0 = just the token)."""
        return (self.top_logprobs or 0) if self.logprobs else None
