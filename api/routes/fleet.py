"""`GET /v1/workers` and `GET /v1/queue`: the training workers and the queue across teams (admin key)."""

from __future__ import annotations

from api.deps import AdminTeam, SessionDep, SettingsDep
from api.openapi import error_responses
from api.routing import team_router
from core.schemas.fleet import QueuePublic, RunningJob, TeamQueue, WorkerList, WorkerPublic
from core.training_queue import queue_by_team, running_jobs
from core.workers import live_workers

router = team_router("/v1", "fleet")


@router.get("/workers", response_model=WorkerList, responses=error_responses(403))
def list_workers(session: SessionDep, admin: AdminTeam, settings: SettingsDep) -> WorkerList:
    """The training workers heard from within a lease period, and how many jobs they can run at once."""
    workers = [WorkerPublic(id=w.id, concurrency=w.concurrency, started_at=w.started_at, heartbeat_at=w.heartbeat_at)
               for w in live_workers(session, settings.lease_seconds)]
    return WorkerList(data=workers, capacity=sum(w.concurrency for w in workers))


@router.get("/queue", response_model=QueuePublic, responses=error_responses(403))
def training_queue(session: SessionDep, admin: AdminTeam) -> QueuePublic:
    """Per team: jobs running, queued and paused; and each running job's worker."""
    return QueuePublic(teams=[TeamQueue(**entry) for entry in queue_by_team(session)],
                       running=[RunningJob(**job) for job in running_jobs(session)])
