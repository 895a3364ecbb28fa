"""Hot-swap notifications: keep resident adapters in step with the registry without a restart.

Requests always resolve `name:alias` to an immutable version in the API, so a moved alias
takes effect for the next request by itself. This loop makes the switch cheap and tidy:
when an alias moves away from a resident version, the new version is loaded ahead of its
first request; deleted versions are unloaded. Redis pub/sub when the broker is Redis,
polling of the alias history otherwise.
"""

from __future__ import annotations

import json
import logging
import threading

from core.db import session_scope
from core.notify import CHANNEL, changes_since, redis_url
from core.settings import Settings

log = logging.getLogger("patchbay.registry_sync")


class RegistrySync:
    """A background thread that applies registry changes to one inference service."""

    def __init__(self, service, settings: Settings) -> None:
        self.service, self.settings = service, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="registry-sync", daemon=True)
        with session_scope() as session:
            events = changes_since(session, 0)
            self._last_event_id = events[-1].id if events else 0

    def start(self) -> None:
        """Start following the registry."""
        self._thread.start()

    def stop(self) -> None:
        """Stop following."""
        self._stop.set()
        self._thread.join(timeout=5)

    def apply(self, change: dict) -> None:
        """Apply one change: prefetch the new version of a moved alias, unload a deleted one."""
        resident = self.service.engine.adapters.states()
        kind = change.get("kind")
        if kind == "alias_moved" and change.get("previous_adapter_id") in resident and change.get("adapter_id"):
            ref = self.service.ref_for(change["adapter_id"])
            if ref is not None and ref.base_model == self.service.base_model_id:
                log.info("alias %s:%s moved; preloading %s", change.get("name"), change.get("alias"), ref.id)
                self.service.ensure(ref)
        elif kind == "deleted" and change.get("adapter_id") in resident:
            self.service.unload(change["adapter_id"])

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

        pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(CHANNEL)
        try:
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message and message.get("type") == "message":
                    self.apply(json.loads(message["data"]))
        finally:
            pubsub.close()

    def _poll(self) -> None:
        with session_scope() as session:
            changes = [{"kind": "alias_moved" if e.adapter_id else "alias_removed", "name": e.name, "alias": e.alias,
                        "adapter_id": e.adapter_id, "previous_adapter_id": e.previous_adapter_id, "id": e.id}
                       for e in changes_since(session, self._last_event_id)]
        for change in changes:
            self._last_event_id = change["id"]
            self.apply(change)
        self._stop.wait(self.settings.registry_poll_seconds)
