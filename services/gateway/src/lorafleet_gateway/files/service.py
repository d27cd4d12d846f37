"""Uploaded training files in the shared object store.

Layout: ``files/<tenant>/<file-id>`` holds the raw bytes and
``files/<tenant>/<file-id>.json`` the OpenAI file object. The bytes are
written first and the object last, so a file that is listed is complete (the
same commit-record rule as adapters). Every key starts with the caller's
tenant, so another tenant's file id finds nothing: 404, as for a missing file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import tempfile
import time
from pathlib import Path
from typing import IO

from lorafleet_common.store import ObjectNotFound, ObjectStore, StoreError
from lorafleet_gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from lorafleet_gateway.files.schemas import FileDeleted, FileObject
from lorafleet_gateway.tenancy.namespace import files_prefix

logger = logging.getLogger(__name__)

FINE_TUNE_PURPOSE = "fine-tune"
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


def data_key(tenant: str, file_id: str) -> str:
    """Store key of a file's bytes (what a manifest's dataset uri names)."""
    return f"{files_prefix(tenant)}{file_id}"


def _object_key(tenant: str, file_id: str) -> str:
    return f"{files_prefix(tenant)}{file_id}.json"


def _invalid(message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid file format: {message}", param="file")


def _check_jsonl(src: IO[bytes], dest: IO[bytes], max_line_bytes: int) -> int:
    """Copy src to dest, checking every non-blank line is a JSON object. Returns the byte count.

    Lines are read at most ``max_line_bytes`` at a time, so one huge line (a file with no newline)
    is refused without being held in memory. Text must be UTF-8 (a BOM before the first line is
    allowed, as the trainer allows it).
    """
    size = 0
    rows = 0
    number = 0
    while line := src.readline(max_line_bytes + 1):
        number += 1
        if len(line.rstrip(b"\r\n")) > max_line_bytes:
            raise _invalid(f"line {number} is longer than this server's limit of {max_line_bytes} bytes")
        dest.write(line)
        size += len(line)
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
            row = json.loads(text)
        except UnicodeDecodeError as exc:
            raise _invalid(f"line {number} is not UTF-8 text ({exc})") from exc
        except ValueError as exc:
            raise _invalid(f"line {number} is not valid JSON ({exc})") from exc
        except RecursionError:  # json.loads recurses once per nesting level
            raise _invalid(f"line {number} is nested too deeply") from None
        if not isinstance(row, dict):
            raise _invalid(f"line {number} is not a JSON object")
        rows += 1
    if rows == 0:
        raise _invalid("the file has no JSONL rows")
    return size


class FileService:
    """Owns /v1/files."""

    def __init__(self, store: ObjectStore, *, max_line_bytes: int) -> None:
        self._store = store
        self._max_line_bytes = max_line_bytes

    async def create(self, tenant: str, src: IO[bytes], filename: str, purpose: str) -> FileObject:
        if purpose != FINE_TUNE_PURPOSE:
            raise InvalidRequest(f"Invalid purpose {purpose!r}: only 'fine-tune' is supported", param="purpose")
        return await asyncio.to_thread(self._create, tenant, src, filename)

    def _create(self, tenant: str, src: IO[bytes], filename: str) -> FileObject:
        file_id = f"file-{secrets.token_hex(12)}"
        with tempfile.TemporaryDirectory(prefix="lorafleet-upload-") as tmp:
            staged = Path(tmp) / "data.jsonl"
            with staged.open("wb") as dest:
                size = _check_jsonl(src, dest, self._max_line_bytes)
            file = FileObject(id=file_id, bytes=size, created_at=int(time.time()), filename=filename or "upload.jsonl")
            try:
                self._store.upload(staged, data_key(tenant, file_id))
                self._store.put(_object_key(tenant, file_id), file.model_dump_json().encode())
            except StoreError as exc:
                raise ServiceUnavailable(f"object store unavailable while saving the file: {exc}") from exc
        return file

    async def list_files(
        self, tenant: str, *, purpose: str | None, limit: int, after: str | None, order: str
    ) -> tuple[list[FileObject], bool]:
        """One page of the tenant's files, newest first unless order is "asc"; and whether more follow."""
        files = await asyncio.to_thread(self._list_all, tenant)
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        if after:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        return files[:limit], len(files) > limit

    def _list_all(self, tenant: str) -> list[FileObject]:
        files = []
        prefix = files_prefix(tenant)
        try:
            for key in self._store.list(prefix):
                # Only this tenant's own level: a tenant id never contains '/', so no deeper keys are ours.
                if not key.endswith(".json") or "/" in key[len(prefix) :]:
                    continue
                try:
                    files.append(FileObject.model_validate_json(self._store.get(key)))
                except (ObjectNotFound, ValueError) as exc:
                    # Deleted meanwhile, or not ours: one bad record must not break the listing.
                    logger.warning("skipping %s in /v1/files: %s", key, exc)
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while listing files: {exc}") from exc
        return files

    async def get(self, tenant: str, file_id: str) -> FileObject:
        return await asyncio.to_thread(self._get, tenant, file_id)

    def _get(self, tenant: str, file_id: str) -> FileObject:
        if not _FILE_ID.match(file_id):
            raise _not_found(file_id)
        try:
            return FileObject.model_validate_json(self._store.get(_object_key(tenant, file_id)))
        except ObjectNotFound as exc:
            raise _not_found(file_id) from exc
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while reading {file_id}: {exc}") from exc

    async def content(self, tenant: str, file_id: str) -> bytes:
        await self.get(tenant, file_id)
        try:
            return await asyncio.to_thread(self._store.get, data_key(tenant, file_id))
        except ObjectNotFound as exc:
            raise _not_found(file_id) from exc
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while reading {file_id}: {exc}") from exc

    async def delete(self, tenant: str, file_id: str) -> FileDeleted:
        await self.get(tenant, file_id)

        def remove() -> None:
            # The object first: from then on the file is gone for readers, whatever happens to the bytes.
            self._store.delete(_object_key(tenant, file_id))
            self._store.delete(data_key(tenant, file_id))

        try:
            await asyncio.to_thread(remove)
        except StoreError as exc:
            raise ServiceUnavailable(f"object store unavailable while deleting {file_id}: {exc}") from exc
        return FileDeleted(id=file_id)


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="file_id")
