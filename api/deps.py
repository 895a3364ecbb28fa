"""FastAPI dependencies: the database session and the calling team."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from core.auth import team_for_key
from core.db import session_scope
from core.errors import ApiError
from core.models import ApiKey, Team
from core.settings import Settings, get_settings


def get_session() -> Iterator[Session]:
    """A session per request, committed on success."""
    with session_scope() as session:
        yield session


# "function" scope: the transaction commits before the response leaves, so a client that acts on
# an id it was just given always finds the row.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key. Send 'Authorization: Bearer <key>'.", code="missing_api_key")
    return token.strip()


def get_current_key(request: Request, session: SessionDep) -> tuple[Team, ApiKey]:
    """The team and key behind the request's bearer key; 401 if none."""
    found = team_for_key(session, _bearer(request))
    if found is None:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    return found


def get_current_team(found: Annotated[tuple[Team, ApiKey], Depends(get_current_key)]) -> Team:
    """The calling team."""
    return found[0]


CurrentTeam = Annotated[Team, Depends(get_current_team)]


def get_admin_team(found: Annotated[tuple[Team, ApiKey], Depends(get_current_key)]) -> Team:
    """The calling team, when its key is an admin key; 403 otherwise."""
    team, key = found
    if not key.is_admin:
        raise ApiError(403, "This endpoint needs an admin key.", code="admin_required")
    return team


AdminTeam = Annotated[Team, Depends(get_admin_team)]
