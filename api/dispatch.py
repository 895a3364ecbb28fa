"""Outbox dispatcher and reconciler: the database, not the broker, guarantees every job runs.

The dispatcher sends unsent outbox rows to Celery. The reconciler re-dispatches jobs whose
message was lost or whose worker died, and fails jobs past their deadline.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db import session_scope
from core.events import add_event
from core.ids import now
from core.leases import ACTIVE_STATUSES
from core.models import File, Job, OutboxMessage
from core.queue import TRAIN_TASK, send_train
from core.settings import Settings
from core.storage import get_storage

log = logging.getLogger("patchbay.dispatch")
MAX_ATTEMPTS = 5


def _check_files(session: Session, job: Job) -> str | None:
    """Why the job's files cannot be trained on, or None when they can."""
    storage = get_storage()
    for file_id in filter(None, (job.training_file, job.validation_file)):
        row = session.get(File, file_id)
        if row is None or row.status != "processed" or not storage.exists(row.storage_key):
            return f"file '{file_id}' is no longer available"
    return None


def _fail(session: Session, job: Job, code: str, message: str, event: str, param: str | None = None) -> None:
    job.status, job.finished_at, job.lease_owner, job.lease_expires_at = "failed", now(), None, None
    job.error = {"code": code, "message": message, "param": param}
    add_event(session, job.id, event, level="error")


def dispatch_pending(session_factory=session_scope) -> int:
    """Send every unsent outbox row to the broker. Returns how many were sent."""
    sent = 0
    with session_factory() as session:
        pending = session.scalars(
            select(OutboxMessage).where(OutboxMessage.sent_at.is_(None)).order_by(OutboxMessage.id)
            .limit(50).with_for_update(skip_locked=True)
        ).all()
        for message in pending:
            job = session.get(Job, message.job_id)
            if job is None or job.status not in ACTIVE_STATUSES:
                message.sent_at = now()
                continue
            if job.status == "validating_files":
                problem = _check_files(session, job)
                if problem:
                    _fail(session, job, "invalid_training_file", problem, f"Job failed: {problem}",
                          param="training_file")
                    message.sent_at = now()
                    continue
                job.status = "queued"
                add_event(session, job.id, "Files validated; job queued.")
            session.commit()  # the job is queued before any worker can see the message
            message.attempts += 1
            try:
                send_train(job.id)
            except Exception as exc:  # broker down: the row stays unsent and is retried
                message.last_error = f"{exc.__class__.__name__}: {exc}"
                log.warning("dispatch of %s failed: %s", job.id, exc)
                session.commit()
                break
            message.sent_at = job.dispatched_at = now()
            session.commit()
            sent += 1
    return sent


def _redispatch(session: Session, job: Job, reason: str, message: str) -> None:
    session.add(OutboxMessage(job_id=job.id, task=TRAIN_TASK, reason=reason))
    job.dispatched_at = now()
    add_event(session, job.id, message, level="warn")


def reconcile(settings: Settings, session_factory=session_scope) -> dict[str, int]:
    """Re-dispatch lost jobs and fail expired ones. Returns counts by action."""
    counts = {"redispatched": 0, "failed": 0}
    t = now()
    with session_factory() as session:
        for job in session.scalars(select(Job).where(Job.status.in_(ACTIVE_STATUSES), Job.deadline_at < t)):
            _fail(session, job, "deadline_exceeded",
                  f"The job did not finish within {settings.job_deadline_seconds} seconds.",
                  "Job failed: deadline exceeded.")
            counts["failed"] += 1
        session.flush()

        stale_before = t - settings.redispatch_after_seconds
        unsent = select(OutboxMessage.job_id).where(OutboxMessage.sent_at.is_(None))
        lost = session.scalars(select(Job).where(
            Job.status == "queued", Job.dispatched_at < stale_before, Job.id.not_in(unsent)))
        for job in lost:
            _redispatch(session, job, "not_taken",
                        "No worker took the job; the queue message may have been lost. Re-dispatching.")
            counts["redispatched"] += 1

        expired = session.scalars(select(Job).where(Job.status == "running", Job.lease_expires_at < t))
        for job in expired:
            if job.attempts >= MAX_ATTEMPTS:
                _fail(session, job, "worker_lost", f"The worker stopped responding {job.attempts} times; giving up.",
                      "Job failed: its worker was lost too many times.")
                counts["failed"] += 1
                continue
            # Back to queued so the next worker can take it, then resume from its checkpoint.
            result = session.execute(update(Job).where(Job.id == job.id, Job.status == "running",
                                                       Job.lease_expires_at < t)
                                     .values(status="queued", lease_owner=None, lease_expires_at=None)
                                     .execution_options(synchronize_session=False))
            if result.rowcount == 1:
                _redispatch(session, job, "lease_expired",
                            "The worker running this job stopped renewing its lease. Re-dispatching.")
                counts["redispatched"] += 1
    return counts


class DispatchLoop:
    """A background thread that drains the outbox and reconciles, until stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="patchbay-dispatch", daemon=True)

    def start(self) -> None:
        """Start the loop."""
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and wait for it."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last_reconcile = 0.0
        while not self._stop.is_set():
            try:
                dispatch_pending()
                if now() - last_reconcile >= self.settings.reconcile_interval_seconds:
                    last_reconcile = now()
                    counts = reconcile(self.settings)
                    if any(counts.values()):
                        log.info("reconciler: %s", counts)
            except Exception:  # keep the loop alive through database hiccups
                log.exception("dispatch loop error")
            self._stop.wait(self.settings.dispatch_interval_seconds)
