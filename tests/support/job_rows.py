"""Job rows in any status, written straight to a migrated database (see tests.support.migrated)."""

from __future__ import annotations

from typing import Any


def add_job(status: str, **fields: Any) -> str:
    """Write a job of team `acme` straight in `status` (as no caller of the lifecycle may) and return its id."""
    from core.auth import create_team
    from core.db import session_scope
    from core.ids import new_id, now
    from core.models import Job

    with session_scope() as session:
        team = create_team(session, "acme")
        job = Job(id=new_id("ftjob"), team_id=team.id, model="tiny-llama", training_file="file-x", status=status,
                  spec={}, seed=0, created_at=now(), deadline_at=now() + 3600, attempts=0)
        for name, value in fields.items():
            setattr(job, name, value)
        session.add(job)
        return job.id


def read_job(job_id: str):
    """The job's row as committed now."""
    from core.db import session_scope
    from core.models import Job

    with session_scope() as session:
        return session.get(Job, job_id)
