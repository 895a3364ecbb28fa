"""A replica's request counters, for `/status`: requests received in all and by model, and in flight now."""

from __future__ import annotations

import collections
import threading


class RequestCounter:
    """Generation requests by model (an adapter version id, or the base model id); thread-safe.

    `count` notes a request; `begin`/`end` also keep `in_flight` (for an engine that cannot tell its load).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: collections.Counter[str] = collections.Counter()
        self.in_flight = 0

    def count(self, model: str) -> None:
        """Count one request for `model`."""
        with self._lock:
            self._by_model[model] += 1

    def begin(self, model: str) -> None:
        """Count one request for `model`, in flight until `end`."""
        with self._lock:
            self._by_model[model] += 1
            self.in_flight += 1

    def end(self) -> None:
        """A request counted by `begin` is over."""
        with self._lock:
            self.in_flight -= 1

    def snapshot(self) -> dict:
        """`requests` and `requests_by_model`, as `/status` shows them."""
        with self._lock:
            return {"requests": sum(self._by_model.values()), "requests_by_model": dict(self._by_model)}
