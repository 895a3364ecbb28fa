"""`/v1/files`: dataset uploads, in OpenAI's shape."""

from __future__ import annotations

import re

from fastapi import Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import or_, select
from starlette.concurrency import run_in_threadpool

from api.checks import run_check
from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.pagination import After, Limit, page_newest_first
from api.routing import team_router
from api.team_slots import UPLOADS
from api.uploads import UploadResult, multipart_openapi, receive_upload, upload_allowance
from core.dataset_preview import preview_stored
from core.datasets import validate_stored
from core.db import session_scope
from core.errors import ApiError, invalid, not_found
from core.ids import new_id
from core.job_lifecycle import UNFINISHED_STATUSES
from core.models import File, Job
from core.schemas.common import DeletedObject, ListPage
from core.schemas.files import FileLine, FilePreviewPublic, FilePublic
from core.storage import get_storage
from core.temporaries import commit_into_place, temp_key

router = team_router("/v1/files", "files")
PURPOSES = ("fine-tune",)
MAX_PREVIEW_ROWS = 100
MAX_INVALID_SHOWN = 20


def get_team_file(session: SessionDep, team: CurrentTeam, file_id: str, param: str | None = None) -> File:
    """A file of the calling team, or 404."""
    row = session.get(File, file_id)
    if row is None or row.team_id != team.id:
        raise not_found("file", file_id, param)
    return row


def _checked_fields(result: UploadResult) -> str:
    if result.filename is None:
        raise invalid("The form field 'file' is required.", "file")
    purpose = result.fields.get("purpose")
    if purpose is None:
        raise invalid("The form field 'purpose' is required (use 'fine-tune').", "purpose")
    if purpose not in PURPOSES:
        raise invalid(f"Unsupported purpose {purpose[:64]!r}; expected one of: {', '.join(PURPOSES)}.", "purpose")
    return purpose


def _record_file(row: File, temp: str) -> File:
    """Commit the file's row, renaming its temporary into place just before (removed again if the commit fails)."""
    with session_scope() as session:
        session.add(row)
        session.flush()
        commit_into_place(session, get_storage(), temp, row.storage_key)
    return row


@router.post("", response_model=FilePublic,
             openapi_extra=multipart_openapi(
                 {"file": "file", "purpose": {"type": "string", "enum": list(PURPOSES)}}, ["file", "purpose"]))
async def upload_file(request: Request, team: CurrentTeam, settings: SettingsDep) -> FilePublic:
    """Stream an upload to a temporary key, validate it in a checker process, then commit it."""
    storage = get_storage()
    file_id = new_id("file")
    temp = temp_key(f"{file_id}.jsonl")
    with UPLOADS.hold(team.id, team.name, settings.team_max_concurrent_uploads):
        try:
            limit, over_limit = await run_in_threadpool(upload_allowance, team, settings)
            result = await receive_upload(request, lambda: storage.open_write(temp), file_limit=limit,
                                          over_limit=over_limit)
            purpose = _checked_fields(result)
            report = await run_check(validate_stored, storage, temp, settings.max_line_bytes)
            row = File(id=file_id, team_id=team.id, filename=result.filename, purpose=purpose, bytes=result.bytes,
                       sha256=result.sha256, status="processed" if report.ok else "error",
                       status_details=report.details(), format=report.format, n_examples=report.n_examples,
                       storage_key=f"files/{file_id}.jsonl")
            await run_in_threadpool(_record_file, row, temp)
        finally:
            await run_in_threadpool(storage.delete, temp)
    return FilePublic.of(row)


@router.get("", response_model=ListPage[FilePublic])
def list_files(
    session: SessionDep,
    team: CurrentTeam,
    purpose: str | None = Query(None, max_length=32),
    after: After = None,
    limit: Limit = 100,
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


@router.get("/{file_id}/preview", response_model=FilePreviewPublic)
async def preview(file_id: str, team: CurrentTeam, settings: SettingsDep,
                  limit: int = Query(20, ge=1, le=MAX_PREVIEW_ROWS)) -> FilePreviewPublic:
    """The file's first `limit` lines and, when it is invalid, up to 20 of its invalid lines with the reasons."""
    row = await run_in_threadpool(_team_file_row, team, file_id)
    wanted_invalid = MAX_INVALID_SHOWN if row.status == "error" else 0
    found = await run_in_threadpool(preview_stored, get_storage(), row.storage_key, settings.max_line_bytes,
                                    limit, wanted_invalid)
    counted = re.match(r"(\d+) invalid line", row.status_details or "")
    return FilePreviewPublic(
        id=row.id, format=row.format, status=row.status, n_errors=int(counted.group(1)) if counted else 0,
        rows=[FileLine(**vars(line)) for line in found.rows],
        invalid_rows=[FileLine(**vars(line)) for line in found.invalid_rows], truncated=found.truncated)


def _team_file_row(team, file_id: str) -> File:
    with session_scope() as session:
        row = get_team_file(session, team, file_id)
        session.expunge(row)
        return row


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
    session.commit()  # the row goes first: a failed commit must not leave a row without its bytes
    get_storage().delete(row.storage_key)
    return DeletedObject(id=file_id, object="file")
