"""The gRPC boundary: a thin servicer over TrainerService, plus the standard health service."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lorafleet.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from lorafleet_common.grpc_tls import GrpcTls, add_port
from lorafleet_trainer.errors import TrainerError, grpc_status
from lorafleet_trainer.jobstore import EventRecord, JobRecord
from lorafleet_trainer.service import TrainerService

SERVICE_NAME = "lorafleet.trainer.v1.TrainerService"

R = TypeVar("R")


def job_to_proto(job: JobRecord) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        id=job.id,
        state=cast(trainer_pb2.JobState, int(job.state)),
        manifest_uri=job.manifest_uri,
        adapter_name=job.adapter_name,
        adapter_version=job.id,
        base_model=job.base_model,
        adapter_uri=job.adapter_uri,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        step=job.step,
        total_steps=job.total_steps,
        loss=job.loss,
        trained_tokens=job.trained_tokens,
        labels=job.labels,
    )


def event_to_proto(event: EventRecord) -> trainer_pb2.JobEvent:
    message = trainer_pb2.JobEvent(
        seq=event.seq,
        job_id=event.job_id,
        time=event.time,
        kind=event.kind,
        state=cast(trainer_pb2.JobState, int(event.state)),
        message=event.message,
    )
    if event.progress:
        p = event.progress
        message.progress.CopyFrom(
            trainer_pb2.Progress(
                step=int(p.get("step", 0)),
                total_steps=int(p.get("total_steps", 0)),
                epoch=p.get("epoch", 0.0),
                loss=p.get("loss", 0.0),
                learning_rate=p.get("learning_rate", 0.0),
                tokens_per_second=p.get("tokens_per_second", 0.0),
                eta_seconds=p.get("eta_seconds", 0.0),
                peak_memory_bytes=int(p.get("peak_memory_bytes", 0)),
                eval_loss=p.get("eval_loss"),  # unset unless the step evaluated the validation rows
            )
        )
    return message


def _mapped(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Turn domain errors into the status codes of errors.GRPC_STATUS."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> R:
        try:
            return await method(self, request, context)
        except TrainerError as exc:
            await context.abort(grpc_status(exc), str(exc))
            raise  # unreachable: abort raises

    return wrapper


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(self, service: TrainerService) -> None:
        self.service = service

    @_mapped
    async def CreateJob(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.Job:
        job = await self.service.create_job(request.manifest_uri, request.job_id, dict(request.labels))
        return job_to_proto(job)

    @_mapped
    async def GetJob(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.Job:
        return job_to_proto(await self.service.get_job(request.job_id))

    @_mapped
    async def ListJobs(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.ListJobsResponse:
        jobs = await self.service.list_jobs(request.limit, dict(request.label_selector))
        return trainer_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs])

    @_mapped
    async def CancelJob(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.Job:
        return job_to_proto(await self.service.cancel_job(request.job_id))

    @_mapped
    async def ListJobEvents(self, request: Any, context: grpc.aio.ServicerContext) -> trainer_pb2.ListJobEventsResponse:
        events = await self.service.list_events(request.job_id, request.after_seq, request.limit)
        return trainer_pb2.ListJobEventsResponse(events=[event_to_proto(e) for e in events])

    async def WatchJob(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[trainer_pb2.JobEvent]:
        try:
            async for event in self.service.watch_job(request.job_id, request.from_seq):
                yield event_to_proto(event)
        except TrainerError as exc:
            await context.abort(grpc_status(exc), str(exc))


class TrainerGrpcServer:
    """grpc.aio server with the trainer and health services; NOT_SERVING until ``set_serving(True)``.

    With ``tls`` the port requires mTLS: only clients with a certificate the CA bundle signed get in.
    """

    def __init__(self, service: TrainerService, host: str, port: int, tls: GrpcTls | None = None) -> None:
        self.server = grpc.aio.server()
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(service), self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = add_port(self.server, f"{host}:{port}", tls)
        if self.port == 0:
            raise OSError(f"cannot bind the trainer gRPC server to {host}:{port}")

    async def start(self) -> None:
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)
