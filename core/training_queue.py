"""The training queue as operators see it: per team, how many jobs run, wait in line or are paused."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.job_lifecycle import PAUSED, QUEUED, RUNNING, VALIDATING_FILES
from core.models import Job, Team

COUNTED = {RUNNING: "running", QUEUED: "queued", VALIDATING_FILES: "queued", PAUSED: "paused"}


def queue_by_team(session: Session) -> list[dict]:
    """`[{team, running, queued, paused, oldest_queued_at}]` for every team with an unfinished job."""
    rows = session.execute(
        select(Team.name, Job.status, func.count(), func.min(Job.created_at))
        .join(Team, Team.id == Job.team_id)
        .where(Job.status.in_(tuple(COUNTED)))
        .group_by(Team.name, Job.status)
    )
    teams: dict[str, dict] = {}
    for team, status, count, oldest in rows:
        entry = teams.setdefault(team, {"team": team, "running": 0, "queued": 0, "paused": 0,
                                        "oldest_queued_at": None})
        entry[COUNTED[status]] += count
        if COUNTED[status] == "queued":
            known = entry["oldest_queued_at"]
            entry["oldest_queued_at"] = oldest if known is None else min(known, oldest)
    return sorted(teams.values(), key=lambda e: (-e["running"], -e["queued"], e["team"]))


def running_jobs(session: Session, limit: int = 200) -> list[dict]:
    """The running jobs with their team and the worker that holds each one's lease."""
    rows = session.execute(
        select(Job.id, Team.name, Job.model, Job.lease_owner, Job.started_at, Job.estimated_finish)
        .join(Team, Team.id == Job.team_id).where(Job.status == RUNNING).order_by(Job.started_at).limit(limit)
    )
    return [{"id": job_id, "team": team, "model": model, "worker": owner, "started_at": started,
             "estimated_finish": eta} for job_id, team, model, owner, started, eta in rows]
