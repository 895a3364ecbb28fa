"""Team limit shapes for the admin API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from core.schemas.bounds import INT64_MAX

_Count = Field(None, ge=0, le=2**31 - 1)


class TeamLimitsUpdate(BaseModel):
    """`PATCH /v1/admin/teams/{name}/limits`: the limits to override; null puts one back to the default.

    0 means unlimited. Fields left out keep their current value.
    """

    model_config = ConfigDict(extra="forbid")
    max_running_jobs: int | None = _Count
    max_queued_jobs: int | None = _Count
    storage_bytes: int | None = Field(None, ge=0, le=INT64_MAX)
    requests_per_minute: int | None = _Count
    tokens_per_minute: int | None = _Count


class TeamLimitsPublic(BaseModel):
    """A team's limits: in force, overridden, the defaults, and its current use."""

    object: Literal["team.limits"] = "team.limits"
    team: str
    limits: dict[str, int] = Field(description="in force (0: unlimited)")
    overrides: dict[str, int | None] = Field(description="the team's own values; null where the default applies")
    defaults: dict[str, int]
    usage: dict[str, int] = Field(description="running_jobs, queued_jobs and storage_bytes now")
