"""core/replicas.py on a migrated database: announce, renew, expire after the TTL, retire, forget."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from core.db import session_scope
from core.ids import now
from core.models import ReplicaRecord
from core.replicas import FORGET_AFTER_TTLS, announce_replica, forget_dead_replicas, live_replicas, retire_replica
from core.schemas.replicas import ReplicaStatus
from tests.support.migrated import migrated_database

TTL = 10.0


def status(base_model: str = "tiny", state: str = "ready", resident: list[str] | None = None) -> ReplicaStatus:
    return ReplicaStatus(url=f"http://{base_model}:8001", base_model=base_model, engine="patchbay", state=state,
                         kinds=["lora", "qlora"], max_resident_adapters=2, max_batch=16,
                         resident_adapters=resident or [], load=0, stats={"requests": 0})


@pytest.fixture
def database(tmp_path):
    with migrated_database(tmp_path / "data"):
        yield


def _age(replica_id: str, seconds: float) -> None:
    with session_scope() as session:
        session.execute(update(ReplicaRecord).where(ReplicaRecord.id == replica_id)
                        .values(heartbeat_at=now() - seconds))


def test_an_announce_creates_then_renews_the_row(database):
    with session_scope() as session:
        announce_replica(session, "r1", status(state="loading"))
    with session_scope() as session:
        announce_replica(session, "r1", status(resident=["adapter-a"]))
    with session_scope() as session:
        (replica,) = live_replicas(session, TTL)
    assert replica.id == "r1" and replica.source == "registered"
    assert replica.state == "ready" and replica.resident_adapters == ["adapter-a"]
    assert replica.started_at <= replica.heartbeat_at


def test_live_replicas_filter_by_base_and_drop_silent_ones(database):
    with session_scope() as session:
        announce_replica(session, "llama", status("tiny-llama"))
        announce_replica(session, "qwen", status("tiny-qwen2"))
        announce_replica(session, "silent", status("tiny-llama"))
    _age("silent", TTL + 1)
    with session_scope() as session:
        assert {r.id for r in live_replicas(session, TTL)} == {"llama", "qwen"}
        assert [r.id for r in live_replicas(session, TTL, base_model="tiny-llama")] == ["llama"]


def test_retire_is_idempotent_and_only_long_dead_rows_are_forgotten(database):
    with session_scope() as session:
        announce_replica(session, "gone", status())
        announce_replica(session, "dead", status())
        announce_replica(session, "late", status())
    with session_scope() as session:
        retire_replica(session, "gone")
        retire_replica(session, "gone")
    _age("dead", FORGET_AFTER_TTLS * TTL + 1)
    _age("late", TTL + 1)
    with session_scope() as session:
        assert forget_dead_replicas(session, TTL) == 1
    with session_scope() as session:
        assert {row.id for row in session.query(ReplicaRecord)} == {"late"}
