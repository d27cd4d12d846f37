"""FineTuningService: OpenAI fine-tuning requests in, manifests + trainer calls out, scoped to one tenant.

Every job carries the label tenant=<id>; every route checks it, so another
tenant's job id answers exactly what a missing one does. Jobs without the
label (created straight at the trainer) belong to the default tenant, like
un-namespaced adapters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from lorafleet.trainer.v1 import trainer_pb2
from lorafleet_common.names import InvalidName, validate_job_id
from lorafleet_common.store import ObjectStore, StoreError
from lorafleet_gateway.errors import GatewayError, InvalidRequest, ModelNotFound, NotFound, ServiceUnavailable
from lorafleet_gateway.files.service import FileService
from lorafleet_gateway.fine_tuning.manifest import (
    JOB_PREFIX,
    build_manifest,
    dataset_mix,
    fine_tuned_model_for,
    manifest_key,
    reported_hyperparameters,
)
from lorafleet_gateway.fine_tuning.schemas import FineTuningJobCreate
from lorafleet_gateway.fine_tuning.stream import JobEventStream
from lorafleet_gateway.fine_tuning.view import (
    DATASETS_LABEL,
    TENANT_LABEL,
    checkpoint_object,
    event_object,
    event_seq,
    job_object,
)
from lorafleet_gateway.tenancy.keys import DEFAULT_TENANT
from lorafleet_gateway.upstream.trainer import TrainerClient

logger = logging.getLogger(__name__)

# The trainer has no list cursor: read this many newest jobs / events and paginate here.
MAX_LISTED_JOBS = 1000
MAX_LISTED_EVENTS = 10000


def _page(items: list[dict[str, Any]], after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return items[:limit], len(items) > limit


def owner_of(job: trainer_pb2.Job) -> str:
    return job.labels.get(TENANT_LABEL, DEFAULT_TENANT)


def job_not_found(job_id: str) -> NotFound:
    # One message for "no such job" and "another tenant's job": the two must be indistinguishable.
    return NotFound(f"No fine-tuning job found with id '{job_id}'", param="fine_tuning_job_id")


class FineTuningService:
    """Owns /v1/fine_tuning/jobs."""

    def __init__(self, store: ObjectStore, trainer: TrainerClient, files: FileService, base_model: str) -> None:
        self._store = store
        self._trainer = trainer
        self._files = files
        self._base_model = base_model

    async def create(self, tenant: str, body: FineTuningJobCreate) -> dict[str, Any]:
        """Write the manifest to manifests/<tenant>/<job-id>.json and queue it with the trainer."""
        if body.model != self._base_model:
            raise ModelNotFound(
                f"The model '{body.model}' cannot be fine-tuned here; this fleet fine-tunes '{self._base_model}'",
                param="model",
            )
        await self._require_file(tenant, body.training_file, "training_file")
        if body.validation_file:
            await self._require_file(tenant, body.validation_file, "validation_file")
        extra = (body.lorafleet.datasets if body.lorafleet else None) or []
        for index, ref in enumerate(extra):
            await self._require_file(tenant, ref.file, f"lorafleet.datasets[{index}].file")
        mix = dataset_mix(body)
        job_id = f"{JOB_PREFIX}{secrets.token_hex(6)}"
        fine_tuned_model = fine_tuned_model_for(self._base_model, tenant, body.suffix, job_id)
        adapter_name = f"{tenant}/{fine_tuned_model}"
        labels = {TENANT_LABEL: tenant, "training_file": body.training_file, "model": body.model}
        # The trainer's Job has no dataset list; this label carries the mix back for the job object.
        labels[DATASETS_LABEL] = json.dumps(mix, separators=(",", ":"))
        if body.suffix:
            labels["suffix"] = body.suffix
        if body.validation_file:  # the manifest's validation.datasets (build_manifest); the label is for the job object
            labels["validation_file"] = body.validation_file
        manifest = build_manifest(
            body, tenant=tenant, base_model=self._base_model, adapter_name=adapter_name, labels=labels
        )
        # The trainer's Job has no hyperparameters; labels carry them back for the OpenAI job object.
        labels.update(reported_hyperparameters(manifest["training"]))
        manifest["labels"] = labels
        key = manifest_key(tenant, job_id)
        try:
            await asyncio.to_thread(self._store.put, key, json.dumps(manifest, indent=2).encode())
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while writing the manifest: {exc}") from exc
        try:
            job = await self._trainer.create_job(key, job_id, labels)
        except GatewayError:
            with contextlib.suppress(StoreError):
                await asyncio.to_thread(self._store.delete, key)
            raise
        logger.info(
            "fine-tuning job %s queued for %s: %s from %s",
            job_id,
            tenant,
            adapter_name,
            ", ".join(f"{e['file']}#{e['samples']}" if e["samples"] else e["file"] for e in mix),
        )
        return job_object(job, tenant)

    async def _require_file(self, tenant: str, file_id: str, param: str) -> None:
        try:
            file = await self._files.get(tenant, file_id)
        except NotFound as exc:
            raise InvalidRequest(f"invalid {param}: no uploaded file {file_id!r}", param=param) from exc
        if file.purpose != "fine-tune":
            raise InvalidRequest(f"invalid {param}: file {file_id!r} has purpose {file.purpose!r}", param=param)

    async def _job(self, tenant: str, job_id: str) -> trainer_pb2.Job:
        """The tenant's job, or the same 404 whether it is missing or someone else's."""
        try:
            job = await self._trainer.get_job(validate_job_id(job_id))
        except (InvalidName, NotFound) as exc:
            raise job_not_found(job_id) from exc
        if owner_of(job) != tenant:
            raise job_not_found(job_id)
        return job

    async def list_jobs(self, tenant: str, *, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        if tenant == DEFAULT_TENANT:  # also the unlabelled jobs: filter here
            jobs = [j for j in await self._trainer.list_jobs(limit=MAX_LISTED_JOBS) if owner_of(j) == tenant]
        else:
            jobs = await self._trainer.list_jobs(limit=MAX_LISTED_JOBS, label_selector={TENANT_LABEL: tenant})
        return _page([job_object(job, tenant) for job in jobs if owner_of(job) == tenant], after, limit)

    async def get(self, tenant: str, job_id: str) -> dict[str, Any]:
        return job_object(await self._job(tenant, job_id), tenant)

    async def cancel(self, tenant: str, job_id: str) -> dict[str, Any]:
        job = await self._job(tenant, job_id)
        try:
            return job_object(await self._trainer.cancel_job(job.id), tenant)
        except NotFound as exc:
            raise job_not_found(job_id) from exc

    async def events(
        self, tenant: str, job_id: str, *, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """Events newest first; ``after`` is the id of the last event of the previous page."""
        if after is not None and event_seq(after) is None:
            raise InvalidRequest(f"invalid event id {after!r}", param="after")
        job = await self._job(tenant, job_id)
        events = await self._trainer.list_events(job.id, keep_last=MAX_LISTED_EVENTS)
        return _page([event_object(event, job, tenant) for event in reversed(events)], after, limit)

    async def watch(self, tenant: str, job_id: str, *, after: str | None, timeout_s: float) -> JobEventStream:
        """The job's events after ``after`` (an event id; None: from the first), then live ones.

        The job is checked here, so a missing or foreign job is a 404 before any byte is streamed.
        """
        from_seq = 1
        if after is not None:
            seq = event_seq(after)
            if seq is None:
                raise InvalidRequest(f"invalid event id {after!r}", param="after")
            from_seq = seq + 1
        job = await self._job(tenant, job_id)
        watch = self._trainer.watch_job(job.id, from_seq=from_seq, timeout_s=timeout_s)
        return JobEventStream(watch, self._trainer, job, tenant)

    async def checkpoints(
        self, tenant: str, job_id: str, *, after: str | None, limit: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """The job's checkpoints, newest first: the trainer's "checkpoint" events, if it records any."""
        job = await self._job(tenant, job_id)
        fine_tuned_model = job_object(job, tenant)["fine_tuned_model"]
        events = await self._trainer.list_events(job.id, keep_last=MAX_LISTED_EVENTS)
        checkpoints = [checkpoint_object(e, fine_tuned_model) for e in reversed(events) if e.kind == "checkpoint"]
        return _page(checkpoints, after, limit)
