"""A database migrated by Patchbay's own migrations and used through its own engine, and job rows in any status."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


@contextmanager
def migrated_database(data_dir: Path, database_url: str | None = None) -> Iterator[None]:
    """Point PATCHBAY_* at a new data dir and `database_url` (default: SQLite in the data dir), migrate it to
    head, and forget it afterwards."""
    from core.migrate import upgrade_head
    from tests.support.api_app import clear_caches

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATCHBAY_DATA_DIR", str(data_dir))
        for name in ("PATCHBAY_DATABASE_URL", "PATCHBAY_BROKER_URL", "PATCHBAY_STORAGE_DIR"):
            patch.delenv(name, raising=False)
        if database_url:
            patch.setenv("PATCHBAY_DATABASE_URL", database_url)
        clear_caches()
        upgrade_head()
        try:
            yield
        finally:
            clear_caches()


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
