"""Bases of the OpenAI-facing request schemas."""

from __future__ import annotations

import logging
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

logger = logging.getLogger(__name__)


def refuse_lone_surrogates(value: Any) -> Any:
    """Refuse text holding a lone UTF-16 surrogate anywhere in a request body (keys included).

    JSON's "\\ud800" escape decodes to one; Python strings can hold it, but no UTF-8 encoder can:
    protobuf, the database and our own JSON responses would all fail on it later, as a 500.
    Iterative, so a body nested as deep as the JSON parser allows cannot overflow the stack.
    """
    # Every request body passes here: a plain walk first, the walk that names the place only for a bad body.
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += item  # keys too
            stack += item.values()
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str) and not item.isascii() and not _encodable(item):
            _refuse_with_path(value)
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_with_path(value: Any) -> None:
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack += [(f"{path}.{k}" if path else str(k), k) for k in item if isinstance(k, str)]
            stack += [(f"{path}.{k}" if path else str(k), v) for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(item)]
        elif isinstance(item, str) and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                # The path may hold the bad key itself: spelled out, as pydantic cannot carry it either.
                where = f" in {path.encode('utf-8', 'backslashreplace').decode('utf-8')}" if path else ""
                raise ValueError(
                    f"text{where} holds an unpaired UTF-16 surrogate (\\u{ord(item[exc.start]):04x}), "
                    "which is not valid Unicode"
                ) from None


class OpenAIRequest(BaseModel):
    """An OpenAI-facing request body: unknown fields are accepted (clients send many) and logged, never fatal."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any, info: ValidationInfo) -> Any:
        # Parsed from JSON by pydantic itself (the generation routes' fast path), text cannot hold a lone
        # surrogate: its parser refuses the escape as invalid JSON. json.loads, FastAPI's parser, does not.
        return data if info.mode == "json" else refuse_lone_surrogates(data)

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> Self:
        if self.model_extra:
            logger.info("ignoring unsupported fields in %s: %s", type(self).__name__, sorted(self.model_extra))
        return self


class InternalModel(BaseModel):
    """A LoRA Fleet extension object: strict, so a typo is an error rather than a silent default."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        return refuse_lone_surrogates(data)
