"""core/notify.py: committed registry changes reach Redis pub/sub; rollbacks and a Redis outage do not hurt."""

from __future__ import annotations

import json
import logging
import time

import pytest
import redis

from core.db import session_scope
from core.notify import CHANNEL, changes_since, latest_change_id
from core.registry import publish_version
from tests.support.registry_rows import add_version, fresh_registry, version_fields
from tests.support.services import free_port


@pytest.fixture
def subscriber(redis_url):
    pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    yield pubsub
    pubsub.close()


def _messages(pubsub, team_id: str, expected: int) -> list[dict]:
    """This test's announcements (the channel is shared by every Redis database number): waits for
    `expected` of them, then a moment longer for any extra one."""
    found, deadline = [], time.monotonic() + 10
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message and message["type"] == "message" and json.loads(message["data"])["team_id"] == team_id:
            found.append(json.loads(message["data"]))
        if len(found) >= expected:
            deadline = min(deadline, time.monotonic() + 0.3)
    return found


def test_a_committed_change_is_published_with_its_feed_row(tmp_path, redis_url, subscriber):
    with fresh_registry(tmp_path / "data", broker_url=redis_url) as teams:
        row = add_version(teams.acme, "bot")
        with session_scope() as session:
            (change,) = changes_since(session, latest_change_id(session) - 1)
        assert _messages(subscriber, teams.acme, 1) == [change]
        assert change["kind"] == "published" and change["adapter_id"] == row.id and change["version"] == 1


def test_a_rolled_back_change_is_not_published(tmp_path, redis_url, subscriber):
    with fresh_registry(tmp_path / "data", broker_url=redis_url) as teams:
        with session_scope() as session:
            publish_version(session, team_id=teams.acme, name="bot", **version_fields())
            session.rollback()
        with session_scope() as session:
            publish_version(session, team_id=teams.acme, name="bot", **version_fields())
            session.close()  # ends without a commit, too
        assert _messages(subscriber, teams.acme, 0) == []
        kept = add_version(teams.acme, "bot")  # and the next commit announces only its own change
        assert [m["adapter_id"] for m in _messages(subscriber, teams.acme, 1)] == [kept.id]


def test_changes_commit_even_when_redis_is_down(tmp_path, caplog):
    with fresh_registry(tmp_path / "data", broker_url=f"redis://127.0.0.1:{free_port()}") as teams:
        with caplog.at_level(logging.WARNING, logger="patchbay.notify"):
            row = add_version(teams.acme, "bot")
        with session_scope() as session:
            assert [c["adapter_id"] for c in changes_since(session, 0)] == [row.id]
    assert "could not announce published" in caplog.text


def test_the_feed_reads_in_id_order_from_any_point(tmp_path):
    with fresh_registry(tmp_path / "data") as teams:
        with session_scope() as session:
            assert latest_change_id(session) == 0
        rows = [add_version(teams.acme, "bot") for _ in range(3)]
        with session_scope() as session:
            everything = changes_since(session, 0)
            assert [c["adapter_id"] for c in everything] == [r.id for r in rows]
            assert changes_since(session, everything[0]["id"]) == everything[1:]
            assert latest_change_id(session) == everything[-1]["id"]
            assert changes_since(session, latest_change_id(session)) == []

