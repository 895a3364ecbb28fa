"""A migrated database (SQLite or Postgres) with two teams and a base model, and adapter versions in it."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BASE = "tiny-base"


@dataclass(frozen=True)
class Teams:
    """The ids of the two teams a fresh registry database holds."""

    acme: str
    globex: str


@contextmanager
def fresh_registry(data_dir: Path, database_url: str | None = None, broker_url: str | None = None,
                   **env: str) -> Iterator[Teams]:
    """Point PATCHBAY_* at `data_dir` and the given stores (default: the embedded SQLite ones), migrate,
    add two teams (new names each time, so a shared Postgres database works too) and the base `tiny-base`."""
    from core.auth import create_team
    from core.db import session_scope
    from core.models import BaseModelRecord
    from tests.support.migrated import migrated_database

    with migrated_database(data_dir, database_url, broker_url, **env):
        suffix = secrets.token_hex(3)
        with session_scope() as session:
            teams = Teams(acme=create_team(session, f"acme-{suffix}").id,
                          globex=create_team(session, f"globex-{suffix}").id)
            if session.get(BaseModelRecord, BASE) is None:
                session.add(BaseModelRecord(id=BASE, path=str(data_dir)))
        yield teams


def version_fields(**overrides) -> dict:
    """The columns `publish_version` needs beyond team and name, for a stand-in artifact."""
    return {"base_model": BASE, "storage_key": f"adapters/{secrets.token_hex(4)}", "method": "lora", "rank": 8,
            "sha256": "0" * 64, "status": "ready", "source": "import", **overrides}


def add_version(team_id: str, name: str, **overrides):
    """Publish (and commit) a new version of `name`; returns the Adapter row."""
    from core.db import session_scope
    from core.registry import publish_version

    with session_scope() as session:
        return publish_version(session, team_id=team_id, name=name, **version_fields(**overrides))


def feed() -> list[dict]:
    """Every committed change-feed row, oldest first."""
    from core.db import session_scope
    from core.notify import changes_since

    with session_scope() as session:
        return changes_since(session, 0)
