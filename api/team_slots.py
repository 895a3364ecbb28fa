"""Per-team caps on long-lived requests (uploads, live event streams) within one API process."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from api.metrics import count_limited
from core.errors import ApiError


class TeamSlots:
    """At most `limit` concurrent holders per team (0: unlimited); the next one gets 429 naming the limit and use."""

    def __init__(self, what: str, setting: str) -> None:
        self.what, self.setting = what, setting
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def held(self) -> int:
        """How many slots all teams hold now."""
        return sum(self._held.values())

    def check(self, team_id: str, team_name: str, limit: int) -> None:
        """429 when the team holds all its slots."""
        current = self._held[team_id]
        if limit and current >= limit:
            count_limited(team_name, self.setting)
            raise ApiError(429, f"Team '{team_name}' already has {current} {self.what} in progress (limit {limit}, "
                                f"PATCHBAY_{self.setting.upper()}); retry when one finishes.",
                           code=f"{self.setting}_exceeded", headers={"Retry-After": "5"},
                           extra={"limit_name": self.setting, "limit": limit, "current": current})

    @contextmanager
    def hold(self, team_id: str, team_name: str, limit: int, *, checked: bool = False) -> Iterator[None]:
        """Hold one slot for the duration of the block; `checked` when `check` already ran (a stream's body)."""
        with self._lock:
            if not checked:
                self.check(team_id, team_name, limit)
            self._held[team_id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[team_id] -= 1
                if not self._held[team_id]:
                    del self._held[team_id]


UPLOADS = TeamSlots("uploads", "team_max_concurrent_uploads")
EVENT_STREAMS = TeamSlots("live event streams", "team_max_event_streams")
