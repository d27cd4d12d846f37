"""The durable job queue: a jobs table and a per-job event log (SQLAlchemy Core; sqlite or postgres).

Every write goes through ``append_event``: the event and the job fields it
changes are committed together, so the job row never disagrees with its log.
Calls are synchronous; async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from lorafleet_trainer.errors import JobAlreadyExists, JobNotFound, StoreDown


class JobState(enum.IntEnum):
    """Mirrors trainer.v1.JobState."""

    QUEUED = 1
    VALIDATING = 2
    RUNNING = 3
    SUCCEEDED = 4
    FAILED = 5
    CANCELLED = 6

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


metadata = sa.MetaData()

jobs_table = sa.Table(
    "trainer_jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("state", sa.Integer, nullable=False, index=True),
    sa.Column("manifest_uri", sa.Text, nullable=False),
    sa.Column("manifest", sa.JSON, nullable=False),
    sa.Column("adapter_name", sa.String(200), nullable=False),
    sa.Column("base_model", sa.Text, nullable=False),
    sa.Column("adapter_uri", sa.Text, nullable=False, default=""),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False, default=0.0),
    sa.Column("finished_at", sa.Float, nullable=False, default=0.0),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("total_steps", sa.Integer, nullable=False, default=0),
    sa.Column("loss", sa.Float, nullable=False, default=0.0),
    sa.Column("trained_tokens", sa.BigInteger, nullable=False, default=0),
    sa.Column("last_seq", sa.Integer, nullable=False, default=0),
)

events_table = sa.Table(
    "trainer_job_events",
    metadata,
    sa.Column("job_id", sa.String(64), sa.ForeignKey("trainer_jobs.id"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("progress", sa.JSON, nullable=True),
)

JOB_FIELDS = {c.name for c in jobs_table.columns} - {"id", "last_seq", "manifest"}


@dataclass
class JobRecord:
    id: str
    state: JobState
    manifest_uri: str
    manifest: dict[str, Any]
    adapter_name: str
    base_model: str
    labels: dict[str, str]
    created_at: float
    adapter_uri: str = ""
    error: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0
    trained_tokens: int = 0


@dataclass
class EventRecord:
    job_id: str
    seq: int
    time: float
    kind: str
    state: JobState
    message: str
    progress: dict[str, float] | None = field(default=None)


def _job(row: Any) -> JobRecord:
    data = dict(row._mapping)
    data.pop("last_seq", None)
    data["state"] = JobState(data["state"])
    return JobRecord(**data)


def _event(row: Any) -> EventRecord:
    data = dict(row._mapping)
    data["state"] = JobState(data["state"])
    return EventRecord(**data)


class JobStore:
    """Jobs and their events in a SQL database."""

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            connect_args: dict[str, Any] = {"timeout": timeout_s}
        else:
            connect_args = {"connect_timeout": int(timeout_s)} if url.startswith("postgresql") else {}
        self.engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        # One writer at a time in this process: sqlite has no row locks and seq numbers must not collide.
        self._lock = threading.Lock()

    def create_schema(self) -> None:
        with self._guard():
            metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _guard(self) -> _Guard:
        return _Guard(self._lock)

    def insert(self, job: JobRecord, message: str) -> EventRecord:
        """Add a QUEUED job and its first event; JobAlreadyExists if the id is taken."""
        row = {k: v for k, v in vars(job).items()} | {"state": int(job.state), "last_seq": 0}
        with self._guard(), self.engine.begin() as conn:
            try:
                conn.execute(jobs_table.insert().values(**row))
            except IntegrityError as exc:
                raise JobAlreadyExists(f"job {job.id!r} already exists") from exc
            return self._append(conn, job.id, "state", job.state, message, None, {})

    def get(self, job_id: str) -> JobRecord:
        with self._guard(), self.engine.connect() as conn:
            row = conn.execute(jobs_table.select().where(jobs_table.c.id == job_id)).first()
        if row is None:
            raise JobNotFound(f"job {job_id!r} does not exist")
        return _job(row)

    def list_jobs(self, limit: int, labels: dict[str, str] | None = None) -> list[JobRecord]:
        """Newest first; label filtering happens here so it works the same on every database."""
        query = jobs_table.select().order_by(jobs_table.c.created_at.desc(), jobs_table.c.id.desc())
        if not labels:
            query = query.limit(limit)
        with self._guard(), self.engine.connect() as conn:
            rows = conn.execute(query).all()
        jobs = [_job(r) for r in rows]
        if labels:
            jobs = [j for j in jobs if all(j.labels.get(k) == v for k, v in labels.items())]
        return jobs[:limit]

    def in_states(self, *states: JobState) -> list[JobRecord]:
        """Jobs in these states, oldest first (queue order)."""
        query = (
            jobs_table.select()
            .where(jobs_table.c.state.in_([int(s) for s in states]))
            .order_by(jobs_table.c.created_at, jobs_table.c.id)
        )
        with self._guard(), self.engine.connect() as conn:
            return [_job(r) for r in conn.execute(query).all()]

    def count_by_state(self) -> dict[JobState, int]:
        query = sa.select(jobs_table.c.state, sa.func.count()).group_by(jobs_table.c.state)
        with self._guard(), self.engine.connect() as conn:
            counts = {JobState(s): int(n) for s, n in conn.execute(query).all()}
        return {s: counts.get(s, 0) for s in JobState}

    def events(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> list[EventRecord]:
        query = (
            events_table.select()
            .where(events_table.c.job_id == job_id, events_table.c.seq > after_seq)
            .order_by(events_table.c.seq)
            .limit(limit)
        )
        with self._guard(), self.engine.connect() as conn:
            return [_event(r) for r in conn.execute(query).all()]

    def append_event(
        self,
        job_id: str,
        kind: str,
        state: JobState,
        message: str,
        *,
        progress: dict[str, float] | None = None,
        only_from: tuple[JobState, ...] | None = None,
        **changes: Any,
    ) -> EventRecord | None:
        """Record an event, set the job's state and ``changes``; with ``only_from``, only if the job is in
        one of those states (None is returned when it is not: someone else moved it first)."""
        unknown = set(changes) - JOB_FIELDS
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        with self._guard(), self.engine.begin() as conn:
            # FOR UPDATE: on PostgreSQL, trainers sharing the database take turns on the row, so two cannot
            # both claim a queued job or number two events alike (sqlite locks the whole file instead).
            query = sa.select(jobs_table.c.state).where(jobs_table.c.id == job_id).with_for_update()
            current = conn.execute(query).scalar()
            if current is None:
                raise JobNotFound(f"job {job_id!r} does not exist")
            if only_from is not None and JobState(current) not in only_from:
                return None
            return self._append(conn, job_id, kind, state, message, progress, changes)

    def _append(
        self,
        conn: sa.Connection,
        job_id: str,
        kind: str,
        state: JobState,
        message: str,
        progress: dict[str, float] | None,
        changes: dict[str, Any],
    ) -> EventRecord:
        last = sa.select(jobs_table.c.last_seq).where(jobs_table.c.id == job_id).with_for_update()
        seq = int(conn.execute(last).scalar_one()) + 1
        # PostgreSQL text cannot hold NUL, and messages and errors may quote one from a bad file.
        message = _no_nul(message)
        changes = {k: _no_nul(v) if isinstance(v, str) else v for k, v in changes.items()}
        conn.execute(
            jobs_table.update().where(jobs_table.c.id == job_id).values(state=int(state), last_seq=seq, **changes)
        )
        event = EventRecord(job_id, seq, time.time(), kind, state, message, progress)
        conn.execute(events_table.insert().values(**vars(event) | {"state": int(state)}))
        return event


def _no_nul(text: str) -> str:
    return text.replace("\x00", "\ufffd")


class _Guard:
    """The process-wide write lock, with database errors turned into StoreDown."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.lock.release()
        if isinstance(exc, SQLAlchemyError) and not isinstance(exc, IntegrityError):
            raise StoreDown(f"job database unavailable: {exc.__class__.__name__}: {exc}") from exc
