"""The inference fleet's membership: each replica keeps a row alive by heartbeat, the API routes to live rows.

A replica announces itself when it starts (state `loading`), again when its base model answers
(`ready`), and then every `replica_heartbeat_seconds` with what is resident and how busy it is. A
replica whose heartbeat is older than `replica_ttl_seconds` is no longer live; its row is deleted
later (a killed replica never says goodbye).
"""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from core.ids import now
from core.models import ReplicaRecord
from core.schemas.replicas import ReplicaPublic, ReplicaStatus

FORGET_AFTER_TTLS = 10
"""A row whose heartbeat stopped this many TTLs ago is deleted."""


def announce_replica(session: Session, replica_id: str, status: ReplicaStatus) -> None:
    """Create or renew a replica's row with its current status (the caller commits)."""
    row = session.get(ReplicaRecord, replica_id)
    if row is None:
        row = ReplicaRecord(id=replica_id, started_at=now())
        session.add(row)
    for field, value in status.model_dump().items():
        setattr(row, field, value)
    row.heartbeat_at = now()


def retire_replica(session: Session, replica_id: str) -> None:
    """Drop a replica's row at shutdown (idempotent)."""
    session.execute(delete(ReplicaRecord).where(ReplicaRecord.id == replica_id))


def live_replicas(session: Session, ttl_seconds: float, base_model: str | None = None) -> list[ReplicaPublic]:
    """The replicas heard from within `ttl_seconds` (of one base model, if given), oldest first."""
    query = select(ReplicaRecord).where(ReplicaRecord.heartbeat_at > now() - ttl_seconds)
    if base_model is not None:
        query = query.where(ReplicaRecord.base_model == base_model)
    return [replica_public(row) for row in session.scalars(query.order_by(ReplicaRecord.started_at))]


def replica_public(row: ReplicaRecord) -> ReplicaPublic:
    """A registered replica's row as the API shows it."""
    fields = {name: getattr(row, name) for name in ReplicaStatus.model_fields}
    return ReplicaPublic(**fields, id=row.id, source="registered", started_at=row.started_at,
                         heartbeat_at=row.heartbeat_at)


def forget_dead_replicas(session: Session, ttl_seconds: float) -> int:
    """Delete rows whose heartbeat stopped long ago; returns how many."""
    cutoff = now() - FORGET_AFTER_TTLS * ttl_seconds
    return session.execute(delete(ReplicaRecord).where(ReplicaRecord.heartbeat_at < cutoff)).rowcount
