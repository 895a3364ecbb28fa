"""FastAPI dependencies: the database session, the calling team, and the limits every request passes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.metrics import count_limited
from api.ratelimit import LIMIT_NAMES, RateLimits, too_many
from core.auth import team_for_key
from core.db import session_scope
from core.errors import ApiError
from core.models import ApiKey, Team
from core.settings import Settings, get_settings


def get_session() -> Iterator[Session]:
    """A session per request, committed on success (sync routes only: they run in the threadpool)."""
    with session_scope() as session:
        yield session


# "function" scope: the transaction commits before the response leaves, so a client that acts on
# an id it was just given always finds the row.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


async def rate_limits(request: Request) -> RateLimits:
    """The API process's rate limiter."""
    return request.app.state.rate_limits


RateLimitsDep = Annotated[RateLimits, Depends(rate_limits)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() and len(token) <= 512 else None


def _lookup_key(token: str) -> tuple[Team, ApiKey] | None:
    # A short session of its own: the connection goes back to the pool before a body streams.
    with session_scope() as session:
        return team_for_key(session, token)


async def get_current_key(request: Request, limits: RateLimitsDep, settings: SettingsDep) -> tuple[Team, ApiKey]:
    """The team and key behind the request's bearer key; 401 if none.

    After too many failures from one address, further failures get 429 instead; a valid key from that
    address still passes (one client's wrong key never locks out the teams behind the same proxy).
    """
    token = _bearer(request)
    found = await run_in_threadpool(_lookup_key, token) if token else None
    if found is not None:
        return found
    address = request.client.host if request.client else "unknown"
    wait = await limits.exhausted("failed-auth", address, settings.failed_auth_per_minute)
    if wait is not None:
        count_limited("", LIMIT_NAMES["failed-auth"])
        raise too_many(f"failed authentications from {address}", "requests", settings.failed_auth_per_minute, wait)
    await limits.count_only("failed-auth", address, settings.failed_auth_per_minute)
    if token is None:
        raise ApiError(401, "Missing API key. Send 'Authorization: Bearer <key>'.", code="missing_api_key")
    raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")


CurrentKey = Annotated[tuple[Team, ApiKey], Depends(get_current_key)]


async def get_current_team(found: CurrentKey) -> Team:
    """The calling team."""
    return found[0]


CurrentTeam = Annotated[Team, Depends(get_current_team)]


async def limit_key_requests(found: CurrentKey, limits: RateLimitsDep, settings: SettingsDep) -> None:
    """The per-key request limit of every route but inference (which has per-team limits of its own)."""
    await limits.hit("key", found[1].id, settings.key_requests_per_minute, f"API key {found[1].prefix}…",
                     team=found[0].name)


KeyRateLimited = Depends(limit_key_requests)


async def get_admin_team(found: CurrentKey) -> Team:
    """The calling team, when its key is an admin key; 403 otherwise."""
    team, key = found
    if not key.is_admin:
        raise ApiError(403, "This endpoint needs an admin key.", code="admin_required")
    return team


AdminTeam = Annotated[Team, Depends(get_admin_team)]
