"""What the scheduler and a job's worker process tell each other.

The parent writes a ``WorkerSpec`` to ``<job-dir>/spec.json``; the worker
answers with one JSON ``WorkerEvent`` per line on its stdout. Neither side
imports torch for this.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lorafleet_common.store import S3Config

SPEC_FILE = "spec.json"
SPEC_FILE_ENV = "LORAFLEET_WORKER_SPEC_FILE"
LOG_FILE = "worker.log"

WorkerEventKind = Literal["state", "progress", "checkpoint", "log", "publishing", "published", "failed"]


class S3Settings(BaseModel):
    endpoint: str
    access_key: str
    secret_key: str
    secure: bool
    region: str | None
    timeout_s: float

    def config(self) -> S3Config:
        return S3Config(**self.model_dump())


class WorkerSpec(BaseModel):
    """Everything a worker needs; written by the parent, readable only by its user (it holds the S3 secret)."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    manifest: dict[str, Any]
    store_url: str
    s3: S3Settings
    model_cache_dir: str
    torch_threads: int = 0
    hub_download: bool = False
    serving_max_lora_rank: int = 16
    checkpoint_keep: int = 2


class WorkerEvent(BaseModel):
    """One line of the worker's report."""

    kind: WorkerEventKind
    message: str = ""
    state: Literal["RUNNING"] | None = None
    progress: dict[str, float] | None = None
    total_steps: int | None = None
    # "checkpoint": the step it holds; "state" RUNNING: the step a resumed run starts after (0: from scratch).
    step: int | None = None
    checkpoint_uri: str | None = None
    trained_tokens: int | None = None
    adapter_uri: str | None = None
    error: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


def write_spec(job_dir: Path, spec: WorkerSpec) -> Path:
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / SPEC_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(spec.model_dump_json())
    return path


def read_spec(job_dir: Path) -> WorkerSpec:
    """``<job-dir>/spec.json``, or the file ``$LORAFLEET_WORKER_SPEC_FILE`` names: a Kubernetes Job's Secret,
    mounted read-only outside the job folder, so the worker's clean-up of ``<job-dir>/spec.json`` leaves it be."""
    path = Path(os.environ.get(SPEC_FILE_ENV) or job_dir / SPEC_FILE)
    return WorkerSpec.model_validate_json(path.read_text())


def parse_event_line(line: bytes) -> WorkerEvent | None:
    """A worker event, or None for a line that is not one (stray output)."""
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or "kind" not in data:
        return None
    try:
        return WorkerEvent.model_validate(data)
    except ValueError:
        return None


class EventWriter:
    """Writes worker events, one JSON object per line, flushed at once."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, event: WorkerEvent) -> None:
        self.stream.write(event.model_dump_json(exclude_none=True) + "\n")
        self.stream.flush()

    def log(self, message: str) -> None:
        self.emit(WorkerEvent(kind="log", message=message))
