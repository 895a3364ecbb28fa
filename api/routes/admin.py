"""`/v1/admin`: what an admin key may change for every team (today: the teams' limits)."""

from __future__ import annotations

from sqlalchemy import select

from api.deps import AdminTeam, SessionDep, SettingsDep
from api.openapi import error_responses
from api.routing import team_router
from core.errors import not_found
from core.models import Team
from core.quotas import describe_limits, set_team_limits
from core.schemas.teams import TeamLimitsPublic, TeamLimitsUpdate
from core.settings import Settings

router = team_router("/v1/admin", "admin")
ADMIN_ERRORS = error_responses(403)


def team_limits_public(session, team: Team, settings: Settings) -> TeamLimitsPublic:
    """A team's limits as the admin API shows them."""
    return TeamLimitsPublic(**describe_limits(session, team, settings))


def _team_named(session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise not_found("team", name)
    return team


@router.get("/teams/{team_name}/limits", response_model=TeamLimitsPublic, responses=ADMIN_ERRORS)
def get_team_limits(team_name: str, session: SessionDep, admin: AdminTeam, settings: SettingsDep) -> TeamLimitsPublic:
    """A team's limits and its current use."""
    return team_limits_public(session, _team_named(session, team_name), settings)


@router.patch("/teams/{team_name}/limits", response_model=TeamLimitsPublic, responses=ADMIN_ERRORS)
def update_team_limits(team_name: str, body: TeamLimitsUpdate, session: SessionDep, admin: AdminTeam,
                       settings: SettingsDep) -> TeamLimitsPublic:
    """Override a team's limits; a limit set to null goes back to the default."""
    team = _team_named(session, team_name)
    set_team_limits(session, team, {name: getattr(body, name) for name in body.model_fields_set})
    return team_limits_public(session, team, settings)
