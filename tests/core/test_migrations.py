"""Alembic is the only source of the schema, and it agrees with the SQLAlchemy models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from core.db import make_engine
from core.migrate import upgrade_head
from core.models import Base


def _assert_models_match(url: str) -> None:
    upgrade_head(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        tables = set(inspect(conn).get_table_names())
    engine.dispose()
    assert diff == [], diff
    assert {"teams", "api_keys", "base_models", "files", "jobs", "job_events", "checkpoints", "adapters",
            "dispatch_outbox"} <= tables


def test_migrations_match_models_on_sqlite(tmp_path):
    _assert_models_match(f"sqlite:///{tmp_path / 'db.sqlite'}")


@pytest.mark.parametrize("runs", [2])
def test_migrations_match_models_on_postgres_and_rerun_cleanly(postgres_url, runs):
    for _ in range(runs):
        _assert_models_match(postgres_url)
