"""Gateway settings: LORAFLEET_GATEWAY_* variables plus the shared LORAFLEET_* ones."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lorafleet_common.settings import CommonSettings


class GatewaySettings(CommonSettings):
    """How the gateway listens, where its upstreams are, and its limits."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLEET_GATEWAY_", env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="HTTP bind address.")
    port: int = Field(default=8000, ge=0, le=65535, description="HTTP port.")
    inference_targets: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        min_length=1,
        description='Inference replicas as "host:port"; a comma-separated string or a JSON list in the env.',
    )
    trainer_target: str = Field(default="127.0.0.1:50061", description='The trainer as "host:port".')
    admin_key: SecretStr = Field(
        validation_alias=AliasChoices("LORAFLEET_ADMIN_KEY"),
        description="The admin API key (shared LORAFLEET_ADMIN_KEY, no prefix); clients send it as a Bearer token. "
        "Required: the gateway refuses to start without it.",
    )
    connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Bound on each connection attempt to a replica or the trainer, and on health checks.",
    )
    first_token_timeout_s: float = Field(
        default=60.0, gt=0, description="Longest wait for the first generated chunk (includes adapter loading)."
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="Deadline of a whole generation request.")
    trainer_timeout_s: float = Field(default=30.0, gt=0, description="Deadline of each trainer call.")
    health_interval_s: float = Field(
        default=5.0, gt=0, description="How often each inference replica's gRPC health is checked."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, gt=0, description="Largest JSON request body; larger ones get 413."
    )
    max_file_bytes: int = Field(
        default=512 * 1024 * 1024, gt=0, description="Largest upload to POST /v1/files; larger ones get 413."
    )
    graceful_shutdown_s: int = Field(
        default=30, ge=0, description="On SIGTERM, how long in-flight requests may finish before they are cut."
    )

    @field_validator("inference_targets", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("inference_targets")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        for target in value:
            host, sep, port = target.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f'inference target {target!r} must be "host:port"')
        return value

    @field_validator("admin_key")
    @classmethod
    def _check_admin_key(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("LORAFLEET_ADMIN_KEY must not be blank")
        return value
