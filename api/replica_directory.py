"""The live inference replicas: those registered in the database, and the static ones asked at `GET /status`.

Registered replicas renew their row by heartbeat; static ones (PATCHBAY_INFERENCE_URL, for replicas
that cannot reach the database) are asked what they serve, concurrently and with a short timeout, and
one that does not answer is left out. A registered row with a static entry's URL wins. The merged
view is cached for `CACHE_SECONDS` and refreshed by one task however many requests wait for it, so a
burst of requests reads the database once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api.upstream_client import upstream_client
from core.db import session_scope
from core.ids import now
from core.replicas import live_replicas
from core.schemas.replicas import ReplicaPublic, ReplicaStatus
from core.settings import Settings

log = logging.getLogger("patchbay.replicas")
CACHE_SECONDS = 0.75
"""How long one view of the fleet serves requests before it is read again."""
STATUS_TIMEOUT = httpx.Timeout(2.0, connect=1.0)
"""How long a static replica has to answer `GET /status`."""
STATIC_PREFIX = "static:"
"""A static replica's id is this plus its URL."""


def _registered(ttl_seconds: float) -> list[ReplicaPublic]:
    with session_scope() as session:
        return live_replicas(session, ttl_seconds)


class ReplicaDirectory:
    """The fleet as routing sees it: `await replicas()` is at most `CACHE_SECONDS` old (one event loop)."""

    def __init__(self, settings: Settings, cache_seconds: float = CACHE_SECONDS) -> None:
        self.settings = settings
        self.cache_seconds = cache_seconds
        self.generation = 0
        """Counts refreshes, so that a caller can tell a new view from the one it saw."""
        self._view: list[ReplicaPublic] = []
        self._fresh_until = 0.0
        self._refreshing: asyncio.Task | None = None
        self._registered: list[ReplicaPublic] = []
        self._failing_static: set[str] = set()

    async def replicas(self) -> list[ReplicaPublic]:
        """Every live replica, registered (oldest first) then static."""
        if time.monotonic() < self._fresh_until:
            return self._view
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        # Shielded: a request that goes away must not cancel the refresh the others wait for.
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> list[ReplicaPublic]:
        try:
            registered, static = await asyncio.gather(self._read_registered(), self._ask_static_replicas())
            known = {r.url.rstrip("/") for r in registered}
            self._view = registered + [r for r in static if r.url not in known]
            self._fresh_until = time.monotonic() + self.cache_seconds
            self.generation += 1
            return self._view
        finally:
            self._refreshing = None

    async def _read_registered(self) -> list[ReplicaPublic]:
        ttl = self.settings.replica_ttl_seconds
        try:
            self._registered = await run_in_threadpool(_registered, ttl)
        except Exception as exc:  # the database is down: route by the rows we have, until they expire
            log.warning("cannot read the replica registry (%s); routing by the last rows read", exc.__class__.__name__)
            self._registered = [r for r in self._registered if (r.heartbeat_at or 0) > now() - ttl]
        return self._registered

    async def _ask_static_replicas(self) -> list[ReplicaPublic]:
        answers = await asyncio.gather(*(self._ask_static(url) for url in self.settings.inference_urls))
        return [answer for answer in answers if answer is not None]

    async def _ask_static(self, url: str) -> ReplicaPublic | None:
        try:
            response = await upstream_client().get(f"{url}/status", timeout=STATUS_TIMEOUT)
            response.raise_for_status()
            status = ReplicaStatus.model_validate_json(response.content)
        except (httpx.HTTPError, ValidationError) as exc:
            if url not in self._failing_static:
                log.warning("static inference replica %s does not answer GET /status (%s); not routed to",
                            url, exc.__class__.__name__)
            self._failing_static.add(url)
            return None
        self._failing_static.discard(url)
        # Its own idea of its URL may not be how this API reaches it: the configured one is.
        return ReplicaPublic(**{**status.model_dump(), "url": url}, id=f"{STATIC_PREFIX}{url}", source="static",
                             heartbeat_at=now())
