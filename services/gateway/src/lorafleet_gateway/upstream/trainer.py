"""The trainer's gRPC API, with a deadline on every call and errors mapped through the one table."""

from __future__ import annotations

from collections import deque
from typing import Any

import grpc

from lorafleet.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from lorafleet_common.grpc_tls import GrpcTls
from lorafleet_gateway.errors import from_grpc
from lorafleet_gateway.upstream.channels import open_channel

_EVENTS_PAGE = 1000
_MAX_EVENT_PAGES = 100


class JobWatch:
    """One WatchJob call: ``next()`` gives its events one by one; ``cancel()`` ends it (safe to call twice)."""

    def __init__(self, call: Any, upstream: str) -> None:
        self._call = call
        self._upstream = upstream

    async def next(self) -> trainer_pb2.JobEvent | None:
        """The next event; None once the stream ended: the job is final, or the call's deadline passed
        (the caller resumes from the last seq it saw). Other failures raise through the error table."""
        try:
            event = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None
            raise from_grpc(exc, upstream=self._upstream, param="fine_tuning_job_id") from exc
        return None if event is grpc.aio.EOF else event

    def cancel(self) -> None:
        self._call.cancel()


class TrainerClient:
    """Thin async wrapper over TrainerServiceStub."""

    def __init__(self, target: str, *, connect_timeout_s: float, timeout_s: float, tls: GrpcTls | None = None) -> None:
        self.target = target
        self._tls = tls
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def start(self) -> None:
        self._channel = open_channel(self.target, connect_timeout_s=self._connect_timeout_s, tls=self._tls)
        self._stub = trainer_pb2_grpc.TrainerServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    async def _call(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc, upstream=f"trainer {self.target}", param="fine_tuning_job_id") from exc

    async def create_job(self, manifest_uri: str, job_id: str, labels: dict[str, str]) -> trainer_pb2.Job:
        request = trainer_pb2.CreateJobRequest(manifest_uri=manifest_uri, job_id=job_id, labels=labels)
        return await self._call("CreateJob", request)

    async def get_job(self, job_id: str) -> trainer_pb2.Job:
        return await self._call("GetJob", trainer_pb2.GetJobRequest(job_id=job_id))

    async def list_jobs(self, limit: int, label_selector: dict[str, str] | None = None) -> list[trainer_pb2.Job]:
        request = trainer_pb2.ListJobsRequest(limit=limit, label_selector=label_selector or {})
        response = await self._call("ListJobs", request)
        return list(response.jobs)

    async def cancel_job(self, job_id: str) -> trainer_pb2.Job:
        return await self._call("CancelJob", trainer_pb2.CancelJobRequest(job_id=job_id))

    async def list_events(self, job_id: str, *, keep_last: int) -> list[trainer_pb2.JobEvent]:
        """The newest ``keep_last`` recorded events of a job, oldest first.

        ListJobEvents pages forward from the oldest event, so this reads every
        page (bounded) and keeps the tail.
        """
        events: deque[trainer_pb2.JobEvent] = deque(maxlen=keep_last)
        after = 0
        for _page in range(_MAX_EVENT_PAGES):
            request = trainer_pb2.ListJobEventsRequest(job_id=job_id, after_seq=after, limit=_EVENTS_PAGE)
            page = list((await self._call("ListJobEvents", request)).events)
            events.extend(page)
            if len(page) < _EVENTS_PAGE:
                break
            after = page[-1].seq
        return list(events)

    def watch_job(self, job_id: str, *, from_seq: int, timeout_s: float) -> JobWatch:
        """Start WatchJob: the recorded events from ``from_seq``, then live ones until the job is final.

        ``timeout_s`` bounds the whole call (a job may run for hours, so it is
        longer than trainer_timeout_s; clients resume after it).
        """
        request = trainer_pb2.WatchJobRequest(job_id=job_id, from_seq=from_seq)
        return JobWatch(self._stub.WatchJob(request, timeout=timeout_s), f"trainer {self.target}")
