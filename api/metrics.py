"""The API's Prometheus metrics: requests by route template and status, latency, 429s by team and limit, and
the jobs in the database (by status, waiting per team, the oldest one's wait), served at `GET /metrics`.

Labels stay bounded: a request is labelled by the template of the route it matched (`/v1/files/{file_id}`,
never the raw path; one the edge refused before routing, by the schema's template its path fits), `unmatched`
when none did; the method is one of the HTTP methods or `other`; teams and limit names come from our rows
and code. The jobs are read at scrape time in one short session; when
the database is down those series are left out and `patchbay_jobs_store_up` says 0 (never a 500).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.db import session_scope
from core.errors import ApiError
from core.ids import now
from core.models import Job, Team
from core.training_queue import queue_by_team

log = logging.getLogger("patchbay.metrics")
REGISTRY = CollectorRegistry()
"""Everything the API's `/metrics` shows (its own registry: other sources in the same process stay out)."""
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_TEAMS = 1000
"""Teams the jobs collector reports on at most (the query stays bounded)."""

REQUESTS = Counter("patchbay_api_requests", "HTTP requests answered, by method, route template and status.",
                   ["method", "route", "status"], registry=REGISTRY)
LATENCY = Histogram("patchbay_api_request_duration_seconds",
                    "Time from a request's arrival to the end of its response (a stream counts when it ends).",
                    ["method", "route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
LIMITED = Counter("patchbay_api_limited_requests", "Requests refused with 429, by team and limit name (team is "
                  "empty for failed authentications).", ["team", "limit"], registry=REGISTRY)
ProcessCollector(namespace="patchbay_api", registry=REGISTRY)


def count_limited(team: str, limit: str) -> None:
    """Count one 429 of `team` at `limit` (a setting's name, e.g. `requests_per_minute`)."""
    LIMITED.labels(team, limit).inc()


@contextmanager
def counting_limits(team: str, limit: str) -> Iterator[None]:
    """Count a 429 raised inside the block against `team` and `limit`, then let it go on."""
    try:
        yield
    except ApiError as exc:
        if exc.status == 429:
            count_limited(team, limit)
        raise


class RequestMetrics:
    """ASGI middleware around the whole API (the edge included): counts and times every HTTP request.

    `templates` gives the API's path templates (the OpenAPI schema's paths); it is read once, off the event
    loop, the first time a request has no matched route (the edge answered before routing, or nothing matched).
    """

    def __init__(self, app: ASGIApp, templates: Callable[[], Iterable[str]]) -> None:
        self.app, self._templates = app, templates
        self._patterns: list[tuple[re.Pattern, str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = getattr(scope.get("route"), "path", None) or await self._template_of(scope["path"])
            REQUESTS.labels(method, route, str(status)).inc()
            LATENCY.labels(method, route).observe(time.perf_counter() - started)

    async def _template_of(self, path: str) -> str:
        """The template a path fits (for requests answered before routing), else `unmatched`."""
        if self._patterns is None:
            self._patterns = await run_in_threadpool(self._compile)
        return next((template for pattern, template in self._patterns if pattern.match(path)), UNMATCHED)

    def _compile(self) -> list[tuple[re.Pattern, str]]:
        try:
            return [(compile_path(template)[0], template) for template in self._templates()]
        except Exception:  # no schema: every such request counts as unmatched
            log.warning("metrics: the API's path templates could not be read", exc_info=True)
            return []


class JobsCollector(Collector):
    """Jobs by status, waiting jobs per team and the oldest one's wait, read from the database at scrape time."""

    def describe(self) -> list[GaugeMetricFamily]:
        """The families, without samples (what the registry and the dashboard test know it by)."""
        return [_up(), *_job_families()]

    def collect(self):
        up = _up()
        try:
            by_status, waiting = _read_jobs()
        except Exception as exc:
            log.warning("metrics: jobs not readable: %s: %s", type(exc).__name__, exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs, depth, oldest = _job_families()
        for status, count in sorted(by_status.items()):
            jobs.add_metric([status], count)
        for team, (count, age) in sorted(waiting.items()):
            depth.add_metric([team], count)
            oldest.add_metric([team], age)
        yield from (jobs, depth, oldest)


def _up() -> GaugeMetricFamily:
    return GaugeMetricFamily("patchbay_jobs_store_up", "1 when the jobs could be read from the database for this "
                             "scrape, 0 when it was unreachable (the job series are then left out).")


def _job_families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    return (GaugeMetricFamily("patchbay_jobs", "Jobs in the database, by status.", labels=["status"]),
            GaugeMetricFamily("patchbay_jobs_waiting", "Jobs waiting to train (validating_files or queued), per "
                              "team: the team's queue depth.", labels=["team"]),
            GaugeMetricFamily("patchbay_jobs_oldest_waiting_seconds", "Seconds since the team's oldest waiting "
                              "job was created (0: none waits).", labels=["team"]))


def _read_jobs() -> tuple[dict[str, int], dict[str, tuple[int, float]]]:
    """Counts by status, and per team (up to MAX_TEAMS) its waiting jobs and the oldest one's age."""
    with session_scope() as session:
        by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        teams = session.scalars(select(Team.name).order_by(Team.name).limit(MAX_TEAMS)).all()
        queue = queue_by_team(session)
    t = now()
    waiting = {name: (0, 0.0) for name in teams}
    for entry in queue:
        if entry["team"] in waiting and entry["queued"]:
            waiting[entry["team"]] = (entry["queued"], max(0.0, t - entry["oldest_queued_at"]))
    return by_status, waiting


REGISTRY.register(JobsCollector())
router = APIRouter(include_in_schema=False)


@router.get("/metrics")
def metrics() -> Response:
    """Every API metric in Prometheus' text format (no key needed; `PATCHBAY_METRICS_ENABLED=false` removes it)."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
