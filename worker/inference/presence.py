"""A replica's presence in the fleet: its row announced at start, renewed by heartbeat, retired at stop."""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections.abc import Callable

from core.db import session_scope
from core.replicas import announce_replica, forget_dead_replicas, retire_replica
from core.schemas.replicas import ReplicaStatus
from core.settings import Settings

log = logging.getLogger("patchbay.presence")


class ReplicaPresence:
    """Keeps one replica's row alive while it runs, with whatever `status()` says at each heartbeat.

    A replica that cannot reach the database keeps serving (it may be listed in PATCHBAY_INFERENCE_URL
    instead); the failure is logged once until a heartbeat succeeds again.
    """

    def __init__(self, status: Callable[[], ReplicaStatus], settings: Settings) -> None:
        self.status, self.settings = status, settings
        self.replica_id = f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._nudged = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-presence", daemon=True)
        self._failing = False

    def start(self) -> None:
        """Announce now, then keep renewing in the background."""
        self.announce()
        self._thread.start()

    def announce(self) -> None:
        """Write the current status at once (at start, and when the state changes)."""
        try:
            with session_scope() as session:
                announce_replica(session, self.replica_id, self.status())
                forget_dead_replicas(session, self.settings.replica_ttl_seconds)
        except Exception as exc:
            if not self._failing:
                log.warning("cannot announce this replica in the database (%s); it is reachable only as a "
                            "static replica (PATCHBAY_INFERENCE_URL)", exc.__class__.__name__)
            self._failing = True
        else:
            self._failing = False

    def nudge(self) -> None:
        """Announce soon from the background thread (what is resident changed), without waiting for it."""
        self._nudged.set()

    def stop(self) -> None:
        """Stop renewing and remove the row, so routing forgets this replica at once."""
        self._stop.set()
        self._nudged.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            with session_scope() as session:
                retire_replica(session, self.replica_id)
        except Exception:
            log.warning("could not retire replica %s; it expires after its TTL", self.replica_id)

    def _run(self) -> None:
        while True:
            self._nudged.wait(self.settings.replica_heartbeat_seconds)
            self._nudged.clear()
            if self._stop.is_set():
                return
            self.announce()


def advertised_url(settings: Settings, host: str, port: int) -> str:
    """The URL the API should use for this replica: the configured one, else the bound address."""
    if settings.inference_advertise_url:
        return settings.inference_advertise_url.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{port}"
