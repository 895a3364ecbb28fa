"""The API's routing to its inference fleet: which replicas may serve a request, waiting for one that starts.

One `Fleet` per API process (and event loop) holds the directory of live replicas and this process's
own tracker; `route` turns them into the replicas to try, in order, or the error a client should hear.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from api.replica_directory import ReplicaDirectory
from api.replica_routing import Shortlist, order_replicas, shortlist
from api.replica_tracker import ReplicaTracker
from core.errors import ApiError, invalid, unavailable
from core.schemas.inference import AdapterRef
from core.schemas.replicas import ReplicaPublic
from core.serving_kinds import engines_serving
from core.settings import Settings, get_settings

WAIT_POLL_SECONDS = 0.25
"""How often a request held for a starting replica looks at the directory again."""
RETRY_AFTER_SECONDS = 5


class Fleet:
    """The live replicas, this process's account of them, and the routing rules."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory = ReplicaDirectory(settings)
        self.tracker = ReplicaTracker()
        self.loop = asyncio.get_running_loop()
        self._turns = itertools.count()
        self._seen_generation = -1

    async def replicas(self) -> list[ReplicaPublic]:
        """Every live replica (cached for a moment); replicas that left are forgotten by the tracker."""
        replicas = await self.directory.replicas()
        if self.directory.generation != self._seen_generation:
            self._seen_generation = self.directory.generation
            self.tracker.retain(r.id for r in replicas)
        return replicas

    async def route(self, base_model: str, adapter: AdapterRef | None) -> list[ReplicaPublic]:
        """The replicas to try for a request, best first.

        Raises 503 `no_replica` when no replica of the base is live, 400 `adapter_kind_unserved` when its
        replicas serve none of the adapter's kinds, and 503 `replica_loading` when the replicas that would
        serve it are still loading after `replica_wait_seconds` (the request is held until then).
        """
        kinds = adapter.kinds if adapter else []
        deadline = time.monotonic() + self.settings.replica_wait_seconds
        while True:
            short = shortlist(await self.replicas(), base_model, kinds)
            if short.ready:
                return order_replicas(short.ready, adapter.id if adapter else None, self.tracker.view(),
                                      self.settings.routing_policy, next(self._turns))
            if not short.of_base:
                raise no_replica(base_model)
            if not short.starting:
                raise kind_unserved(base_model, kinds, short)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise still_loading(base_model, self.settings.replica_wait_seconds)
            await asyncio.sleep(min(WAIT_POLL_SECONDS, remaining))



_fleet: Fleet | None = None


def get_fleet() -> Fleet:
    """This process's fleet (a new one when the settings were reloaded or the event loop changed)."""
    global _fleet
    settings = get_settings()
    if _fleet is None or _fleet.settings is not settings or _fleet.loop is not asyncio.get_running_loop():
        _fleet = Fleet(settings)
    return _fleet


def no_replica(base_model: str) -> ApiError:
    """503: nothing serves the base model."""
    return unavailable(f"No inference replica serves the base model '{base_model}'. Start one with "
                       f"`patchbay inference --base-model {base_model}`.", "no_replica", RETRY_AFTER_SECONDS)


def still_loading(base_model: str, waited: float) -> ApiError:
    """503: the replicas of the base model did not finish loading in time."""
    return unavailable(f"The inference replicas of the base model '{base_model}' are still loading (waited "
                       f"{waited:g} s); retry shortly.", "replica_loading", RETRY_AFTER_SECONDS)


def kind_unserved(base_model: str, kinds: list[str], short: Shortlist) -> ApiError:
    """400: the base's replicas are up, but none serves the adapter's kinds."""
    missing = [k for k in kinds if not any(k in r.kinds for r in short.of_base)] or kinds
    engines = engines_serving(kinds)
    running = ", ".join(sorted({r.engine for r in short.of_base}))
    advice = (f"the {' or '.join(engines)} engine serves it: start one with `patchbay inference --engine "
              f"{engines[0]} --base-model {base_model}`") if engines else "no engine serves it"
    return invalid(f"No replica of the base model '{base_model}' serves adapter kind '{'+'.join(missing)}' "
                   f"(its replicas run: {running}); {advice}.", "model", "adapter_kind_unserved")
