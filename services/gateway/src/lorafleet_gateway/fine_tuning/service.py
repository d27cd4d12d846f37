"""FineTuningService: OpenAI fine-tuning requests in, manifests + trainer calls out."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any

from lorafleet_common.names import InvalidName, validate_job_id
from lorafleet_common.store import ObjectStore, StoreError
from lorafleet_gateway.errors import GatewayError, InvalidRequest, ModelNotFound, NotFound, ServiceUnavailable
from lorafleet_gateway.files.service import FileService
from lorafleet_gateway.fine_tuning.manifest import (
    JOB_PREFIX,
    adapter_name_for,
    build_manifest,
    manifest_key,
    reported_hyperparameters,
)
from lorafleet_gateway.fine_tuning.schemas import FineTuningJobCreate
from lorafleet_gateway.fine_tuning.view import event_object, event_seq, job_object
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


class FineTuningService:
    """Owns /v1/fine_tuning/jobs."""

    def __init__(self, store: ObjectStore, trainer: TrainerClient, files: FileService, base_model: str) -> None:
        self._store = store
        self._trainer = trainer
        self._files = files
        self._base_model = base_model

    async def create(self, body: FineTuningJobCreate) -> dict[str, Any]:
        """Write the manifest to manifests/<job-id>.json and queue it with the trainer."""
        if body.model != self._base_model:
            raise ModelNotFound(
                f"The model '{body.model}' cannot be fine-tuned here; this fleet fine-tunes '{self._base_model}'",
                param="model",
            )
        await self._require_file(body.training_file, "training_file")
        if body.validation_file:
            await self._require_file(body.validation_file, "validation_file")
        job_id = f"{JOB_PREFIX}{secrets.token_hex(6)}"
        adapter_name = adapter_name_for(self._base_model, body.suffix, job_id)
        labels = {"training_file": body.training_file, "model": body.model}
        if body.suffix:
            labels["suffix"] = body.suffix
        if body.validation_file:
            # The manifest has no validation datasets yet: the file is checked and recorded, not evaluated.
            labels["validation_file"] = body.validation_file
        manifest = build_manifest(body, base_model=self._base_model, adapter_name=adapter_name, labels=labels)
        # The trainer's Job has no hyperparameters; labels carry them back for the OpenAI job object.
        labels.update(reported_hyperparameters(manifest["training"]))
        manifest["labels"] = labels
        key = manifest_key(job_id)
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
        logger.info("fine-tuning job %s queued: adapter %s from %s", job_id, adapter_name, body.training_file)
        return job_object(job)

    async def _require_file(self, file_id: str, param: str) -> None:
        try:
            file = await self._files.get(file_id)
        except NotFound as exc:
            raise InvalidRequest(f"invalid {param}: no uploaded file {file_id!r}", param=param) from exc
        if file.purpose != "fine-tune":
            raise InvalidRequest(f"invalid {param}: file {file_id!r} has purpose {file.purpose!r}", param=param)

    async def list_jobs(self, *, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        jobs = await self._trainer.list_jobs(limit=MAX_LISTED_JOBS)
        return _page([job_object(job) for job in jobs], after, limit)

    async def get(self, job_id: str) -> dict[str, Any]:
        return job_object(await self._trainer.get_job(_job_id(job_id)))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return job_object(await self._trainer.cancel_job(_job_id(job_id)))

    async def events(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Events newest first; ``after`` is the id of the last event of the previous page."""
        if after is not None and event_seq(after) is None:
            raise InvalidRequest(f"invalid event id {after!r}", param="after")
        events = await self._trainer.list_events(_job_id(job_id), keep_last=MAX_LISTED_EVENTS)
        return _page([event_object(event) for event in reversed(events)], after, limit)


def _job_id(job_id: str) -> str:
    try:
        return validate_job_id(job_id)
    except InvalidName as exc:
        raise NotFound(f"No fine-tuning job {job_id!r}", param="fine_tuning_job_id") from exc
