"""Routes whose database session ends inside the endpoint's own thread.

FastAPI runs a sync endpoint in the threadpool, then serializes its answer in the threadpool too, and
only then exits its dependencies. A session closed at that exit would hold its connection (on SQLite,
its write lock) while waiting for a free thread; under load, every thread can be waiting for that
lock or connection, and nothing moves until a timeout. So the endpoint's session commits (or rolls
back) and closes as the endpoint returns, in the same thread.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from api.deps import KeyRateLimited


def _ending_sessions(endpoint: Callable) -> Callable:
    @functools.wraps(endpoint)
    def run(*args, **kwargs):
        sessions = [value for value in kwargs.values() if isinstance(value, Session)]
        try:
            result = endpoint(*args, **kwargs)
            for session in sessions:
                session.commit()
            return result
        except BaseException:
            for session in sessions:
                session.rollback()
            raise
        finally:
            for session in sessions:
                session.close()

    return run


class SessionRoute(APIRoute):
    """An APIRoute whose sync endpoint commits and closes its sessions before its answer is serialized."""

    def __init__(self, path: str, endpoint: Callable, **kwargs) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _ending_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)


def team_router(prefix: str, tag: str) -> APIRouter:
    """A router of team routes: sessions end inside the endpoint, and each key's requests are rate limited."""
    return APIRouter(prefix=prefix, tags=[tag], dependencies=[KeyRateLimited], route_class=SessionRoute)
