"""The worker announces how many jobs it runs at once, by heartbeat, from its main process.

The dispatcher hands out only the capacity of live workers, so that queued jobs wait in the database,
where fair share across teams can order them, instead of in the broker's first-in-first-out queue.
"""

from __future__ import annotations

import logging
import os
import socket

from sqlalchemy.orm import Session

from core.db import make_engine
from core.periodic import Periodic
from core.settings import get_settings
from core.workers import heartbeat_worker, retire_worker

log = logging.getLogger("patchbay.worker")


class CapacityAnnouncer:
    """Keeps this worker's row in `workers` alive while the worker runs."""

    def __init__(self, concurrency: int) -> None:
        settings = get_settings()
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.concurrency = concurrency
        # Unpooled: prefork children are forked from this process and must not inherit a connection.
        self._engine = make_engine(settings.resolved_database_url, pooled=False)
        self._loop = Periodic("patchbay-capacity", settings.heartbeat_seconds, self._beat)

    def _beat(self) -> None:
        with Session(self._engine) as session:
            heartbeat_worker(session, self.worker_id, self.concurrency)
            session.commit()

    def start(self) -> None:
        """Announce now, then keep renewing."""
        self._loop.start()
        log.info("worker %s offers %d job slot(s)", self.worker_id, self.concurrency)

    def stop(self) -> None:
        """Stop renewing and withdraw the row."""
        self._loop.stop()
        try:
            with Session(self._engine) as session:
                retire_worker(session, self.worker_id)
                session.commit()
        except Exception:  # the row then expires on its own
            log.warning("could not withdraw worker %s", self.worker_id, exc_info=True)
        self._engine.dispose()
