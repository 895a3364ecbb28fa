"""A fine-tuning job's life: its statuses, the moves allowed between them, and the functions that make them.

Every write of `Job.status` goes through this module. Each move is one conditional UPDATE built from
`TRANSITIONS`: it applies only while the job is still in a status the caller expects (and, for a worker,
while it still holds the lease), so a user's cancel, a worker's finish and the reconciler never overwrite
one another. A move returns True when it happened and False when the job had moved on; asking for a move
the table (or the function) does not allow raises `IllegalTransition`. The side fields of a move
(finished_at, the lease, the deadline, dispatched_at, the error) are set here too. Nothing commits: the
move is part of the caller's transaction, with the events the caller writes.

The happy path is validating_files -> queued -> running -> succeeded; `TRANSITIONS` holds the rest.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, true, update
from sqlalchemy.orm import Session

from core.ids import now
from core.models import Job

VALIDATING_FILES, QUEUED, RUNNING, PAUSED = "validating_files", "queued", "running", "paused"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
TERMINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)
ACTIVE_STATUSES = (VALIDATING_FILES, QUEUED, RUNNING)
"""Statuses the dispatcher and reconciler work on (and a deadline runs in)."""
UNFINISHED_STATUSES = (*ACTIVE_STATUSES, PAUSED)
STATUSES = (*UNFINISHED_STATUSES, *TERMINAL_STATUSES)

TRANSITIONS: dict[str, frozenset[str]] = {
    VALIDATING_FILES: frozenset({QUEUED, FAILED, CANCELLED, PAUSED}),
    QUEUED: frozenset({RUNNING, FAILED, CANCELLED, PAUSED}),
    RUNNING: frozenset({RUNNING, QUEUED, SUCCEEDED, FAILED, CANCELLED, PAUSED}),
    PAUSED: frozenset({QUEUED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}
"""Each status and the statuses a job in it may move to. Running to running is a re-claim of an expired lease."""


class IllegalTransition(Exception):
    """A move the transition table, or the function asked to make it, does not allow."""

    def __init__(self, job_id: str, from_status: str, to_status: str) -> None:
        super().__init__(f"job '{job_id}' cannot move from '{from_status}' to '{to_status}'")
        self.job_id, self.from_status, self.to_status = job_id, from_status, to_status


def can_move(from_status: str, to_status: str) -> bool:
    """Whether the table lets a job in `from_status` move to `to_status`."""
    return to_status in TRANSITIONS.get(from_status, frozenset())


def sources(to_status: str) -> tuple[str, ...]:
    """The statuses the table lets a job move to `to_status` from, in `STATUSES` order."""
    return tuple(status for status in STATUSES if can_move(status, to_status))


def new_job(*, deadline_seconds: float, **fields: Any) -> Job:
    """A new job row, `validating_files`, due within `deadline_seconds` (the caller adds it to the session)."""
    created = now()
    return Job(status=VALIDATING_FILES, created_at=created, deadline_at=created + deadline_seconds, **fields)


def _move(session: Session, job_id: str, to_status: str, asked: Iterable[str] | None, handled: tuple[str, ...],
          *conditions: ColumnElement[bool], only_if: dict[str, ColumnElement[bool]] | None = None,
          **values: Any) -> bool:
    """Move the job to `to_status` while it is in one of `asked` (default: every status this move handles).

    `conditions` hold for every source status, `only_if` for one (a running job's lease must have expired).
    Objects of the job already in the session see the change.
    """
    from_statuses = tuple(handled if asked is None else asked)
    for status in from_statuses:
        if status not in handled or not can_move(status, to_status):
            raise IllegalTransition(job_id, status, to_status)
    if not from_statuses:
        return False
    only_if = only_if or {}
    in_a_source = or_(*(and_(Job.status == status, only_if.get(status, true())) for status in from_statuses))
    result = session.execute(update(Job).where(Job.id == job_id, in_a_source, *conditions)
                             .values(status=to_status, **values).execution_options(synchronize_session="fetch"))
    return result.rowcount == 1


_NO_LEASE = {"lease_owner": None, "lease_expires_at": None}


def queue(session: Session, job_id: str, *, from_statuses: Iterable[str] | None = None) -> bool:
    """Queue the job for a worker: its files are valid (from `validating_files`), or its worker stopped renewing
    the lease (from `running`, only once the lease has expired). It waits undispatched, without a lease."""
    return _move(session, job_id, QUEUED, from_statuses, (VALIDATING_FILES, RUNNING),
                 only_if={RUNNING: Job.lease_expires_at < now()}, dispatched_at=None, **_NO_LEASE)


def resume(session: Session, job_id: str, *, deadline_seconds: float,
           from_statuses: Iterable[str] | None = None) -> bool:
    """Queue a paused job again, undispatched, with a fresh deadline of `deadline_seconds` from now."""
    return _move(session, job_id, QUEUED, from_statuses, (PAUSED,), dispatched_at=None,
                 deadline_at=now() + deadline_seconds)


def start(session: Session, job_id: str, owner: str, *, lease_seconds: float,
          from_statuses: Iterable[str] | None = None) -> bool:
    """A worker claims the job: a queued one, or a running one whose lease expired. `owner` then holds a lease of
    `lease_seconds`; the attempt is counted, and `started_at` is set on the first."""
    t = now()
    return _move(session, job_id, RUNNING, from_statuses, sources(RUNNING), only_if={RUNNING: Job.lease_expires_at < t},
                 lease_owner=owner, lease_expires_at=t + lease_seconds, attempts=Job.attempts + 1,
                 started_at=func.coalesce(Job.started_at, t))


def succeed(session: Session, job_id: str, owner: str, *, fine_tuned_model: str, trained_tokens: int | None,
            result_files: list[Any] | None = None, from_statuses: Iterable[str] | None = None) -> bool:
    """Record the worker's success, only while `owner` still holds the running job's lease."""
    return _move(session, job_id, SUCCEEDED, from_statuses, sources(SUCCEEDED), Job.lease_owner == owner,
                 finished_at=now(), fine_tuned_model=fine_tuned_model, trained_tokens=trained_tokens,
                 result_files=list(result_files or []), **_NO_LEASE)


def fail(session: Session, job_id: str, *, code: str, message: str, param: str | None = None,
         owner: str | None = None, from_statuses: Iterable[str] | None = None) -> bool:
    """Fail the job with the error `{code, message, param}`. With `owner`, only while that worker still holds the
    running job's lease; without, from any status that may fail (or those in `from_statuses`)."""
    conditions = []
    if owner is not None:
        conditions.append(Job.lease_owner == owner)
        from_statuses = (RUNNING,) if from_statuses is None else from_statuses
    return _move(session, job_id, FAILED, from_statuses, sources(FAILED), *conditions, finished_at=now(),
                 error={"code": code, "message": message, "param": param}, **_NO_LEASE)


def expire(session: Session, job_id: str, *, deadline_seconds: float,
           from_statuses: Iterable[str] | None = None) -> bool:
    """Fail an active job whose deadline has passed (`deadline_exceeded`); a deadline renewed meanwhile spares it."""
    t = now()
    return _move(session, job_id, FAILED, from_statuses, ACTIVE_STATUSES, Job.deadline_at < t, finished_at=t,
                 error={"code": "deadline_exceeded", "param": None,
                        "message": f"The job did not finish within {deadline_seconds} seconds."}, **_NO_LEASE)


def cancel(session: Session, job_id: str, *, from_statuses: Iterable[str] | None = None) -> bool:
    """Cancel an unfinished job for good; its worker, if any, loses the lease and stops."""
    return _move(session, job_id, CANCELLED, from_statuses, sources(CANCELLED), finished_at=now(), **_NO_LEASE)


def pause(session: Session, job_id: str, *, from_statuses: Iterable[str] | None = None) -> bool:
    """Pause an active job; its worker, if any, loses the lease and stops, keeping its checkpoints."""
    return _move(session, job_id, PAUSED, from_statuses, sources(PAUSED), **_NO_LEASE)
