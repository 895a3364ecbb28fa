"""Training workers' capacity: each worker keeps a row alive by heartbeat, and the dispatcher hands out
no more jobs than the live rows can run."""

from __future__ import annotations

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.ids import now
from core.models import WorkerRecord


def heartbeat_worker(session: Session, worker_id: str, concurrency: int) -> None:
    """Create or renew a worker's row (the caller commits)."""
    row = session.get(WorkerRecord, worker_id)
    if row is None:
        session.add(WorkerRecord(id=worker_id, concurrency=concurrency, started_at=now(), heartbeat_at=now()))
    else:
        row.concurrency, row.heartbeat_at = concurrency, now()


def retire_worker(session: Session, worker_id: str) -> None:
    """Drop a worker's row at shutdown."""
    session.execute(delete(WorkerRecord).where(WorkerRecord.id == worker_id))


def live_capacity(session: Session, ttl_seconds: float) -> int:
    """How many jobs the workers heard from within `ttl_seconds` can run at once."""
    return int(session.scalar(select(func.coalesce(func.sum(WorkerRecord.concurrency), 0))
                              .where(WorkerRecord.heartbeat_at > now() - ttl_seconds)) or 0)


def forget_dead_workers(session: Session, ttl_seconds: float) -> int:
    """Delete rows whose heartbeat stopped long ago (a killed worker never says goodbye)."""
    return session.execute(delete(WorkerRecord).where(WorkerRecord.heartbeat_at < now() - 10 * ttl_seconds)).rowcount


def live_workers(session: Session, ttl_seconds: float) -> list[WorkerRecord]:
    """The workers heard from within `ttl_seconds`, oldest first."""
    return list(session.scalars(select(WorkerRecord).where(WorkerRecord.heartbeat_at > now() - ttl_seconds)
                                .order_by(WorkerRecord.started_at)))
