"""TrainerService: the one object the gRPC servicer talks to.

It admits jobs (reading and checking the manifest synchronously), answers
queries from the job database, and hands running work to the Scheduler.
Errors are domain exceptions from errors.py; the boundary maps them.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from lorafleet_common.names import InvalidName, validate_job_id
from lorafleet_common.store import InvalidKey, ObjectNotFound, ObjectStore, StoreUnavailable, resolve_uri
from lorafleet_trainer.errors import InvalidRequest, NotAccepting, StoreDown
from lorafleet_trainer.jobstore import EventRecord, JobRecord, JobState, JobStore
from lorafleet_trainer.launch import Launcher
from lorafleet_trainer.manifest import ManifestError, parse_manifest
from lorafleet_trainer.metrics import TrainerMetrics
from lorafleet_trainer.scheduler import Scheduler
from lorafleet_trainer.settings import TrainerSettings

DEFAULT_LIST_LIMIT = 100
DEFAULT_EVENTS_LIMIT = 1000


class TrainerService:
    def __init__(
        self,
        settings: TrainerSettings,
        store: ObjectStore,
        jobs: JobStore,
        metrics: TrainerMetrics,
        launcher: Launcher | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self.metrics = metrics
        self.scheduler = Scheduler(settings, jobs, metrics, store, launcher)
        self.accepting = False

    async def start(self) -> None:
        await asyncio.to_thread(self.jobs.create_schema)
        await self.scheduler.recover()
        self.scheduler.start()
        self.accepting = True

    async def stop(self) -> None:
        """Stop admitting jobs; the running job is stopped and stays queued for the next start."""
        self.accepting = False
        await self.scheduler.shutdown()

    async def _read_manifest(self, uri: str) -> bytes:
        try:
            store, key = resolve_uri(uri, self.store, self.settings.s3_config())
            return await asyncio.wait_for(asyncio.to_thread(store.get, key), self.settings.store_call_timeout_s)
        except InvalidKey as exc:
            raise InvalidRequest(f"manifest_uri: {exc}") from exc
        except ObjectNotFound as exc:
            raise InvalidRequest(f"manifest_uri: no manifest at {uri!r}") from exc
        except (StoreUnavailable, TimeoutError) as exc:
            raise StoreDown(f"cannot read the manifest {uri!r}: {exc or 'timed out'}") from exc

    async def create_job(self, manifest_uri: str, job_id: str = "", labels: dict[str, str] | None = None) -> JobRecord:
        if not self.accepting:
            raise NotAccepting("the trainer is not accepting jobs (starting or shutting down)")
        if not manifest_uri:
            raise InvalidRequest("manifest_uri: is required")
        job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
        try:
            validate_job_id(job_id)
        except InvalidName as exc:
            raise InvalidRequest(f"job_id: {exc}") from exc
        data = await self._read_manifest(manifest_uri)
        try:
            manifest = parse_manifest(data, max_lora_rank=self.settings.serving_max_lora_rank)
        except ManifestError as exc:
            raise InvalidRequest(str(exc)) from exc
        job = JobRecord(
            id=job_id,
            state=JobState.QUEUED,
            manifest_uri=manifest_uri,
            manifest=manifest.model_dump(mode="json"),
            adapter_name=manifest.adapter_name,
            base_model=manifest.base_model,
            labels=manifest.labels | dict(labels or {}),
            created_at=time.time(),
        )
        await asyncio.to_thread(self.jobs.insert, job, f"queued; will publish {job.adapter_name}@{job.id}")
        await self.scheduler.bus.publish()
        self.metrics.set_job_counts(await asyncio.to_thread(self.jobs.count_by_state))
        self.scheduler.wake()
        return job

    async def get_job(self, job_id: str) -> JobRecord:
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def list_jobs(self, limit: int = 0, label_selector: dict[str, str] | None = None) -> list[JobRecord]:
        return await asyncio.to_thread(self.jobs.list_jobs, limit or DEFAULT_LIST_LIMIT, label_selector or {})

    async def cancel_job(self, job_id: str) -> JobRecord:
        job = await self.get_job(job_id)
        if not job.state.final:
            await self.scheduler.cancel(job_id)
        return await self.get_job(job_id)

    async def list_events(self, job_id: str, after_seq: int = 0, limit: int = 0) -> list[EventRecord]:
        await self.get_job(job_id)
        return await asyncio.to_thread(self.jobs.events, job_id, after_seq, limit or DEFAULT_EVENTS_LIMIT)

    async def watch_job(self, job_id: str, from_seq: int = 0) -> AsyncIterator[EventRecord]:
        """Recorded events from ``from_seq``, then live ones until the job reaches a final state."""
        await self.get_job(job_id)
        last = max(from_seq - 1, 0)
        bus = self.scheduler.bus
        while True:
            seen = bus.generation
            events = await asyncio.to_thread(self.jobs.events, job_id, last, DEFAULT_EVENTS_LIMIT)
            for event in events:
                last = event.seq
                yield event
            if events:
                continue  # there may be more than one page
            job = await self.get_job(job_id)
            if job.state.final or self.scheduler.stopping:
                # Events recorded between the read above and this check (the final one, typically).
                for event in await asyncio.to_thread(self.jobs.events, job_id, last, DEFAULT_EVENTS_LIMIT):
                    yield event
                return
            await bus.wait(seen, self.settings.job_poll_interval_s)
