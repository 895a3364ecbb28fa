"""`patchbay team`: create teams with API keys and set their limits."""

from __future__ import annotations

import typer

team_app = typer.Typer(help="Manage teams and their API keys.", no_args_is_help=True)


@team_app.command("create")
def team_create(name: str, admin: bool = typer.Option(False, help="the key may manage adapters at runtime")) -> None:
    """Create a team (or reuse it) and print a new API key on stdout."""
    from core.auth import create_api_key, create_team
    from core.db import session_scope

    with session_scope() as session:
        team = create_team(session, name)
        key = create_api_key(session, team, is_admin=admin)
    typer.echo(key)


def _limit_value(text: str | None) -> int | None:
    return None if text in (None, "default") else int(text)


@team_app.command("limits")
def team_limits(
    name: str,
    max_running_jobs: str = typer.Option(None, help="jobs training at once (0: unlimited, 'default')"),
    max_queued_jobs: str = typer.Option(None, help="jobs waiting to train (0: unlimited, 'default')"),
    storage_bytes: str = typer.Option(None, help="bytes of files and adapters (0: unlimited, 'default')"),
    requests_per_minute: str = typer.Option(None, help="inference requests per minute (0: unlimited, 'default')"),
    tokens_per_minute: str = typer.Option(None, help="generated tokens per minute (0: unlimited, 'default')"),
) -> None:
    """Show a team's limits, or override some ('default' puts one back to the settings' value)."""
    import json

    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Team
    from core.quotas import LIMIT_NAMES, describe_limits, set_team_limits
    from core.settings import get_settings

    given = dict(zip(LIMIT_NAMES, (max_running_jobs, max_queued_jobs, storage_bytes, requests_per_minute,
                                   tokens_per_minute)))
    try:
        changes = {limit: _limit_value(value) for limit, value in given.items() if value is not None}
        with session_scope() as session:
            team = session.scalar(select(Team).where(Team.name == name))
            if team is None:
                raise ValueError(f"no team named {name!r}")
            set_team_limits(session, team, changes)
            shown = describe_limits(session, team, get_settings())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(shown, indent=2))
