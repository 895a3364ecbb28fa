"""`GET /v1/me`: the calling key's team and key (the console signs in with it)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentKey, KeyRateLimited
from core.schemas.keys import ApiKeyPublic, Identity, TeamRef

router = APIRouter(prefix="/v1", tags=["identity"], dependencies=[KeyRateLimited])


@router.get("/me", response_model=Identity)
async def who_am_i(found: CurrentKey) -> Identity:
    """The team and the key the request authenticated with."""
    team, key = found
    return Identity(team=TeamRef(id=team.id, name=team.name), key=ApiKeyPublic.of(key))
