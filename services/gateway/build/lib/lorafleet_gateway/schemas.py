"""Bases of the OpenAI-facing request schemas."""

from __future__ import annotations

import logging
from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)


class OpenAIRequest(BaseModel):
    """An OpenAI-facing request body: unknown fields are accepted (clients send many) and logged, never fatal."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_ignored_fields(self) -> Self:
        if self.model_extra:
            logger.info("ignoring unsupported fields in %s: %s", type(self).__name__, sorted(self.model_extra))
        return self


class InternalModel(BaseModel):
    """A LoRA Fleet extension object: strict, so a typo is an error rather than a silent default."""

    model_config = ConfigDict(extra="forbid")
