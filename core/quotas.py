"""Per-team limits: defaults from settings, overrides per team, and the checks that enforce them.

0 means unlimited. Over the queued-jobs limit a job is refused (429); over the storage limit an upload
is refused (413); over the running-jobs limit a job waits in `queued` (the dispatcher enforces it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.errors import ApiError
from core.job_lifecycle import QUEUED, RUNNING, VALIDATING_FILES
from core.models import Adapter, File, Job, Team
from core.settings import Settings

LIMIT_NAMES = ("max_running_jobs", "max_queued_jobs", "storage_bytes", "requests_per_minute", "tokens_per_minute")
WAITING_STATUSES = (VALIDATING_FILES, QUEUED)


@dataclass(frozen=True)
class TeamLimits:
    """The limits in force for one team (0: unlimited)."""

    max_running_jobs: int
    max_queued_jobs: int
    storage_bytes: int
    requests_per_minute: int
    tokens_per_minute: int

    def as_dict(self) -> dict[str, int]:
        """JSON-ready form."""
        return asdict(self)


def default_limits(settings: Settings) -> TeamLimits:
    """The limits of a team without overrides."""
    return TeamLimits(**{name: getattr(settings, f"team_{name}") for name in LIMIT_NAMES})


def limits_for(team: Team, settings: Settings) -> TeamLimits:
    """The team's overrides over the settings' defaults."""
    defaults = default_limits(settings)
    return TeamLimits(**{name: getattr(team, name) if getattr(team, name) is not None else getattr(defaults, name)
                         for name in LIMIT_NAMES})


def storage_used(session: Session, team_id: str) -> int:
    """Bytes the team stores: its files and its live adapters."""
    files = session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.team_id == team_id))
    adapters = session.scalar(select(func.coalesce(func.sum(Adapter.bytes), 0))
                              .where(Adapter.team_id == team_id, Adapter.status == "ready"))
    return int(files) + int(adapters)


def waiting_jobs(session: Session, team_id: str) -> int:
    """The team's jobs that wait to train."""
    return session.scalar(select(func.count()).select_from(Job)
                          .where(Job.team_id == team_id, Job.status.in_(WAITING_STATUSES))) or 0


def quota_error(status: int, team: Team, name: str, limit: int, current: int, what: str) -> ApiError:
    """The error for a team at one of its limits; it names the limit and the current use."""
    return ApiError(status, f"Team '{team.name}' has reached its {name} limit: {what} (limit {limit}, current "
                            f"{current}).", code=f"{name}_exceeded", extra={"limit_name": name, "limit": limit,
                                                                            "current": current},
                    headers={"Retry-After": "30"} if status == 429 else None)


def check_queued_jobs(session: Session, team: Team, settings: Settings) -> None:
    """429 when one more job would pass the team's queued-jobs limit."""
    limit = limits_for(team, settings).max_queued_jobs
    if limit and (current := waiting_jobs(session, team.id)) >= limit:
        raise quota_error(429, team, "max_queued_jobs", limit, current,
                          f"{current} job(s) already wait to train; wait for one to start or cancel one")


def storage_room(session: Session, team: Team, settings: Settings) -> tuple[int, int] | None:
    """The team's storage limit and the bytes it uses (None: unlimited); 413 when nothing is left."""
    limit = limits_for(team, settings).storage_bytes
    if not limit:
        return None
    used = storage_used(session, team.id)
    if used >= limit:
        raise storage_full(team, limit, used)
    return limit, used


def storage_full(team: Team, limit: int, current: int) -> ApiError:
    """413 for an upload that does not fit in the team's storage."""
    return quota_error(413, team, "storage_bytes", limit, current,
                       "the team's files and adapters would take more than it may store; delete some first")


def team_usage(session: Session, team_id: str) -> dict[str, int]:
    """What the team uses now, beside each limit it counts against."""
    running = session.scalar(select(func.count()).select_from(Job)
                             .where(Job.team_id == team_id, Job.status == RUNNING)) or 0
    return {"running_jobs": running, "queued_jobs": waiting_jobs(session, team_id),
            "storage_bytes": storage_used(session, team_id)}


def set_team_limits(session: Session, team: Team, changes: dict[str, int | None]) -> None:
    """Override some of the team's limits (None: back to the default); the caller commits."""
    for name, value in changes.items():
        if name not in LIMIT_NAMES:
            raise ValueError(f"unknown limit {name!r}; known: {', '.join(LIMIT_NAMES)}")
        if value is not None and value < 0:
            raise ValueError(f"{name} must be 0 (unlimited) or more")
        setattr(team, name, value)
    session.flush()


def describe_limits(session: Session, team: Team, settings: Settings) -> dict:
    """A team's limits in force, its overrides, the defaults and its current use."""
    return {"team": team.name, "limits": limits_for(team, settings).as_dict(),
            "overrides": {name: getattr(team, name) for name in LIMIT_NAMES},
            "defaults": default_limits(settings).as_dict(), "usage": team_usage(session, team.id)}
