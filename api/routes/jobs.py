"""`/v1/fine_tuning/jobs`: create, list, follow and cancel fine-tuning jobs."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

from fastapi import Request
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTeam, SessionDep, SettingsDep
from api.metrics import counting_limits
from api.openapi import error_responses
from api.pagination import After, Limit, page_newest_first
from api.routing import team_router
from api.team_slots import EVENT_STREAMS
from core import job_lifecycle
from core.base_models import has_chat_template
from core.continuation import continued_peft, named, start_adapter_of
from core.db import session_scope
from core.errors import ApiError, invalid, invalid_all, not_found
from core.events import add_event
from core.ids import new_id
from core.job_lifecycle import CANCELLED, PAUSED, TERMINAL_STATUSES
from core.models import (
    Adapter,
    BaseModelRecord,
    Checkpoint,
    File,
    Job,
    JobEvent,
    OutboxMessage,
    Team,
)
from core.queue import TRAIN_TASK
from core.quotas import check_queued_jobs
from core.registry import ResolutionError, resolve_model
from core.schemas.common import ListPage
from core.schemas.jobs import (
    MAX_METADATA_KEY,
    MAX_METADATA_VALUE,
    CheckpointPublic,
    JobCreate,
    JobEventPublic,
    JobListPage,
    JobPreview,
    JobPublic,
    valid_metadata_key,
)
from core.schemas.training import PeftConfigSpec, resolve_training
from core.settings import Settings
from core.sse import DONE, EventSourceResponse, ServerSentEvent, event_stream
from core.stores import store_outage

router = team_router("/v1/fine_tuning/jobs", "fine-tuning")
STREAM_POLL_SECONDS = 0.5


def get_team_job(session: SessionDep, team: CurrentTeam, job_id: str) -> Job:
    """A job of the calling team, or 404."""
    row = session.get(Job, job_id)
    if row is None or row.team_id != team.id:
        raise not_found("fine-tuning job", job_id)
    return row


def _usable_file(session, team: Team, file_id: str, param: str) -> File:
    row = session.get(File, file_id)
    if row is None or row.team_id != team.id:
        raise invalid(f"No file found with id '{file_id}'.", param, "file_not_found")
    if row.purpose != "fine-tune":
        raise invalid(f"File '{file_id}' has purpose '{row.purpose}', not 'fine-tune'.", param)
    if row.status != "processed":
        detail = f": {row.status_details}" if row.status_details else ""
        raise invalid(f"File '{file_id}' is not ready for training (status '{row.status}'){detail}", param,
                      "file_not_processed")
    return row


class CheckedInputs(NamedTuple):
    """A job's inputs after every check: its base, training file, `peft` spec and the adapter it continues."""

    base: BaseModelRecord
    training_file: File
    peft: PeftConfigSpec
    start_adapter: Adapter | None


def _model(session, team: Team, model: str) -> tuple[BaseModelRecord | None, Adapter | None]:
    """The base model and the adapter (if any) that a job's `model` names; 404 when it names neither."""
    try:
        resolution = resolve_model(session, team.id, model)
    except ResolutionError:
        known = ", ".join(session.scalars(select(BaseModelRecord.id)).all()) or "none registered"
        raise ApiError(404, f"The model '{model}' is neither a base model (available: {known}) nor one of your "
                            "fine-tuned models.", param="model", code="model_not_found") from None
    return session.get(BaseModelRecord, resolution.base_model), resolution.adapter


def _format_problem(row: File, param: str, method_type: str) -> ApiError | None:
    """A dpo job trains on preference files only, and a supervised job on every other format."""
    if method_type == "dpo" and row.format != "preference":
        return invalid(f"A dpo job trains on preference examples (input, preferred_output, non_preferred_output), "
                       f"but file '{row.id}' holds {row.format} examples.", param, "invalid_file_format")
    if method_type != "dpo" and row.format == "preference":
        return invalid(f"File '{row.id}' holds preference examples, which only a dpo job trains on (method.type "
                       "'dpo'); a supervised job takes chat, prompt/completion, alpaca or text examples.", param,
                       "invalid_file_format")
    return None


def _checked_inputs(session, team: Team, body: JobCreate) -> CheckedInputs:
    """Every input the schema cannot check, all at once; `model` may name a base or one of the team's adapters.

    For an adapter the job trains its base, starting from its weights, with its method and shape
    (`core.continuation`). An unknown model is a 404 on its own.
    """
    problems: list[ApiError] = []
    base, adapter = _model(session, team, body.model)
    peft = body.peft
    if adapter is not None:
        try:
            peft, conflicts = continued_peft(session, adapter, body.peft)
            problems += conflicts
        except ApiError as exc:
            problems.append(exc)
        if base is None:
            problems.append(invalid(f"The base model '{adapter.base_model}' of {named(adapter)} is no longer "
                                    "registered.", "model", "model_not_found"))
    files = {}
    for param in ("training_file", "validation_file"):
        file_id = getattr(body, param)
        if file_id:
            try:
                files[param] = _usable_file(session, team, file_id, param)
            except ApiError as exc:
                problems.append(exc)
    for param, row in files.items():
        if (base is not None and row.format in ("chat", "alpaca", "preference")
                and not has_chat_template(Path(base.path))):
            problems.append(invalid(f"File '{row.id}' holds {row.format} examples, but base model '{base.id}' has "
                                    "no chat template; use prompt/completion or text examples with it.", param,
                                    "no_chat_template"))
        if (problem := _format_problem(row, param, body.method_type)) is not None:
            problems.append(problem)
    if problems:
        raise invalid_all(problems)
    return CheckedInputs(base, files["training_file"], peft, adapter)


@router.post("", response_model=JobPublic | JobPreview, responses=error_responses(404))
def create_job(body: JobCreate, session: SessionDep, team: CurrentTeam, settings: SettingsDep,
               dry_run: bool = False) -> JobPublic | JobPreview:
    """Validate the whole spec, then write the job and its dispatch in one transaction.

    With `dry_run=true` nothing is written: the answer is the spec as the job would resolve it (every
    `"auto"` and method default filled in, and the parent's shape for a `model` that names a fine-tuned
    model), or the same 400 or 404 a real create would give.
    """
    if not dry_run:
        with counting_limits(team.name, "max_queued_jobs"):
            check_queued_jobs(session, team, settings)
    inputs = _checked_inputs(session, team, body)
    training = inputs.training_file
    seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
    resolved = resolve_training(body.chosen_hyperparameters(), inputs.peft, training.n_examples, seed,
                                body.method_type)
    if inputs.start_adapter is not None:
        resolved.start_adapter = start_adapter_of(inputs.start_adapter)
    if dry_run:
        return JobPreview.of(body, resolved, training.n_examples)
    job = job_lifecycle.new_job(
        deadline_seconds=settings.job_deadline_seconds,
        id=new_id("ftjob"),
        team_id=team.id,
        model=inputs.base.id,  # the base, as the worker, naming and the queue read it; spec["model"] is as sent
        training_file=body.training_file,
        validation_file=body.validation_file,
        spec=body.model_dump(mode="json"),
        resolved=resolved.model_dump(mode="json"),
        suffix=body.suffix,
        seed=seed,
        user_metadata=body.metadata,
    )
    session.add(job)
    session.flush()
    session.add(OutboxMessage(job_id=job.id, task=TRAIN_TASK, reason="created"))
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    session.flush()
    return JobPublic.of(job)


@router.get("", response_model=JobListPage)
def list_jobs(request: Request, session: SessionDep, team: CurrentTeam, after: After = None,
              limit: Limit = 20) -> JobListPage:
    """The team's jobs, newest first; filter with `metadata[key]=value`."""
    query = select(Job).where(Job.team_id == team.id)
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            key = name[9:-1]
            if not valid_metadata_key(key) or len(value) > MAX_METADATA_VALUE:
                raise invalid(f"Metadata filter {name[:80]!r} is not a valid key (at most {MAX_METADATA_KEY} "
                              "characters, no quotes, backslashes or control characters) and value.", name[:80])
            query = query.where(Job.user_metadata[key].as_string() == value)
    rows, has_more = page_newest_first(session, query, Job, after, limit)
    data = [JobPublic.of(r) for r in rows]
    return JobListPage(data=data, has_more=has_more, first_id=data[0].id if data else None,
                       last_id=data[-1].id if data else None)


@router.get("/{job_id}", response_model=JobPublic)
def retrieve_job(job_id: str, session: SessionDep, team: CurrentTeam) -> JobPublic:
    """One job."""
    return JobPublic.of(get_team_job(session, team, job_id))


def _take_job_from_its_worker(session, team, job_id: str, move, status: str, verb: str, message: str) -> JobPublic:
    """Move an unfinished job to `status` with `move` (idempotent); its worker sees the change and stops."""
    job = get_team_job(session, team, job_id)
    while job.status != status:
        if not job_lifecycle.can_move(job.status, status):
            raise ApiError(409, f"Job '{job_id}' has already {job.status}; it cannot be {verb}.", code="job_finished")
        if move(session, job.id, from_statuses=(job.status,)):
            add_event(session, job.id, message)
        else:  # a worker or the dispatcher moved it first: decide again on its new status
            session.refresh(job)
    session.flush()
    return JobPublic.of(job)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, team: CurrentTeam) -> JobPublic:
    """Cancel a job; a running worker notices within one step and stops."""
    return _take_job_from_its_worker(session, team, job_id, job_lifecycle.cancel, CANCELLED, "cancelled",
                                     "Job cancelled by the user.")


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: str, session: SessionDep, team: CurrentTeam) -> JobPublic:
    """Pause a job; a running worker stops within one step, keeping its checkpoints."""
    return _take_job_from_its_worker(
        session, team, job_id, job_lifecycle.pause, PAUSED, "paused",
        "Job paused by the user; resume it to continue from its newest checkpoint.")


def _not_paused(job: Job) -> ApiError:
    return ApiError(409, f"Job '{job.id}' is {job.status}, not paused.", code="job_not_paused")


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: str, session: SessionDep, team: CurrentTeam, settings: SettingsDep) -> JobPublic:
    """Queue a paused job again; it continues from its newest checkpoint with a fresh deadline."""
    job = get_team_job(session, team, job_id)
    if job.status != PAUSED:
        raise _not_paused(job)
    with counting_limits(team.name, "max_queued_jobs"):
        check_queued_jobs(session, team, settings)
    # Waiting again (not dispatched): the dispatcher sends it when a worker slot is free.
    if not job_lifecycle.resume(session, job.id, deadline_seconds=settings.job_deadline_seconds):
        session.refresh(job)  # cancelled meanwhile
        raise _not_paused(job)
    session.add(OutboxMessage(job_id=job.id, task=TRAIN_TASK, reason="resumed"))
    add_event(session, job.id, "Job resumed by the user.")
    session.flush()
    return JobPublic.of(job)


@router.get("/{job_id}/events", response_model=None)
def list_events(job_id: str, session: SessionDep, team: CurrentTeam, settings: SettingsDep, after: After = None,
                limit: Limit = 20, stream: bool = False) -> ListPage[JobEventPublic] | EventSourceResponse:
    """The job's events, newest first; with `stream=true`, Server-Sent Events from the start, live."""
    get_team_job(session, team, job_id)
    if stream:
        EVENT_STREAMS.check(team.id, team.name, settings.team_max_event_streams)
        return event_stream(_stream_events(job_id, team, settings))
    query = select(JobEvent).where(JobEvent.job_id == job_id)
    if after:
        cursor = session.scalar(select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job_id))
        if cursor is not None:
            query = query.where(JobEvent.seq < cursor)
    rows = list(session.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
    return ListPage[JobEventPublic](data=[JobEventPublic.of(r) for r in rows[:limit]], has_more=len(rows) > limit)


def _events_after(job_id: str, last_seq: int) -> tuple[list[tuple[int, str]], str | None]:
    """Events after `last_seq` as (seq, JSON), and the job's status; a short session in a worker thread."""
    with session_scope() as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > last_seq)
                               .order_by(JobEvent.seq).limit(500))
        events = [(row.seq, JobEventPublic.of(row).model_dump_json()) for row in rows]
        return events, session.scalar(select(Job.status).where(Job.id == job_id))


async def _stream_events(job_id: str, team: Team, settings: Settings) -> AsyncIterator[ServerSentEvent]:
    """Every event in order, then new ones as they are written, until the job ends.

    No connection is held between polls, and a store outage pauses the stream instead of ending it
    (`event_stream` sends keep-alive pings meanwhile).
    """
    last_seq = 0
    with EVENT_STREAMS.hold(team.id, team.name, settings.team_max_event_streams, checked=True):
        while True:
            try:
                events, status = await run_in_threadpool(_events_after, job_id, last_seq)
            except Exception as exc:
                if store_outage(exc) is None:
                    raise
                events, status = [], "unknown"
            for seq, payload in events:
                last_seq = seq
                yield ServerSentEvent(raw_data=payload)
            if not events and (status is None or status in TERMINAL_STATUSES):
                yield DONE
                return
            if not events:
                await asyncio.sleep(STREAM_POLL_SECONDS)


@router.get("/{job_id}/checkpoints", response_model=ListPage[CheckpointPublic])
def list_checkpoints(job_id: str, session: SessionDep, team: CurrentTeam, after: After = None,
                     limit: Limit = 10) -> ListPage[CheckpointPublic]:
    """The job's checkpoints, newest first."""
    job = get_team_job(session, team, job_id)
    rows, has_more = page_newest_first(session, select(Checkpoint).where(Checkpoint.job_id == job_id),
                                       Checkpoint, after, limit)
    name = job.fine_tuned_model or f"ft:{job.model}:{job.id}"
    return ListPage[CheckpointPublic](data=[CheckpointPublic.of(r, name) for r in rows], has_more=has_more)
