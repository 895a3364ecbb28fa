"""The adapter registry: versions, aliases and name resolution, shared by the API and the worker."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.ids import new_id, now
from core.models import Adapter, AdapterAlias, AdapterAliasEvent, BaseModelRecord

MAX_VERSION = 2**31 - 1
"""Versions are a 32-bit column; larger numbers name nothing."""


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


def new_adapter_row(session: Session, *, team_id: str, name: str, **fields) -> Adapter:
    """Add a new version of `name` (the caller commits)."""
    row = Adapter(id=fields.pop("id", None) or new_id("adapter"), team_id=team_id, name=name,
                  version=next_version(session, team_id, name), **fields)
    session.add(row)
    session.flush()
    return row


def move_alias(session: Session, team_id: str, name: str, alias: str, adapter: Adapter) -> AdapterAliasEvent:
    """Point `name:alias` at `adapter`, keeping the history."""
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
    return event


def drop_aliases_to(session: Session, adapter: Adapter) -> None:
    """Remove every alias that points at `adapter`, recording each removal in the history."""
    for row in session.scalars(select(AdapterAlias).where(AdapterAlias.adapter_id == adapter.id)):
        session.add(AdapterAliasEvent(team_id=row.team_id, name=row.name, alias=row.alias, adapter_id=None,
                                      previous_adapter_id=adapter.id))
        session.delete(row)
    session.flush()


def aliases_of(session: Session, adapter_ids: list[str]) -> dict[str, list[str]]:
    """For each adapter id, the aliases that point at it."""
    found: dict[str, list[str]] = {}
    if adapter_ids:
        for row in session.scalars(select(AdapterAlias).where(AdapterAlias.adapter_id.in_(adapter_ids))):
            found.setdefault(row.adapter_id, []).append(row.alias)
    return found


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
