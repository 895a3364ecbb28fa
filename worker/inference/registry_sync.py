"""Hot-swap notifications: keep resident adapters in step with the registry without a restart.

Requests always resolve `name:alias` to an immutable version in the API, so a moved alias
takes effect for the next request by itself. This loop makes the switch cheap and tidy. It
follows the registry's change feed (core/notify.py) from the newest change at startup: woken at
once by Redis pub/sub when the broker is Redis, otherwise every `registry_poll_seconds`. Both
paths read the feed, so they apply the same changes in commit order. Per kind:

- `alias_moved`: when the alias moved away from a resident version, the new version (if it is for
  this server's base) is loaded ahead of its first request.
- `deleted`: the version is unloaded; if requests still hold it, it is unpinned and evicted once idle.
- `published`: the bare name (`bot`, the newest version) now resolves to the new version, so when an
  older version of the same name is resident here, the new one is loaded ahead of its first request.
  Pins name immutable versions and are left as they are.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from sqlalchemy import select

from core.db import session_scope
from core.models import Adapter
from core.notify import CHANNEL, changes_since, latest_change_id, redis_url
from core.schemas.inference import AdapterRef
from core.settings import Settings

log = logging.getLogger("patchbay.registry_sync")


class AdapterHost(Protocol):
    """What the sync needs of a replica's engine layer (ours: `InferenceService`; vLLM's: `VllmService`)."""

    base_model_id: str

    def resident_ids(self) -> set[str]: ...
    def ref_for(self, adapter_id: str) -> AdapterRef | None: ...
    def ensure(self, ref: AdapterRef) -> object: ...
    def unload(self, adapter_id: str) -> bool: ...


class RegistrySync:
    """A background thread that applies registry changes to one replica's adapters."""

    def __init__(self, service: AdapterHost, settings: Settings) -> None:
        self.service, self.settings = service, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-sync", daemon=True)
        with session_scope() as session:
            self.last_change_id = latest_change_id(session)

    def start(self) -> None:
        """Start following the registry."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following."""
        self._stop.set()
        self._thread.join(timeout=5)

    def apply(self, change: dict) -> None:
        """Apply one change (a `core.notify.change_payload`): see the module docstring for each kind."""
        resident = self.service.resident_ids()
        kind = change.get("kind")
        if kind == "alias_moved" and change.get("previous_adapter_id") in resident and change.get("adapter_id"):
            self._preload(change["adapter_id"], f"alias {change.get('name')}:{change.get('alias')} moved")
        elif kind == "published" and _other_versions(change) & resident:
            self._preload(change["adapter_id"], f"{change.get('name')} has a new version")
        elif kind == "deleted" and change.get("adapter_id") in resident:
            log.info("adapter %s was deleted; unloading it", change["adapter_id"])
            self.service.unload(change["adapter_id"])

    def _preload(self, adapter_id: str, why: str) -> None:
        """Load a version ahead of its first request, when it is live and for this server's base."""
        ref = self.service.ref_for(adapter_id)
        if ref is not None and ref.base_model == self.service.base_model_id:
            log.info("%s; preloading %s", why, ref.id)
            self.service.ensure(ref)

    def catch_up(self) -> int:
        """Apply every feed change after the last one applied, oldest first; returns how many there were."""
        with session_scope() as session:
            changes = changes_since(session, self.last_change_id)
        for change in changes:
            self.last_change_id = change["id"]  # a change that fails to apply is logged, not retried forever
            try:
                self.apply(change)
            except Exception:
                log.warning("could not apply registry change %s", change, exc_info=True)
        return len(changes)

    def _run(self) -> None:
        url = redis_url()
        while not self._stop.is_set():
            try:
                self._follow_redis(url) if url else self._poll()
            except Exception:  # keep following through store hiccups
                log.warning("registry sync error", exc_info=True)
                self._stop.wait(self.settings.registry_poll_seconds)

    def _follow_redis(self, url: str) -> None:
        import redis

        pubsub = redis.Redis.from_url(url).pubsub()
        pubsub.subscribe(CHANNEL)
        try:
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                # The subscription's confirmation also wakes us: we catch up on what changed while we
                # were not subscribed, and from then on no announcement can slip by.
                if message and message.get("type") in ("subscribe", "message"):
                    self.catch_up()
        finally:
            pubsub.close()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.catch_up()
            self._stop.wait(self.settings.registry_poll_seconds)


def _other_versions(change: dict) -> set[str]:
    """The ids of the other versions of the changed adapter's name (same team)."""
    with session_scope() as session:
        return set(session.scalars(select(Adapter.id).where(
            Adapter.team_id == change.get("team_id"), Adapter.name == change.get("name"),
            Adapter.id != change.get("adapter_id"))))
