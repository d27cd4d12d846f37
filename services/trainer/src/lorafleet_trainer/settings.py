"""The trainer's settings: built once in ``main`` and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from lorafleet_common.grpc_targets import check_targets, split_targets
from lorafleet_common.settings import CommonSettings


class TrainerSettings(CommonSettings):
    """Everything the trainer reads from the environment (``LORAFLEET_TRAINER_*`` plus the shared fields)."""

    model_config = SettingsConfigDict(
        env_prefix="LORAFLEET_TRAINER_", env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    host: str = Field(default="127.0.0.1", description="Address the gRPC and metrics servers bind to.")
    grpc_port: int = Field(default=50061, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="Prometheus /metrics port; 0 turns it off.")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the job database (sqlite or postgresql). Default: sqlite:///<home>/trainer.db.",
    )
    work_dir: Path | None = Field(
        default=None, description="Folder for per-job scratch space (spec, logs, adapter). Default: <home>/jobs."
    )
    serving_max_lora_rank: int = Field(
        default=16,
        ge=1,
        description="Highest LoRA rank the inference service serves; manifests asking for more are refused.",
    )
    torch_threads: int = Field(default=0, ge=0, description="torch intra-op threads in the worker; 0 = torch default.")
    hub_download: bool = Field(
        default=False,
        description="Let the worker download a base model from the Hugging Face hub when it is not cached locally.",
    )
    checkpoint_keep: int = Field(
        default=2,
        ge=1,
        description="Resumable checkpoints kept per running job (the newest); all are deleted when the job ends.",
    )
    notify_inference: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description='Inference replicas told to load each adapter the trainer publishes: "host:port" or '
        '"dns:///name:port" (every address the name resolves to); a comma-separated string or a JSON list in the '
        "env. Best effort: a failure is a warning event on the job, never a failed job. Empty: nobody is told.",
    )
    notify_timeout_s: float = Field(
        default=30.0, gt=0, description="Deadline of one LoadAdapter call made to an inference replica."
    )
    job_poll_interval_s: float = Field(
        default=2.0, gt=0, description="How often the scheduler re-checks the queue when nothing woke it."
    )
    cancel_grace_s: float = Field(
        default=5.0, gt=0, description="Seconds a worker gets after SIGTERM before it is killed (cancel, shutdown)."
    )
    shutdown_grace_s: float = Field(default=5.0, gt=0, description="Seconds in-flight RPCs get on shutdown.")
    store_call_timeout_s: float = Field(
        default=30.0, gt=0, description="Upper bound on one object-store or database call made by the service."
    )

    @field_validator("notify_inference", mode="before")
    @classmethod
    def _split_targets(cls, value: Any) -> Any:
        return split_targets(value)

    @field_validator("notify_inference")
    @classmethod
    def _check_targets(cls, value: list[str]) -> list[str]:
        return check_targets(value)

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'trainer.db').resolve()}"

    def resolved_work_dir(self) -> Path:
        return (self.work_dir or self.home / "jobs").resolve()
