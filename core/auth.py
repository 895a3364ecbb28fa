"""Teams and API keys. Keys are shown once and stored only as sha256."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.ids import new_id
from core.models import ApiKey, Team

KEY_PREFIX = "pb-"


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_team(session: Session, name: str) -> Team:
    """Create a team, or return the existing one of that name."""
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        team = Team(id=new_id("team"), name=name)
        session.add(team)
        session.flush()
    return team


def create_api_key(session: Session, team: Team, *, is_admin: bool = False) -> str:
    """Issue a new key for `team` and return it in clear (the only time it is visible)."""
    return issue_api_key(session, team, is_admin=is_admin)[1]


def issue_api_key(session: Session, team: Team, *, is_admin: bool = False) -> tuple[ApiKey, str]:
    """Issue a new key for `team`: its row, and the key in clear (the only time it is visible)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    record = ApiKey(id=new_id("key"), team_id=team.id, key_hash=hash_key(key), prefix=key[:10], is_admin=is_admin)
    session.add(record)
    session.flush()
    return record, key


class LastAdminKeyError(ValueError):
    """Revoking this key would leave its team without an admin key."""


def team_keys(session: Session, team: Team) -> list[ApiKey]:
    """The team's keys, oldest first."""
    return list(session.scalars(select(ApiKey).where(ApiKey.team_id == team.id)
                                .order_by(ApiKey.created_at, ApiKey.id)))


def revoke_api_key(session: Session, team: Team, key_id: str) -> bool:
    """Delete one of the team's keys (False: the team has no such key); it stops working at once.

    Raises LastAdminKeyError for the team's last admin key: nobody could then manage the team's keys.
    """
    key = session.scalar(select(ApiKey).where(ApiKey.id == key_id, ApiKey.team_id == team.id))
    if key is None:
        return False
    # Lock the team's admin keys, so that two revocations at once cannot remove the last two.
    admins = session.scalars(select(ApiKey.id).where(ApiKey.team_id == team.id, ApiKey.is_admin).with_for_update())
    if key.is_admin and not set(admins) - {key.id}:
        raise LastAdminKeyError(f"API key {key.prefix}… is the team's last admin key; create another admin key "
                                "before revoking it")
    session.delete(key)
    session.flush()
    return True


def team_for_key(session: Session, key: str) -> tuple[Team, ApiKey] | None:
    """The team and key record a clear-text key belongs to, if any."""
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if record is None:
        return None
    return session.get(Team, record.team_id), record
