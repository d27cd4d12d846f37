"""Each training job as a Kubernetes Job: the ``Launcher`` behind ``LORAFLEET_TRAINER_LAUNCHER=kubernetes``.

The trainer keeps the queue, the events and resume; only the worker process moves into a pod
(k8s_objects.py builds it). Per launch: a Job running the worker in the trainer image, and a
Secret holding its spec (with the S3 keys), owned by the Job. The pod's log is the worker's report:
its JSON lines are the events, as a local worker's stdout is, and the rest is its log. A cancel
deletes the Job and its pod with the grace period; a pod that never starts (image pull error,
unschedulable) fails the job with the pod's reason after ``k8s_start_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import signal
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from lorafleet_trainer.k8s_api import KubernetesApi, KubernetesApiError, connect
from lorafleet_trainer.k8s_objects import CONTAINER, JOB_LABEL, TRAINER_LABEL, build_job, job_label_value
from lorafleet_trainer.launch import Worker, format_tail
from lorafleet_trainer.protocol import LOG_FILE, WorkerSpec, parse_event_line
from lorafleet_trainer.settings import TrainerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

POLL_S = 1.0  # how often a pod's state is read while it starts and once it stopped
LOG_OVERLAP_S = 10  # a re-opened log starts this much earlier than the last line seen (clocks differ)
STARTED = ("Running", "Succeeded", "Failed")
_STAMP = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d) ")


def split_stamp(raw: bytes) -> tuple[tuple[int, int] | None, bytes]:
    """(node time as (seconds, nanoseconds), the line) of a ``timestamps=true`` log line."""
    match = _STAMP.match(raw)
    if match is None:
        return None, raw
    zone = match.group(3).decode().replace("Z", "+00:00")
    seconds = int(datetime.fromisoformat(match.group(1).decode() + zone).timestamp())
    nanos = int((match.group(2) or b"0").decode().ljust(9, "0"))
    return (seconds, nanos), raw[match.end() :]


def pending_reason(pod: dict[str, Any]) -> str:
    """Why a pod is not running yet, in Kubernetes' own words."""
    status = pod.get("status") or {}
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            return f"{waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return f"{condition.get('reason') or 'Unschedulable'}: {condition.get('message') or ''}".rstrip(": ")
    return f"pod {pod['metadata']['name']} is {status.get('phase') or 'Pending'}"


def stopped(pod: dict[str, Any]) -> bool:
    """The pod is over: its worker container exited, or Kubernetes failed the pod without running it."""
    phase = (pod.get("status") or {}).get("phase")
    return terminated_state(pod) is not None or phase in ("Succeeded", "Failed")


def terminated_state(pod: dict[str, Any]) -> dict[str, Any] | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == CONTAINER:
            return (container.get("state") or {}).get("terminated")
    return None


class KubernetesLauncher:
    """Runs each job's worker as a Kubernetes Job in ``api.namespace``."""

    def __init__(self, settings: TrainerSettings, api: KubernetesApi) -> None:
        self.settings = settings
        self.api = api

    @classmethod
    def from_settings(cls, settings: TrainerSettings) -> KubernetesLauncher:
        api_client, namespace = connect(settings)
        return cls(settings, KubernetesApi(api_client, namespace, settings.k8s_api_timeout_s))

    async def launch(self, spec: WorkerSpec, job_dir: Path) -> Worker:
        job_dir.mkdir(parents=True, exist_ok=True)  # the worker's log stays on the trainer's volume
        await self._remove_leftovers(spec.job_id)
        objects = build_job(self.settings, self.api.namespace, spec)
        uid = await asyncio.to_thread(self.api.create_job, objects.job)
        try:
            await asyncio.to_thread(self.api.create_secret, objects.secret(spec, uid))
        except KubernetesApiError:
            with contextlib.suppress(KubernetesApiError):
                await asyncio.to_thread(self.api.delete_job, objects.name, 0)
            raise
        log.info("job %s: Kubernetes Job %s/%s created", spec.job_id, self.api.namespace, objects.name)
        return KubernetesWorker(self.api, self.settings, objects.name, job_dir)

    async def _remove_leftovers(self, job_id: str) -> None:
        """A trainer that died mid-job leaves its Job running: stop it now, so two workers never train one job
        (the new one resumes from the last checkpoint instead)."""
        selector = f"{TRAINER_LABEL}={self.settings.k8s_name_prefix},{JOB_LABEL}={job_label_value(job_id)}"
        for name in await asyncio.to_thread(self.api.list_jobs, selector):
            log.warning("job %s: deleting Kubernetes Job %s, left running by an earlier attempt", job_id, name)
            await asyncio.to_thread(self.api.delete_job, name, 0)
            for pod in await asyncio.to_thread(self.api.list_pods, name):
                await asyncio.to_thread(self.api.delete_pod, pod["metadata"]["name"], 0)


class KubernetesWorker:
    """One Kubernetes Job, seen as a ``Worker``.

    A monitor task owns the pod's life: it waits for the pod to start, follows its log (re-opening it
    when the connection drops, skipping the lines it already has by their timestamps) and then reads
    the container's exit code. ``lines()`` and ``wait()`` only consume what it found.
    """

    def __init__(self, api: KubernetesApi, settings: TrainerSettings, name: str, job_dir: Path) -> None:
        self.api = api
        self.settings = settings
        self.name = name
        self.job_dir = job_dir
        self._lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._signalled: signal.Signals | None = None
        self._tail: deque[str] = deque(maxlen=20)
        self._note = ""  # what Kubernetes says about how the pod ended, when the exit code is not enough
        self._last_stamp: tuple[int, int] | None = None  # the node's time of the last line read
        self._skip_through: tuple[int, int] | None = None
        self._last_line_at = 0.0
        self._stream: Any = None  # the open log response, cut on close
        # The log is read by a thread of its own: a stream silent for minutes must not hold a thread of
        # the shared pool the job store and the scheduler use.
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"log-{name}")
        self._log_file = (job_dir / LOG_FILE).open("ab")
        self._monitor = asyncio.create_task(self._follow(), name=f"k8s-job-{name}")

    async def lines(self) -> AsyncIterator[bytes]:
        while (line := await self._lines.get()) is not None:
            yield line

    async def wait(self) -> int:
        return await asyncio.shield(self._exit)

    @property
    def exited(self) -> bool:
        return self._exit.done()

    async def signal(self, sig: signal.Signals) -> None:
        """Delete the Job and its pod: SIGTERM with the grace period (the pod's own is the same), SIGKILL at once."""
        self._signalled = self._signalled or sig
        grace = 0 if sig == signal.SIGKILL else math.ceil(self.settings.cancel_grace_s)
        try:
            await self._call(self.api.delete_job, self.name, grace)
            for pod in await self._call(self.api.list_pods, self.name):
                await self._call(self.api.delete_pod, pod["metadata"]["name"], grace)
        except KubernetesApiError as exc:  # the caller escalates or gives up on its own deadline
            log.warning("stopping Kubernetes Job %s: %s", self.name, exc)

    def kill_now(self) -> None:
        self._signalled = self._signalled or signal.SIGKILL
        timeout = min(self.settings.k8s_api_timeout_s, 5.0)  # the event loop is being torn down: be quick
        try:
            self.api.delete_job(self.name, 0, timeout)
            for pod in self.api.list_pods(self.name, timeout):
                self.api.delete_pod(pod["metadata"]["name"], 0, timeout)
        except KubernetesApiError as exc:
            log.warning("killing Kubernetes Job %s: %s (its ttlSecondsAfterFinished removes it)", self.name, exc)

    async def close(self) -> None:
        self._cut_stream()
        self._monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._monitor
        self._reader.shutdown(wait=False)
        self._log_file.close()
        try:  # the Secret goes with the Job (owner reference); deleting it too covers a Job already gone
            await self._call(self.api.delete_job, self.name, math.ceil(self.settings.cancel_grace_s))
            await self._call(self.api.delete_secret, self.name)
        except KubernetesApiError as exc:
            log.warning("cleaning up Kubernetes Job %s: %s (its ttlSecondsAfterFinished removes it)", self.name, exc)

    def log_tail(self, lines: int = 5) -> str:
        return " ".join(part for part in (self._note, format_tail(list(self._tail), lines)) if part)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # -- the monitor -------------------------------------------------------------------------------

    async def _follow(self) -> None:
        code = 1
        try:
            pod = await self._wait_until_started()
            if pod is not None:
                await self._follow_log(pod)
                code = await self._exit_code(pod)
            elif self._signalled is not None:
                code = -self._signalled
        except KubernetesApiError as exc:
            self._note = f"The trainer lost track of Kubernetes Job {self.name}: {exc}."
        except Exception as exc:
            log.exception("Kubernetes Job %s: following it failed", self.name)
            self._note = f"The trainer lost track of Kubernetes Job {self.name}: {type(exc).__name__}: {exc}."
        finally:
            self._lines.put_nowait(None)
            if not self._exit.done():
                self._exit.set_result(code)

    async def _pods(self) -> list[dict[str, Any]]:
        return await self._call(self.api.list_pods, self.name)

    async def _pods_patiently(self) -> list[dict[str, Any]]:
        """The Job's pods, waiting out an API outage of up to ``k8s_log_idle_timeout_s`` (a running job's
        worker does not stop because the API server restarts)."""
        give_up = time.monotonic() + self.settings.k8s_log_idle_timeout_s
        while True:
            try:
                return await self._pods()
            except KubernetesApiError as exc:
                if time.monotonic() >= give_up or self._signalled is not None or exc.status in (401, 403):
                    raise
                log.warning("Kubernetes Job %s: %s; retrying", self.name, exc)
            await asyncio.sleep(POLL_S)

    async def _wait_until_started(self) -> str | None:
        """The pod's name once it runs (or ran); None when stopped first or it never started in time."""
        timeout = self.settings.k8s_start_timeout_s
        deadline = time.monotonic() + timeout
        reason = "the Job controller created no pod"
        while self._signalled is None:
            try:
                pods = await self._pods()
            except KubernetesApiError as exc:  # transient, or lasting: the deadline decides
                reason, pods = str(exc), []
            for pod in pods:
                if (pod.get("status") or {}).get("phase") in STARTED:
                    return str(pod["metadata"]["name"])
            if pods:
                reason = pending_reason(pods[0])
            if time.monotonic() >= deadline:
                self._report_failure(f"the job's Kubernetes pod did not start within {timeout:g} s: {reason}")
                return None
            await asyncio.sleep(POLL_S)
        return None

    def _report_failure(self, reason: str) -> None:
        """Tell the scheduler why, as a worker reports its own failures."""
        self._note = reason
        self._lines.put_nowait(json.dumps({"kind": "failed", "error": reason}).encode())

    async def _follow_log(self, pod: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            since = None
            if self._last_stamp is not None:  # re-opening: from a little before the last line we have
                since = math.ceil(time.monotonic() - self._last_line_at) + LOG_OVERLAP_S
                self._skip_through = self._last_stamp
            try:
                self._stream = await self._call(
                    self.api.open_log, pod, CONTAINER, since, self.settings.k8s_log_idle_timeout_s
                )
            except KubernetesApiError as exc:
                if exc.status == 404:
                    return  # the pod is gone
                if exc.status in (401, 403):
                    raise  # no right to read logs: waiting will not grant it
                log.warning("Kubernetes Job %s: %s; retrying", self.name, exc)
            else:
                try:
                    await loop.run_in_executor(self._reader, self._read_stream, self._stream, loop)
                finally:
                    self._cut_stream()
            # The stream ended: the container exited, or the connection dropped or idled out.
            pods = {p["metadata"]["name"]: p for p in await self._pods_patiently()}
            if pod not in pods or stopped(pods[pod]) or self._signalled is not None:
                return
            await asyncio.sleep(POLL_S)

    def _read_stream(self, response: Any, loop: asyncio.AbstractEventLoop) -> None:
        """In the reader thread: hand each complete line to the event loop, in order."""
        buffer = b""
        try:
            while chunk := response.read1(65536):
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    loop.call_soon_threadsafe(self._on_line, raw)
        except Exception as exc:  # a read timeout, a dropped connection, or close() cutting it
            log.debug("Kubernetes Job %s: log stream ended: %s", self.name, exc)
            return  # a partial last line comes again, whole, when the stream is re-opened
        if buffer:
            loop.call_soon_threadsafe(self._on_line, buffer)

    def _on_line(self, raw: bytes) -> None:
        stamp, line = split_stamp(raw.rstrip(b"\r"))
        if self._skip_through is not None:  # a re-opened stream repeats the lines read before it broke
            if stamp is None or stamp <= self._skip_through:
                return
            self._skip_through = None
        if stamp is not None:
            self._last_stamp = stamp
        self._last_line_at = time.monotonic()
        if parse_event_line(line) is None:  # not an event: the worker's log
            self._log_file.write(line + b"\n")
            self._log_file.flush()
            if text := line.decode(errors="replace").strip():
                self._tail.append(text)
        self._lines.put_nowait(line)

    async def _exit_code(self, pod: str) -> int:
        """The worker container's exit code; Kubernetes' reason goes into the log tail when it failed."""
        deadline = time.monotonic() + self.settings.k8s_api_timeout_s
        while True:
            found = [p for p in await self._pods_patiently() if p["metadata"]["name"] == pod]
            if not found:
                if self._signalled is not None:
                    return -self._signalled
                self._note = (
                    f"Pod {pod} went away before its worker finished (eviction, the Job's activeDeadlineSeconds, "
                    "or deleted by hand)."
                )
                return -signal.SIGKILL
            terminated = terminated_state(found[0])
            if terminated is not None:
                code = int(terminated.get("exitCode", 1))
                if code != 0:
                    message = terminated.get("message") or (found[0].get("status") or {}).get("message") or ""
                    detail = f"{terminated.get('reason') or 'Error'}{': ' + message.strip() if message else ''}"
                    self._note = f"Pod {pod}: {detail} (exit code {code})."
                return code
            if stopped(found[0]) or time.monotonic() >= deadline:  # e.g. rejected by the node before it ran
                status = found[0].get("status") or {}
                why = ": ".join(str(status[k]) for k in ("reason", "message") if status.get(k))
                self._note = f"Pod {pod} reports no exit code ({why or pending_reason(found[0])})."
                return 1
            await asyncio.sleep(POLL_S)

    def _cut_stream(self) -> None:
        """Unblock the reader thread (urllib3 >= 2.3 can shut a response's socket from another thread) and drop
        the connection: a log stream cut short must not go back to the pool with unread data on it."""
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.shutdown()
            with contextlib.suppress(Exception):
                stream.close()
