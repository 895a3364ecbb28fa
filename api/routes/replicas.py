"""`GET /v1/replicas`: the live inference replicas, registered and static, as routing sees them (admin key)."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import AdminTeam, KeyRateLimited
from api.fleet import get_fleet
from api.openapi import error_responses
from core.schemas.replicas import ReplicaList

router = APIRouter(prefix="/v1", tags=["replicas"], dependencies=[KeyRateLimited])


@router.get("/replicas", response_model=ReplicaList, responses=error_responses(403))
async def list_replicas(admin: AdminTeam) -> ReplicaList:
    """Every live replica: what it serves, its state, what is resident, its load and its counters."""
    return ReplicaList(data=await get_fleet().replicas())
