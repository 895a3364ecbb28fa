"""A daemon thread that runs one action every few seconds until stopped; an error is logged, the loop goes on."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("patchbay.periodic")


class Periodic:
    """Runs `action()` now and then every `interval` seconds in a daemon thread."""

    def __init__(self, name: str, interval: float, action: Callable[[], object]) -> None:
        self.name, self.interval, self.action = name, interval, action
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Periodic":
        """Start the loop."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop and wait for it."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.action()
            except Exception:  # keep the loop alive through store hiccups
                log.exception("%s failed", self.name)
            self._stop.wait(self.interval)
