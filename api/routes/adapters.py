"""`/v1/adapters`: the team's adapter registry: list, inspect, download, import, delete, aliases."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from api.checks import run_check
from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.pagination import After, Limit, page_newest_first
from api.routing import team_router
from api.team_slots import UPLOADS
from api.uploads import UploadResult, multipart_openapi, receive_upload, upload_allowance
from core.adapter_check import AdapterCheckError
from core.adapter_import import InspectedAdapter, inspect_adapter_archive, write_import_metadata
from core.archives import ArchiveError, write_tar_gz
from core.db import session_scope
from core.errors import invalid, not_found
from core.ids import new_id
from core.models import Adapter, AdapterAliasEvent, BaseModelRecord, Team
from core.registry import aliases_of, delete_version, find_team_adapter, lineages, move_alias, publish_version
from core.safetensors_header import count_folder_params
from core.schemas.adapters import AdapterPublic, AliasEventPublic, AliasMove
from core.schemas.common import DeletedObject, ListPage
from core.storage import folder_sha256, get_storage
from core.temporaries import commit_into_place, scratch_dir, temp_key

router = team_router("/v1/adapters", "adapters")


def get_team_adapter(session, team, ref: str) -> Adapter:
    """An adapter of the calling team by id or name reference, or 404."""
    row = find_team_adapter(session, team.id, ref)
    if row is None:
        raise not_found("adapter", ref)
    return row


def _public(session, rows: list[Adapter]) -> list[AdapterPublic]:
    aliases = aliases_of(session, [r.id for r in rows])
    chains, found = lineages(session, rows)
    return [AdapterPublic.of(r, aliases.get(r.id), parent=found.get(r.parent_id), lineage=chains[r.id])
            for r in rows]


@router.get("", response_model=ListPage[AdapterPublic])
def list_adapters(session: SessionDep, team: CurrentTeam, name: str | None = Query(None, max_length=256),
                  after: After = None,
                  limit: Limit = 100) -> ListPage[AdapterPublic]:
    """The team's adapters, newest first."""
    query = select(Adapter).where(Adapter.team_id == team.id, Adapter.status == "ready")
    if name:
        query = query.where(Adapter.name == name)
    rows, has_more = page_newest_first(session, query, Adapter, after, limit)
    return ListPage[AdapterPublic](data=_public(session, rows), has_more=has_more)


@router.get("/{ref}", response_model=AdapterPublic)
def retrieve_adapter(ref: str, session: SessionDep, team: CurrentTeam) -> AdapterPublic:
    """One adapter, by id, fine-tuned model name, `name@version`, `name:alias` or `name`."""
    return _public(session, [get_team_adapter(session, team, ref)])[0]


@router.get("/{ref}/download")
def download_adapter(ref: str, session: SessionDep, team: CurrentTeam, settings: SettingsDep) -> FileResponse:
    """The PEFT folder plus our metadata, as tar.gz."""
    row = get_team_adapter(session, team, ref)
    session.close()  # no connection held while the archive is written
    scratch = Path(tempfile.mkdtemp(prefix="download-", dir=scratch_dir(settings)))
    arcname = f"{row.name}-v{row.version}"
    archive = write_tar_gz(get_storage().local_dir(row.storage_key, scratch), scratch / f"{arcname}.tar.gz",
                           arcname)
    return FileResponse(archive, media_type="application/gzip", filename=archive.name,
                        background=BackgroundTask(shutil.rmtree, scratch, True))


def _import_fields(result: UploadResult) -> tuple[str, BaseModelRecord]:
    if result.filename is None:
        raise invalid("The form field 'file' (a tar.gz or zip of the adapter folder) is required.", "file")
    name = result.fields.get("name", "").strip()
    if not name or len(name) > 128 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in name):
        raise invalid("The form field 'name' is required: at most 128 letters, digits, '.', '_' and '-'.", "name")
    base_id = result.fields.get("base_model", "")
    with session_scope() as session:
        base = session.get(BaseModelRecord, base_id) if len(base_id) <= 128 else None
    if base is None:
        raise invalid(f"Unknown base model '{base_id[:128]}'.", "base_model", "model_not_found")
    return name, base


async def _inspect(archive: Path, scratch: Path, base: BaseModelRecord, settings) -> InspectedAdapter:
    try:
        return await run_check(inspect_adapter_archive, archive, scratch / "unpacked", Path(base.path),
                               max_bytes=settings.max_upload_bytes, max_rank=settings.max_lora_rank)
    except ArchiveError as exc:
        raise invalid(f"Archive refused: {exc}.", "file", "invalid_archive") from None
    except AdapterCheckError as exc:
        raise invalid(f"Adapter check '{exc.check}' failed: {exc}.", "file", f"adapter_{exc.check}") from None


def _publish_import(team: Team, name: str, base: BaseModelRecord, inspected: InspectedAdapter) -> AdapterPublic:
    """Store the checked folder under a temporary key, and rename it into place as its version commits."""
    storage, folder, summary = get_storage(), inspected.folder, inspected.summary
    adapter_id = new_id("adapter")
    metadata = write_import_metadata(inspected, base, count_folder_params(Path(base.path)))
    sha, size = folder_sha256(folder)
    temp, key = temp_key(adapter_id), f"adapters/{adapter_id}"
    storage.put_dir(temp, folder)
    try:
        with session_scope() as session:
            row = publish_version(
                session, id=adapter_id, team_id=team.id, name=name, fine_tuned_model=None, base_model=base.id,
                job_id=None, storage_key=key, method="lora", rank=summary.rank,
                target_modules=summary.target_modules, trainable_params=summary.trainable_params,
                base_params=metadata.base_params, bytes=size,
                sha256=sha, metrics={}, status="ready", source="import")
            commit_into_place(session, storage, temp, key)
            public = _public(session, [row])[0]
    finally:
        storage.delete(temp)
    return public


@router.post("/import", response_model=AdapterPublic, openapi_extra=multipart_openapi(
    {"file": "file", "name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,128}$"},
     "base_model": {"type": "string", "minLength": 1, "maxLength": 128}}, ["file", "name", "base_model"]))
async def import_adapter(request: Request, team: CurrentTeam, settings: SettingsDep) -> AdapterPublic:
    """Take an adapter trained elsewhere (tar.gz or zip of a PEFT LoRA folder), after checking it completely.

    The archive lands in a private scratch folder and is inspected in a checker process; storage sees
    only a folder that passed every check.
    """
    with UPLOADS.hold(team.id, team.name, settings.team_max_concurrent_uploads):
        scratch = await run_in_threadpool(lambda: Path(tempfile.mkdtemp(prefix="import-", dir=scratch_dir(settings))))
        try:
            limit, over_limit = await run_in_threadpool(upload_allowance, team, settings)
            result = await receive_upload(request, lambda: open(scratch / "upload", "wb"), file_limit=limit,
                                          over_limit=over_limit)
            name, base = await run_in_threadpool(_import_fields, result)
            inspected = await _inspect(scratch / "upload", scratch, base, settings)
            return await run_in_threadpool(_publish_import, team, name, base, inspected)
        finally:
            await run_in_threadpool(shutil.rmtree, scratch, True)


@router.delete("/{ref}", response_model=DeletedObject)
def delete_adapter(ref: str, session: SessionDep, team: CurrentTeam) -> DeletedObject:
    """Delete one adapter version and its stored files; aliases pointing at it go too."""
    row = get_team_adapter(session, team, ref)
    delete_version(session, row)
    return DeletedObject(id=row.id, object="adapter")


@router.post("/{name}/aliases", response_model=AdapterPublic)
def set_alias(name: str, body: AliasMove, session: SessionDep, team: CurrentTeam) -> AdapterPublic:
    """Point `name:alias` at a version (promote or roll back); the move is recorded."""
    if (body.version is None) == (body.adapter_id is None):
        raise invalid("Give exactly one of 'version' or 'adapter_id'.", "version")
    ref = f"{name}@{body.version}" if body.version is not None else body.adapter_id
    target = find_team_adapter(session, team.id, ref)
    if target is None or target.name != name:
        raise not_found("adapter version", ref, "version" if body.version is not None else "adapter_id")
    move_alias(session, team.id, name, body.alias, target)
    session.commit()
    return _public(session, [target])[0]


@router.get("/{name}/aliases", response_model=ListPage[AliasEventPublic])
def alias_history(name: str, session: SessionDep, team: CurrentTeam) -> ListPage[AliasEventPublic]:
    """Every move of every alias of `name`, newest first."""
    if find_team_adapter(session, team.id, name) is None:
        raise not_found("adapter", name)
    rows = session.scalars(select(AdapterAliasEvent).where(AdapterAliasEvent.team_id == team.id,
                                                           AdapterAliasEvent.name == name)
                           .order_by(AdapterAliasEvent.id.desc()))
    return ListPage[AliasEventPublic](data=[AliasEventPublic.of(r) for r in rows], has_more=False)
