"""The adapter registry: versions, aliases and name resolution, shared by the API and the worker.

Every change goes through one function here, which writes its rows and its change-feed row
(`RegistryChange`) in the caller's transaction and announces it once that commits (core/notify.py):

- `publish_version`: a new version of a name (a job's result or an import); kind `published`.
- `move_alias`: point `name:alias` at a version, keeping the alias history; kind `alias_moved`.
- `retire_version` / `delete_version`: a version is deleted and its aliases go; kind `deleted`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.ids import new_id, now
from core.models import Adapter, AdapterAlias, AdapterAliasEvent, BaseModelRecord, RegistryChange
from core.notify import announce_on_commit
from core.storage import get_storage

MAX_VERSION = 2**31 - 1
"""Versions are a 32-bit column; larger numbers name nothing."""
MAX_LINEAGE = 32
"""At most this many ancestors are listed in an adapter's `lineage`."""
FEED_LOCK = 0x7061_7463_6872  # "patchr": the Postgres advisory lock key that orders feed writers


class ResolutionError(LookupError):
    """A model name that names nothing this team may use."""


@dataclass
class Resolution:
    """What a request's `model` names: a base model, and maybe one adapter version."""

    base_model: str
    adapter: Adapter | None


def next_version(session: Session, team_id: str, name: str) -> int:
    """The version number the next publish of `name` gets."""
    current = session.scalar(select(func.max(Adapter.version)).where(Adapter.team_id == team_id, Adapter.name == name))
    return (current or 0) + 1


def _take_turn(session: Session) -> None:
    """Wait until no other transaction that changes the registry is open; hold the turn until commit.

    Feed ids must become visible in id order, or a follower that remembers the last id it applied could
    skip one. On Postgres a transaction-scoped advisory lock makes registry changes take turns (SQLite has
    one writer anyway). Each change takes it before touching any registry row, so turns cannot deadlock.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(FEED_LOCK)))


def _record(session: Session, kind: str, *, team_id: str, name: str, adapter_id: str | None,
            version: int | None = None, alias: str | None = None,
            previous_adapter_id: str | None = None) -> RegistryChange:
    """Add a feed row to the caller's transaction (in its turn) and announce it once that commits."""
    row = RegistryChange(kind=kind, team_id=team_id, name=name, adapter_id=adapter_id, version=version,
                         alias=alias, previous_adapter_id=previous_adapter_id)
    session.add(row)
    session.flush()
    announce_on_commit(session, row)
    return row


def publish_version(session: Session, *, team_id: str, name: str, **fields) -> Adapter:
    """Add the next version of `name` and its `published` change (the caller commits)."""
    _take_turn(session)
    row = Adapter(id=fields.pop("id", None) or new_id("adapter"), team_id=team_id, name=name,
                  version=next_version(session, team_id, name), **fields)
    session.add(row)
    session.flush()
    _record(session, "published", team_id=team_id, name=name, adapter_id=row.id, version=row.version)
    return row


def move_alias(session: Session, team_id: str, name: str, alias: str, adapter: Adapter) -> AdapterAliasEvent:
    """Point `name:alias` at `adapter`, keeping the history, with its `alias_moved` change (the caller commits)."""
    _take_turn(session)
    row = session.scalar(select(AdapterAlias).where(
        AdapterAlias.team_id == team_id, AdapterAlias.name == name, AdapterAlias.alias == alias))
    previous = row.adapter_id if row else None
    if row is None:
        row = AdapterAlias(team_id=team_id, name=name, alias=alias, adapter_id=adapter.id)
        session.add(row)
    row.adapter_id, row.updated_at = adapter.id, now()
    event = AdapterAliasEvent(team_id=team_id, name=name, alias=alias, adapter_id=adapter.id,
                              previous_adapter_id=previous)
    session.add(event)
    session.flush()
    _record(session, "alias_moved", team_id=team_id, name=name, alias=alias, adapter_id=adapter.id,
            version=adapter.version, previous_adapter_id=previous)
    return event


def _drop_aliases_to(session: Session, adapter: Adapter) -> None:
    """Remove every alias that points at `adapter`, recording each removal in the alias history."""
    for row in session.scalars(select(AdapterAlias).where(AdapterAlias.adapter_id == adapter.id)):
        session.add(AdapterAliasEvent(team_id=row.team_id, name=row.name, alias=row.alias, adapter_id=None,
                                      previous_adapter_id=adapter.id))
        session.delete(row)
    session.flush()


def retire_version(session: Session, adapter: Adapter) -> None:
    """Mark a version deleted (its number is never reused) and drop its aliases, with its `deleted` change.

    The caller commits, then removes the stored files (`delete_version` does all of it).
    """
    _take_turn(session)
    adapter.status = "deleted"
    _drop_aliases_to(session, adapter)
    _record(session, "deleted", team_id=adapter.team_id, name=adapter.name, adapter_id=adapter.id,
            version=adapter.version)


def delete_version(session: Session, adapter: Adapter) -> None:
    """Retire a version, commit, then delete its stored files (what `DELETE` on adapters and models does)."""
    retire_version(session, adapter)
    session.commit()
    get_storage().delete(adapter.storage_key)


def aliases_of(session: Session, adapter_ids: list[str]) -> dict[str, list[str]]:
    """For each adapter id, the aliases that point at it."""
    found: dict[str, list[str]] = {}
    if adapter_ids:
        for row in session.scalars(select(AdapterAlias).where(AdapterAlias.adapter_id.in_(adapter_ids))):
            found.setdefault(row.adapter_id, []).append(row.alias)
    return found


def lineages(session: Session, rows: list[Adapter]) -> tuple[dict[str, list[str]], dict[str, Adapter]]:
    """Each row's ancestor ids, nearest first (at most MAX_LINEAGE), and the ancestor rows still there.

    Deleted versions keep their rows, so they stay in the chain; a parent whose row is gone ends it (its id
    is still listed). One query per generation, for all rows at once.
    """
    found: dict[str, Adapter] = {row.id: row for row in rows}
    chains: dict[str, list[str]] = {row.id: [] for row in rows}
    nxt = {row.id: row.parent_id for row in rows}
    for _ in range(MAX_LINEAGE):
        wanted = {parent for parent in nxt.values() if parent and parent not in found}
        if wanted:
            found.update((a.id, a) for a in session.scalars(select(Adapter).where(Adapter.id.in_(wanted))))
        for row_id, parent in nxt.items():
            if parent is None or parent == row_id or parent in chains[row_id]:  # the end, or a (corrupt) cycle
                nxt[row_id] = None
                continue
            chains[row_id].append(parent)
            nxt[row_id] = found[parent].parent_id if parent in found else None
        if not any(nxt.values()):
            break
    return chains, found


def find_team_adapter(session: Session, team_id: str, ref: str) -> Adapter | None:
    """An adapter by id, fine-tuned model name, `name:alias`, `name@version` or `name` (newest)."""
    live = select(Adapter).where(Adapter.team_id == team_id, Adapter.status == "ready")
    row = session.scalar(live.where((Adapter.id == ref) | (Adapter.fine_tuned_model == ref)))
    if row is not None:
        return row
    if "@" in ref:
        name, _, version = ref.rpartition("@")
        if version.isascii() and version.isdigit() and int(version) <= MAX_VERSION:
            return session.scalar(live.where(Adapter.name == name, Adapter.version == int(version)))
        return None
    if ":" in ref:
        name, _, alias = ref.rpartition(":")
        alias_row = session.scalar(select(AdapterAlias).where(
            AdapterAlias.team_id == team_id, AdapterAlias.name == name, AdapterAlias.alias == alias))
        return session.scalar(live.where(Adapter.id == alias_row.adapter_id)) if alias_row else None
    return session.scalar(live.where(Adapter.name == ref).order_by(Adapter.version.desc()).limit(1))


def resolve_model(session: Session, team_id: str, model: str) -> Resolution:
    """Turn a request's `model` into a base model and an adapter version (or none)."""
    if session.get(BaseModelRecord, model) is not None:
        return Resolution(base_model=model, adapter=None)
    adapter = find_team_adapter(session, team_id, model)
    if adapter is None:
        raise ResolutionError(f"The model '{model}' does not exist or you do not have access to it.")
    return Resolution(base_model=adapter.base_model, adapter=adapter)
