"""Job events: the log and metrics a job's followers read, paged or live."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from core.ids import new_id, now
from core.models import JobEvent


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Append an event to a job's log (committed with the caller's transaction)."""
    event = JobEvent(
        id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level, type=type, message=message, data=data
    )
    session.add(event)
    return event
