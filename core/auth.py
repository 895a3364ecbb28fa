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
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(
        ApiKey(id=new_id("key"), team_id=team.id, key_hash=hash_key(key), prefix=key[:10], is_admin=is_admin)
    )
    session.flush()
    return key


def team_for_key(session: Session, key: str) -> tuple[Team, ApiKey] | None:
    """The team and key record a clear-text key belongs to, if any."""
    record = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if record is None:
        return None
    return session.get(Team, record.team_id), record
