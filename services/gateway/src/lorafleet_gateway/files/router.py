"""Routes: POST/GET /v1/files, GET/DELETE /v1/files/{id}, GET /v1/files/{id}/content."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi.responses import Response

from lorafleet_gateway.deps import FilesDep
from lorafleet_gateway.files.schemas import FileDeleted, FileList, FileObject
from lorafleet_gateway.quotas import CallerDep

router = APIRouter(prefix="/v1", tags=["files"])


@router.post("/files")
async def create_file(
    file: UploadFile, purpose: Annotated[str, Form()], files: FilesDep, caller: CallerDep
) -> FileObject:
    """Upload a JSONL training file (purpose "fine-tune")."""
    return await files.create(caller.tenant, file.file, file.filename or "", purpose)


@router.get("/files")
async def list_files(
    files: FilesDep,
    caller: CallerDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """List the caller's uploaded files, newest first."""
    data, has_more = await files.list_files(caller.tenant, purpose=purpose, limit=limit, after=after, order=order)
    return FileList(
        data=data, has_more=has_more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, files: FilesDep, caller: CallerDep) -> FileObject:
    """Describe one uploaded file."""
    return await files.get(caller.tenant, file_id)


@router.get(
    "/files/{file_id}/content",
    response_class=Response,
    responses={200: {"description": "The file's bytes, as uploaded.", "content": {"application/octet-stream": {}}}},
)
async def file_content(file_id: str, files: FilesDep, caller: CallerDep) -> Response:
    """Download an uploaded file's bytes."""
    return Response(await files.content(caller.tenant, file_id), media_type="application/octet-stream")


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, files: FilesDep, caller: CallerDep) -> FileDeleted:
    """Delete an uploaded file."""
    return await files.delete(caller.tenant, file_id)
