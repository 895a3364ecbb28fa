"""`/v1/files`: dataset uploads, in OpenAI's shape."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import or_, select

from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.pagination import page_newest_first
from api.uploads import multipart_openapi, receive_upload
from core.errors import ApiError, invalid, not_found
from core.ids import new_id
from core.leases import UNFINISHED_STATUSES
from core.models import File, Job
from core.schemas.common import DeletedObject, ListPage
from core.schemas.files import FilePublic
from core.storage import get_storage

router = APIRouter(prefix="/v1/files", tags=["files"])
PURPOSES = ("fine-tune",)


def get_team_file(session: SessionDep, team: CurrentTeam, file_id: str, param: str | None = None) -> File:
    """A file of the calling team, or 404."""
    row = session.get(File, file_id)
    if row is None or row.team_id != team.id:
        raise not_found("file", file_id, param)
    return row


@router.post("", response_model=FilePublic,
             openapi_extra=multipart_openapi({"file": "file", "purpose": "text"}, ["file", "purpose"]))
async def upload_file(request: Request, session: SessionDep, team: CurrentTeam, settings: SettingsDep) -> FilePublic:
    """Stream an upload to storage, then validate it line by line."""
    file_id = new_id("file")
    storage = get_storage()
    key = f"files/{file_id}.jsonl"
    result = await receive_upload(request, storage, key, settings.max_upload_bytes)
    purpose = result.fields.get("purpose")
    problem = None
    if result.filename is None:
        problem = invalid("The form field 'file' is required.", "file")
    elif purpose is None:
        problem = invalid("The form field 'purpose' is required (use 'fine-tune').", "purpose")
    elif purpose not in PURPOSES:
        problem = invalid(f"Unsupported purpose {purpose!r}; expected one of: {', '.join(PURPOSES)}.", "purpose")
    if problem:
        storage.delete(key)
        raise problem
    report = result.report
    row = File(
        id=file_id,
        team_id=team.id,
        filename=result.filename,
        purpose=purpose,
        bytes=result.bytes,
        sha256=result.sha256,
        status="processed" if report.ok else "error",
        status_details=report.details(),
        format=report.format,
        n_examples=report.n_examples,
        storage_key=key,
    )
    session.add(row)
    session.flush()
    return FilePublic.of(row)


@router.get("", response_model=ListPage[FilePublic])
def list_files(
    session: SessionDep,
    team: CurrentTeam,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(100),
) -> ListPage[FilePublic]:
    """The team's files, newest first."""
    query = select(File).where(File.team_id == team.id)
    if purpose:
        query = query.where(File.purpose == purpose)
    rows, has_more = page_newest_first(session, query, File, after, limit)
    return ListPage[FilePublic](data=[FilePublic.of(r) for r in rows], has_more=has_more)


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(file_id: str, session: SessionDep, team: CurrentTeam) -> FilePublic:
    """One file."""
    return FilePublic.of(get_team_file(session, team, file_id))


@router.get("/{file_id}/content")
def file_content(file_id: str, session: SessionDep, team: CurrentTeam) -> StreamingResponse:
    """The file's bytes, streamed."""
    row = get_team_file(session, team, file_id)
    return StreamingResponse(
        get_storage().iter_bytes(row.storage_key),
        media_type="application/jsonl",
        headers={"Content-Disposition": f'attachment; filename="{row.id}.jsonl"'},
    )


@router.delete("/{file_id}", response_model=DeletedObject)
def delete_file(file_id: str, session: SessionDep, team: CurrentTeam) -> DeletedObject:
    """Delete a file, unless an unfinished job still needs it (409)."""
    row = get_team_file(session, team, file_id)
    in_use = session.scalar(
        select(Job.id)
        .where(Job.team_id == team.id, Job.status.in_(UNFINISHED_STATUSES))
        .where(or_(Job.training_file == file_id, Job.validation_file == file_id))
        .limit(1)
    )
    if in_use:
        raise ApiError(409, f"File '{file_id}' is used by job '{in_use}', which has not finished.", code="file_in_use")
    session.delete(row)
    session.flush()
    get_storage().delete(row.storage_key)
    return DeletedObject(id=file_id, object="file")
