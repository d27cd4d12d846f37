"""Runs queued jobs one at a time (FIFO), each in its own worker.

A ``Launcher`` starts the worker (a local process group, or a Kubernetes Job) and
lets the scheduler signal it on cancel or shutdown. Its JSON-line events become job events in the database;
watchers are woken through ``EventBus``. A job re-queued mid-run resumes from
its latest checkpoint (the worker looks for one); a job's checkpoints are
deleted once it reaches a final state, whichever it is: nothing can resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from lorafleet_common.store import ObjectStore, StoreError
from lorafleet_trainer.checkpoint import discard_checkpoints
from lorafleet_trainer.eventbus import EventBus
from lorafleet_trainer.jobstore import EventRecord, JobRecord, JobState, JobStore
from lorafleet_trainer.launch import Launcher, LocalLauncher, Worker
from lorafleet_trainer.metrics import TrainerMetrics
from lorafleet_trainer.notify import preload_adapter
from lorafleet_trainer.protocol import S3Settings, WorkerEvent, WorkerSpec, parse_event_line
from lorafleet_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

ACTIVE = (JobState.VALIDATING, JobState.RUNNING)


@dataclass
class RunningJob:
    job_id: str
    state: JobState = JobState.VALIDATING
    worker: Worker | None = None
    cancelled: bool = False
    requeue: bool = False
    publishing: bool = False
    published: bool = False
    error: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Scheduler:
    def __init__(
        self,
        settings: TrainerSettings,
        jobs: JobStore,
        metrics: TrainerMetrics,
        store: ObjectStore,
        launcher: Launcher | None = None,
    ) -> None:
        self.settings = settings
        self.launcher = launcher or LocalLauncher()
        self.jobs = jobs
        self.store = store
        self.metrics = metrics
        self.bus = EventBus()
        self.work_dir = settings.resolved_work_dir()
        self.stopping = False
        self._wake = asyncio.Event()
        self._current: RunningJob | None = None
        self._task: asyncio.Task[None] | None = None

    async def record(self, job_id: str, kind: str, state: JobState, message: str, **kwargs: Any) -> EventRecord | None:
        event = await asyncio.to_thread(self.jobs.append_event, job_id, kind, state, message, **kwargs)
        if event is not None:
            if state.final:  # before watchers hear of the end: they may look at the store next
                await self._discard_checkpoints(job_id)
            await self.bus.publish()
            if kind in ("state", "published"):
                self.metrics.set_job_counts(await asyncio.to_thread(self.jobs.count_by_state))
        return event

    async def _discard_checkpoints(self, job_id: str) -> None:
        """Best effort: a leftover checkpoint only takes space, it is never resumed (the job is final)."""
        try:
            await asyncio.wait_for(
                asyncio.to_thread(discard_checkpoints, self.store, job_id), self.settings.store_call_timeout_s
            )
        except (StoreError, OSError, TimeoutError) as exc:
            log.warning("job %s: its checkpoints could not be deleted: %s", job_id, exc)

    async def recover(self) -> None:
        """Jobs a previous process left mid-run go back to the queue (they resume from their latest checkpoint)."""
        for job in await asyncio.to_thread(self.jobs.in_states, *ACTIVE):
            await self.record(
                job.id,
                "state",
                JobState.QUEUED,
                f"re-queued: the trainer restarted while the job was {job.state.name.lower()}",
                only_from=ACTIVE,
                step=0,
            )
        self.metrics.set_job_counts(await asyncio.to_thread(self.jobs.count_by_state))

    def start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._loop(), name="trainer-scheduler")

    def wake(self) -> None:
        self._wake.set()

    async def _loop(self) -> None:
        while not self.stopping:
            self._wake.clear()
            try:
                queued = await asyncio.to_thread(self.jobs.in_states, JobState.QUEUED)
            except Exception:
                log.exception("cannot read the job queue; retrying")
                queued = []
            if queued and not self.stopping:
                try:
                    await self._run(queued[0])
                    continue
                except Exception:
                    log.exception("job %s could not be run; retrying later", queued[0].id)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.job_poll_interval_s)

    async def _run(self, job: JobRecord) -> None:
        run = RunningJob(job.id)
        self._current = run  # before the claim, so a cancel racing with it finds the job
        try:
            claimed = await self.record(
                job.id,
                "state",
                JobState.VALIDATING,
                "validating the datasets and the base model",
                only_from=(JobState.QUEUED,),
                started_at=time.time(),
                error="",
            )
            if claimed is not None:
                await self._supervise(job, run)
        except asyncio.CancelledError:
            # Shutdown gave up waiting: never leave a worker behind (it runs in its own session).
            if run.worker is not None and not run.worker.exited:
                run.worker.kill_now()
            raise
        except Exception as exc:
            log.exception("job %s: supervisor error", job.id)
            await self._stop_worker(run)
            try:
                await self._finish(run, JobState.FAILED, f"trainer error while supervising the job: {exc}")
            except Exception:  # the database is down: the job stays active and is re-queued on the next start
                log.exception("job %s: cannot record the failure", job.id)
        finally:
            self._current = None
            run.done.set()

    def _spec(self, job: JobRecord) -> WorkerSpec:
        s = self.settings
        s3 = S3Settings(
            endpoint=s.s3_endpoint,
            access_key=s.s3_access_key,
            secret_key=s.s3_secret_key.get_secret_value(),
            secure=s.s3_secure,
            region=s.s3_region,
            timeout_s=s.store_timeout_s,
        )
        return WorkerSpec(
            job_id=job.id,
            manifest=job.manifest,
            store_url=s.resolved_store_url(),
            s3=s3,
            model_cache_dir=str(s.model_cache_dir),
            torch_threads=s.torch_threads,
            hub_download=s.hub_download,
            serving_max_lora_rank=s.serving_max_lora_rank,
            checkpoint_keep=s.checkpoint_keep,
        )

    async def _supervise(self, job: JobRecord, run: RunningJob) -> None:
        worker = run.worker = await self.launcher.launch(self._spec(job), self.work_dir / job.id)
        try:
            if run.cancelled or run.requeue:  # asked to stop while the worker was starting
                await self._stop_worker(run)
            async for line in worker.lines():
                event = parse_event_line(line)
                if event is not None:
                    await self._on_worker_event(job.id, run, event)
            code = await worker.wait()
            failure_detail = "" if run.published or run.error else worker.log_tail()
        finally:
            await worker.close()
        if run.published:
            await self._notify_inference(job)
            return
        if run.error:  # the worker reported why it failed before anyone asked it to stop
            await self._finish(run, JobState.FAILED, run.error)
        elif run.requeue:
            await self._finish(run, JobState.QUEUED, "re-queued: the trainer is shutting down")
        elif run.cancelled:
            await self._finish(run, JobState.CANCELLED, "cancelled; nothing was published")
        else:
            reason = f"the worker exited with code {code} without a result. {failure_detail}"
            await self._finish(run, JobState.FAILED, reason.strip())

    async def _on_worker_event(self, job_id: str, run: RunningJob, event: WorkerEvent) -> None:
        if event.kind == "state" and event.state == "RUNNING":
            run.state = JobState.RUNNING
            changes = {"total_steps": event.total_steps or 0, "step": event.step or 0}  # step: where it resumed
            await self.record(job_id, "state", run.state, event.message, **changes)
        elif event.kind == "progress" and event.progress:
            p = event.progress
            self.metrics.step(p.get("tokens_per_second", 0.0), p.get("loss", 0.0))
            await self.record(
                job_id,
                "progress",
                run.state,
                event.message,
                progress=p,
                step=int(p.get("step", 0)),
                total_steps=int(p.get("total_steps", 0)),
                loss=float(p.get("loss", 0.0)),
                trained_tokens=event.trained_tokens or 0,
            )
        elif event.kind == "checkpoint" and event.progress:
            await self.record(job_id, "checkpoint", run.state, event.message, progress=event.progress)
        elif event.kind == "publishing":
            run.publishing = True
            await self.record(job_id, "log", run.state, event.message)
        elif event.kind == "published":
            run.published = True
            await self.record(
                job_id,
                "published",
                JobState.SUCCEEDED,
                event.message,
                adapter_uri=event.adapter_uri or "",
                finished_at=time.time(),
            )
            self.metrics.job_finished(JobState.SUCCEEDED)
        elif event.kind == "failed":
            run.error = event.error or "the worker reported a failure without a reason"
        elif event.kind == "log":
            await self.record(job_id, "log", run.state, event.message)

    async def _notify_inference(self, job: JobRecord) -> None:
        """Best effort: ask the configured inference replicas to load the adapter just published."""
        targets = self.settings.notify_inference
        if not targets:
            return
        name = job.adapter_name
        timeout = self.settings.notify_timeout_s
        try:
            results = await preload_adapter(targets, name, job.id, timeout, self.settings.grpc_tls())
            for result in results:
                if result.error is None:
                    message = f"preloaded on {result.target}"
                else:
                    message = f"warning: {name}@{job.id} could not be preloaded on {result.target}: {result.error}"
                await self._note(job.id, message)
        except Exception:  # the job succeeded: nothing here may change that
            log.exception("job %s: telling the inference replicas failed", job.id)

    async def _note(self, job_id: str, message: str) -> None:
        """A "log" event on a job that already succeeded (``record`` would discard checkpoints again)."""
        event = await asyncio.to_thread(self.jobs.append_event, job_id, "log", JobState.SUCCEEDED, message)
        if event is not None:
            await self.bus.publish()

    async def _finish(self, run: RunningJob, state: JobState, message: str) -> None:
        changes: dict[str, Any] = {"finished_at": time.time()} if state.final else {"step": 0}
        if state is JobState.FAILED:
            changes["error"] = message
        recorded = await self.record(run.job_id, "state", state, message, only_from=ACTIVE, **changes)
        if recorded is not None and state.final:
            self.metrics.job_finished(state)

    async def _stop_worker(self, run: RunningJob) -> None:
        """SIGTERM the worker, SIGKILL it after the grace period."""
        worker = run.worker
        if worker is None or worker.exited:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            await worker.signal(sig)
            try:
                await asyncio.wait_for(worker.wait(), self.settings.cancel_grace_s)
                return
            except TimeoutError:
                continue

    async def cancel(self, job_id: str) -> None:
        """Cancel a queued job at once; stop a running one and wait until it is recorded as cancelled."""
        now = time.time()
        queued = await self.record(
            job_id,
            "state",
            JobState.CANCELLED,
            "cancelled while queued",
            only_from=(JobState.QUEUED,),
            finished_at=now,
        )
        if queued is not None:
            self.metrics.job_finished(JobState.CANCELLED)
            return
        run = self._current
        if run is None or run.job_id != job_id:
            # Active in the database but no worker of ours runs it (a crash left it so): just record the cancel.
            orphan = await self.record(
                job_id,
                "state",
                JobState.CANCELLED,
                "cancelled; nothing was published",
                only_from=ACTIVE,
                finished_at=now,
            )
            if orphan is not None:
                self.metrics.job_finished(JobState.CANCELLED)
            return
        if run.publishing:
            return  # too late: the adapter is being published and the job is about to succeed
        run.cancelled = True
        await self._stop_worker(run)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.done.wait(), self.settings.cancel_grace_s * 2 + 5)

    async def shutdown(self) -> None:
        """Stop taking jobs; the running one is stopped and goes back to the queue."""
        self.stopping = True
        self._wake.set()
        run = self._current
        if run is not None:
            if not run.published:
                run.requeue = True
                if run.publishing:  # let a publish in flight finish if it can
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(run.done.wait(), self.settings.cancel_grace_s)
                await self._stop_worker(run)
            # Let the supervisor record the outcome and reap the worker.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.done.wait(), self.settings.cancel_grace_s * 2 + 5)
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), self.settings.cancel_grace_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.bus.publish()  # watchers notice ``stopping``
