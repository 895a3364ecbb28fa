"""Job leases: a worker owns a running job only while it keeps renewing its lease.

A worker takes the lease by starting the job and gives it up by finishing it; both are moves of the job's
life (`core.job_lifecycle.start`, `succeed`, `fail` with `owner=`). Here is what happens between them:
renewing the lease, and asking whether it is still ours. Two workers can never both hold a job, and a
cancelled, paused or failed job is never renewed by a late worker.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.ids import now
from core.job_lifecycle import RUNNING
from core.models import Job


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend our lease (and commit). False when the job was cancelled, paused, failed or taken over."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.status == RUNNING)
        .values(lease_expires_at=now() + lease_seconds)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def holds_lease(session: Session, job_id: str, owner: str) -> bool:
    """Whether `owner` still holds the lease of the running job (it may have expired without a taker)."""
    held = session.scalar(select(Job.id).where(Job.id == job_id, Job.lease_owner == owner, Job.status == RUNNING))
    return held is not None
