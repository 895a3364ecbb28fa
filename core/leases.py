"""Job leases: a worker owns a running job only while it keeps renewing its lease.

Every transition is one conditional UPDATE, so two workers can never both run a job
and a cancelled or failed job is never overwritten by a late worker.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from core.ids import now
from core.models import Job

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("validating_files", "queued", "running")
UNFINISHED_STATUSES = (*ACTIVE_STATUSES, "paused")


def acquire_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Take a queued job, or a running one whose lease expired. True if it is now ours."""
    t = now()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            or_(
                Job.status == "queued",
                and_(Job.status == "running", Job.lease_expires_at < t),
            ),
        )
        .values(
            status="running",
            lease_owner=owner,
            lease_expires_at=t + lease_seconds,
            attempts=Job.attempts + 1,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend our lease. False when the job was cancelled, failed or taken over."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(lease_expires_at=now() + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def finish_job(session: Session, job_id: str, owner: str, status: str, **fields: Any) -> bool:
    """Record the outcome, only if we still hold the lease. True if it was recorded."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(status=status, finished_at=now(), lease_owner=None, lease_expires_at=None, **fields)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1
