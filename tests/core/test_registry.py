"""core/registry.py: versions, aliases, deletion and resolution, each change with its change-feed row."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.models import Adapter, AdapterAlias, AdapterAliasEvent, RegistryChange
from core.registry import (
    ResolutionError,
    delete_version,
    find_team_adapter,
    move_alias,
    publish_version,
    resolve_model,
    retire_version,
)
from tests.support.registry_rows import BASE, add_version, feed, fresh_registry, version_fields


@pytest.fixture(params=["sqlite", "postgres"])
def teams(request, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    with fresh_registry(tmp_path / "data", url) as teams:
        yield teams


def _team_feed(team_id: str) -> list[tuple]:
    return [(c["kind"], c["name"], c["version"], c["alias"], c["adapter_id"], c["previous_adapter_id"])
            for c in feed() if c["team_id"] == team_id]


def _move(team_id: str, name: str, alias: str, adapter: Adapter) -> None:
    with session_scope() as session:
        move_alias(session, team_id, name, alias, session.get(Adapter, adapter.id))


def test_versions_count_per_team_and_name_and_each_publish_is_in_the_feed(teams):
    first, second = add_version(teams.acme, "bot"), add_version(teams.acme, "bot")
    other_name, other_team = add_version(teams.acme, "helper"), add_version(teams.globex, "bot")
    assert (first.version, second.version, other_name.version, other_team.version) == (1, 2, 1, 1)
    assert _team_feed(teams.acme) == [("published", "bot", 1, None, first.id, None),
                                      ("published", "bot", 2, None, second.id, None),
                                      ("published", "helper", 1, None, other_name.id, None)]
    assert _team_feed(teams.globex) == [("published", "bot", 1, None, other_team.id, None)]


def test_moving_an_alias_keeps_its_history(teams):
    v1, v2 = add_version(teams.acme, "bot"), add_version(teams.acme, "bot")
    _move(teams.acme, "bot", "prod", v1)
    _move(teams.acme, "bot", "prod", v2)
    _move(teams.acme, "bot", "prod", v1)  # roll back
    with session_scope() as session:
        history = [(e.adapter_id, e.previous_adapter_id) for e in session.scalars(
            select(AdapterAliasEvent).where(AdapterAliasEvent.team_id == teams.acme).order_by(AdapterAliasEvent.id))]
        alias = session.scalar(select(AdapterAlias).where(AdapterAlias.team_id == teams.acme))
    assert history == [(v1.id, None), (v2.id, v1.id), (v1.id, v2.id)]
    assert (alias.name, alias.alias, alias.adapter_id) == ("bot", "prod", v1.id)
    assert _team_feed(teams.acme)[2:] == [("alias_moved", "bot", 1, "prod", v1.id, None),
                                          ("alias_moved", "bot", 2, "prod", v2.id, v1.id),
                                          ("alias_moved", "bot", 1, "prod", v1.id, v2.id)]


def test_deleting_a_version_drops_its_aliases_files_and_number(teams):
    from core.storage import get_storage

    v1, v2 = add_version(teams.acme, "bot"), add_version(teams.acme, "bot")
    get_storage().path(v2.storage_key).mkdir(parents=True)
    assert get_storage().exists(v2.storage_key)
    _move(teams.acme, "bot", "prod", v2)
    _move(teams.acme, "bot", "canary", v1)
    with session_scope() as session:
        delete_version(session, session.get(Adapter, v2.id))
    assert not get_storage().exists(v2.storage_key)
    with session_scope() as session:
        assert session.get(Adapter, v2.id).status == "deleted"
        assert [a.alias for a in session.scalars(select(AdapterAlias).where(AdapterAlias.team_id == teams.acme))] \
            == ["canary"]
        removal = session.scalars(select(AdapterAliasEvent).where(AdapterAliasEvent.team_id == teams.acme)
                                  .order_by(AdapterAliasEvent.id.desc())).first()
        assert (removal.alias, removal.adapter_id, removal.previous_adapter_id) == ("prod", None, v2.id)
        assert find_team_adapter(session, teams.acme, "bot:prod") is None
        assert find_team_adapter(session, teams.acme, "bot").id == v1.id  # the newest live version
    assert _team_feed(teams.acme)[-1] == ("deleted", "bot", 2, None, v2.id, None)
    assert add_version(teams.acme, "bot").version == 3


def test_resolution_by_id_name_alias_and_version(teams):
    v1 = add_version(teams.acme, "bot", fine_tuned_model=f"ft:{BASE}:acme:bot:{teams.acme}")
    v2 = add_version(teams.acme, "bot")
    _move(teams.acme, "bot", "prod", v1)
    with session_scope() as session:
        def found(ref: str, team: str = teams.acme) -> str | None:
            row = find_team_adapter(session, team, ref)
            return row.id if row else None

        assert found(v1.id) == v1.id and found(v1.fine_tuned_model) == v1.id
        assert found("bot") == v2.id and found("bot@1") == v1.id and found("bot@2") == v2.id
        assert found("bot:prod") == v1.id
        for nothing in ("bot@3", "bot@x", f"bot@{2**31}", "bot:canary", "other", "other:prod"):
            assert found(nothing) is None, nothing
        for ref in (v1.id, "bot", "bot@1", "bot:prod"):
            assert found(ref, teams.globex) is None, ref
        assert resolve_model(session, teams.acme, BASE).adapter is None
        resolved = resolve_model(session, teams.acme, "bot:prod")
        assert (resolved.base_model, resolved.adapter.id) == (BASE, v1.id)
        with pytest.raises(ResolutionError):
            resolve_model(session, teams.globex, "bot")


def test_a_change_and_its_feed_row_commit_together_or_not_at_all(teams):
    v1 = add_version(teams.acme, "bot")
    before = len(_team_feed(teams.acme))
    with session_scope() as session:
        row = publish_version(session, team_id=teams.acme, name="bot", **version_fields())
        move_alias(session, teams.acme, "bot", "prod", row)
        with session_scope() as onlooker:  # another connection sees neither the version nor its changes yet
            assert onlooker.get(Adapter, row.id) is None
            assert onlooker.scalar(select(RegistryChange).where(RegistryChange.adapter_id == row.id)) is None
    assert [c[0] for c in _team_feed(teams.acme)[before:]] == ["published", "alias_moved"]

    for change in ("publish", "move", "retire"):
        count = len(_team_feed(teams.acme))
        with session_scope() as session:
            target = session.get(Adapter, v1.id)
            if change == "publish":
                publish_version(session, team_id=teams.acme, name="bot", **version_fields())
            elif change == "move":
                move_alias(session, teams.acme, "bot", "canary", target)
            else:
                retire_version(session, target)
            session.rollback()
        assert len(_team_feed(teams.acme)) == count, change
        with session_scope() as session:
            assert session.get(Adapter, v1.id).status == "ready"
            assert session.scalar(select(AdapterAlias).where(AdapterAlias.team_id == teams.acme,
                                                             AdapterAlias.alias == "canary")) is None


def test_feed_writers_take_turns_on_postgres_so_ids_commit_in_order(tmp_path, postgres_url):
    with fresh_registry(tmp_path / "data", postgres_url) as teams:
        first = session_scope()
        session = first.__enter__()
        publish_version(session, team_id=teams.acme, name="first", **version_fields())
        second_done = threading.Event()

        def publish_second():
            add_version(teams.acme, "second")
            second_done.set()

        thread = threading.Thread(target=publish_second)
        thread.start()
        assert not second_done.wait(1.0), "a second feed writer went ahead of an uncommitted one"
        first.__exit__(None, None, None)
        assert second_done.wait(10)
        thread.join()
        assert [c[1] for c in _team_feed(teams.acme)] == ["first", "second"]
