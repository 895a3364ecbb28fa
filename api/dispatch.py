"""Outbox dispatcher and reconciler: the database, not the broker, guarantees every job runs.

The dispatcher sends unsent outbox rows to Celery, but only as many as live workers have free slots,
chosen by fair share across teams (core/fair_share.py) and within each team's running-jobs limit; the
rest wait in the database. The reconciler re-dispatches jobs whose message was lost or whose worker
died, and fails jobs past their deadline.
"""

from __future__ import annotations

import logging
from collections import deque

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from core import job_lifecycle
from core.db import session_scope
from core.events import add_event
from core.fair_share import TeamQueue, fair_order
from core.ids import now
from core.job_lifecycle import ACTIVE_STATUSES, QUEUED, RUNNING, VALIDATING_FILES
from core.models import File, Job, OutboxMessage, Team
from core.periodic import Periodic
from core.queue import TRAIN_TASK, send_train
from core.quotas import limits_for
from core.settings import Settings, get_settings
from core.storage import get_storage
from core.workers import forget_dead_workers, live_capacity

log = logging.getLogger("patchbay.dispatch")
MAX_ATTEMPTS = 5
SCHEDULING_LOCK = 0x7061_7463_6862  # "patchb": the advisory lock key of the dispatchers' turn
IN_FLIGHT = or_(Job.status == RUNNING, and_(Job.status == QUEUED, Job.dispatched_at.is_not(None)))
"""Jobs that hold a worker slot: training, or sent to the broker and about to be taken."""


def _check_files(session: Session, job: Job) -> str | None:
    """Why the job's files cannot be trained on, or None when they can."""
    storage = get_storage()
    for file_id in filter(None, (job.training_file, job.validation_file)):
        row = session.get(File, file_id)
        if row is None or row.status != "processed" or not storage.exists(row.storage_key):
            return f"file '{file_id}' is no longer available"
    return None


def _admit(session: Session) -> None:
    """Move new jobs whose files are usable to `queued` (or fail them), and close rows of finished jobs."""
    rows = session.execute(
        select(OutboxMessage, Job).join(Job, Job.id == OutboxMessage.job_id)
        .where(OutboxMessage.sent_at.is_(None), Job.status != QUEUED).order_by(OutboxMessage.id).limit(200)
        .with_for_update(of=OutboxMessage, skip_locked=True)  # another API's dispatcher skips these rows
    ).all()
    for message, job in rows:
        if job.status not in ACTIVE_STATUSES:
            message.sent_at = now()
            continue
        problem = _check_files(session, job)
        if problem:
            if job_lifecycle.fail(session, job.id, code="invalid_training_file", message=problem,
                                  param="training_file", from_statuses=(VALIDATING_FILES,)):
                add_event(session, job.id, f"Job failed: {problem}", level="error")
            message.sent_at = now()
        elif job_lifecycle.queue(session, job.id, from_statuses=(VALIDATING_FILES,)):
            add_event(session, job.id, "Files validated; job queued.")
    session.commit()


def _team_queues(session: Session, settings: Settings, free: int) -> dict[str, TeamQueue]:
    """Each team's oldest waiting jobs (at most `free`), its jobs in flight, its limit and last service."""
    rank = func.row_number().over(partition_by=Job.team_id, order_by=OutboxMessage.id).label("rank")
    waiting = select(OutboxMessage.id.label("message_id"), Job.team_id.label("team_id"), rank) \
        .join(Job, Job.id == OutboxMessage.job_id) \
        .where(OutboxMessage.sent_at.is_(None), Job.status == QUEUED, Job.dispatched_at.is_(None)).subquery()
    queues: dict[str, TeamQueue] = {}
    for message_id, team_id in session.execute(
            select(waiting.c.message_id, waiting.c.team_id).where(waiting.c.rank <= free)
            .order_by(waiting.c.message_id)):
        queues.setdefault(team_id, TeamQueue(waiting=deque())).waiting.append(message_id)
    if not queues:
        return queues
    for team_id, count in session.execute(select(Job.team_id, func.count()).where(IN_FLIGHT, Job.team_id.in_(queues))
                                          .group_by(Job.team_id)):
        queues[team_id].in_flight = count
    for team_id, started in session.execute(select(Job.team_id, func.max(Job.started_at))
                                            .where(Job.team_id.in_(queues)).group_by(Job.team_id)):
        queues[team_id].last_served = started if started is not None else float("-inf")
    for team in session.scalars(select(Team).where(Team.id.in_(queues))):
        queues[team.id].max_running = limits_for(team, settings).max_running_jobs
    return queues


def _scheduling_turn(session: Session) -> bool:
    """One dispatcher at a time hands out slots (a Postgres advisory lock; SQLite serializes writers anyway)."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(select(func.pg_try_advisory_xact_lock(SCHEDULING_LOCK))))


def dispatch_pending(settings: Settings | None = None, session_factory=session_scope) -> int:
    """Admit new jobs, then send waiting ones to the broker as workers have room, fairly across teams.

    Returns how many were sent.
    """
    settings = settings or get_settings()
    sent = 0
    with session_factory() as session:
        _admit(session)
        if not _scheduling_turn(session):
            return 0
        in_flight = session.scalar(select(func.count()).select_from(Job).where(IN_FLIGHT)) or 0
        free = live_capacity(session, settings.lease_seconds) - in_flight
        if free <= 0:
            return 0
        for message_id in fair_order(_team_queues(session, settings, free), free, now()):
            message = session.get(OutboxMessage, message_id)
            job = session.get(Job, message.job_id)
            if job.dispatched_at is not None:  # a second row of a job sent in this pass (resumed twice, say)
                message.sent_at = now()
                continue
            message.attempts += 1
            try:
                send_train(job.id)
            except Exception as exc:  # broker down: the row stays unsent and is retried
                message.last_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("dispatch of %s failed: %s", job.id, exc)
                break
            message.sent_at = job.dispatched_at = now()
            sent += 1
    return sent


def _redispatch(session: Session, job: Job, reason: str, message: str) -> None:
    """Send a queued job again: a new outbox row; it waits undispatched until a worker has room."""
    session.add(OutboxMessage(job_id=job.id, task=TRAIN_TASK, reason=reason))
    job.dispatched_at = None
    add_event(session, job.id, message, level="warn")


def reconcile(settings: Settings, session_factory=session_scope) -> dict[str, int]:
    """Re-dispatch lost jobs and fail expired ones. Returns counts by action."""
    counts = {"redispatched": 0, "failed": 0}
    t = now()
    with session_factory() as session:
        for job in session.scalars(select(Job).where(Job.status.in_(ACTIVE_STATUSES), Job.deadline_at < t)).all():
            if job_lifecycle.expire(session, job.id, deadline_seconds=settings.job_deadline_seconds):
                add_event(session, job.id, "Job failed: deadline exceeded.", level="error")
                counts["failed"] += 1
        session.flush()

        stale_before = t - settings.redispatch_after_seconds
        unsent = select(OutboxMessage.job_id).where(OutboxMessage.sent_at.is_(None))
        lost = session.scalars(select(Job).where(
            Job.status == QUEUED, Job.dispatched_at < stale_before, Job.id.not_in(unsent)))
        for job in lost:
            _redispatch(session, job, "not_taken",
                        "No worker took the job; the queue message may have been lost. Re-dispatching.")
            counts["redispatched"] += 1

        lapsed = session.scalars(select(Job).where(Job.status == RUNNING, Job.lease_expires_at < t)).all()
        for job in lapsed:
            if job.attempts >= MAX_ATTEMPTS:
                if job_lifecycle.fail(session, job.id, code="worker_lost", from_statuses=(RUNNING,),
                                      message=f"The worker stopped responding {job.attempts} times; giving up."):
                    add_event(session, job.id, "Job failed: its worker was lost too many times.", level="error")
                    counts["failed"] += 1
                continue
            # Back to queued so the next worker can take it, then resume from its checkpoint.
            if job_lifecycle.queue(session, job.id, from_statuses=(RUNNING,)):
                _redispatch(session, job, "lease_expired",
                            "The worker running this job stopped renewing its lease. Re-dispatching.")
                counts["redispatched"] += 1
        forget_dead_workers(session, settings.lease_seconds)
    return counts


class DispatchLoop:
    """Drains the outbox every `dispatch_interval_seconds` and reconciles every `reconcile_interval_seconds`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._last_reconcile = 0.0
        self._loop = Periodic("patchbay-dispatch", settings.dispatch_interval_seconds, self._tick)

    def start(self) -> None:
        """Start the loop."""
        self._loop.start()

    def stop(self) -> None:
        """Stop the loop and wait for it."""
        self._loop.stop()

    def _tick(self) -> None:
        dispatch_pending(self.settings)
        if now() - self._last_reconcile >= self.settings.reconcile_interval_seconds:
            self._last_reconcile = now()
            counts = reconcile(self.settings)
            if any(counts.values()):
                log.info("reconciler: %s", counts)
