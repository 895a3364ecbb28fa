"""This API process's own account of the fleet: requests in flight, recent placements and suspect replicas.

Heartbeats are seconds old; what this process sent a moment ago is not. Each replica keeps its
adapters in an LRU of `max_resident_adapters`, so the placements here are an LRU of the same size,
touched on every forward: it evicts what the replica evicts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from api.replica_routing import LocalView
from core.ids import now
from core.schemas.replicas import ReplicaPublic

SUSPECT_SECONDS = 5.0
"""How long a replica that failed a forward is tried last."""


@dataclass(frozen=True)
class Placement:
    """What one `place` changed: whether the adapter was placed there already, and what it evicted."""

    replica_id: str
    adapter_id: str
    known: bool
    evicted: list[str]


class ReplicaTracker:
    """In-flight counts, adapter placements and suspects, keyed by replica id (used on one event loop)."""

    def __init__(self, suspect_seconds: float = SUSPECT_SECONDS) -> None:
        self.suspect_seconds = suspect_seconds
        self._in_flight: dict[str, int] = {}
        self._placed: dict[str, OrderedDict[str, None]] = {}
        self._evicted: dict[str, dict[str, float]] = {}
        self._suspect_until: dict[str, float] = {}

    def view(self) -> LocalView:
        """The current state, for `order_replicas` (live mappings: read it before the next await)."""
        clock = time.monotonic()
        suspects = {rid for rid, until in self._suspect_until.items() if until > clock}
        return LocalView(in_flight=self._in_flight, placed=self._placed, evicted=self._evicted, suspects=suspects)

    def started(self, replica_id: str) -> None:
        """A forward to the replica began."""
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1

    def finished(self, replica_id: str) -> None:
        """A forward to the replica ended (answered, failed or cancelled)."""
        left = self._in_flight.get(replica_id, 0) - 1
        if left > 0:
            self._in_flight[replica_id] = left
        else:
            self._in_flight.pop(replica_id, None)

    def place(self, replica: ReplicaPublic, adapter_id: str) -> Placement:
        """Note that `adapter_id` is (being) loaded on `replica`, evicting as its LRU does; the `Placement`
        lets a forward that fails take back what it changed."""
        lru = self._placed.setdefault(replica.id, OrderedDict())
        known = adapter_id in lru
        lru[adapter_id] = None
        lru.move_to_end(adapter_id)
        self._evicted.get(replica.id, {}).pop(adapter_id, None)
        evicted = []
        while len(lru) > max(1, replica.max_resident_adapters):
            gone, _ = lru.popitem(last=False)
            self._evicted.setdefault(replica.id, {})[gone] = now()
            evicted.append(gone)
        return Placement(replica.id, adapter_id, known, evicted)

    def take_back(self, placement: Placement) -> None:
        """Undo a `place` whose forward never reached the replica: the evicted come back as the oldest."""
        lru = self._placed.get(placement.replica_id)
        if lru is None:
            return
        if not placement.known:
            lru.pop(placement.adapter_id, None)
        for adapter_id in reversed(placement.evicted):
            self._evicted.get(placement.replica_id, {}).pop(adapter_id, None)
            lru[adapter_id] = None
            lru.move_to_end(adapter_id, last=False)

    def unplace(self, replica_id: str, adapter_id: str) -> None:
        """The adapter was unloaded from the replica: neither placed there nor resident per an older heartbeat."""
        self._placed.get(replica_id, OrderedDict()).pop(adapter_id, None)
        self._evicted.setdefault(replica_id, {})[adapter_id] = now()

    def suspect(self, replica_id: str) -> None:
        """The replica failed a forward: try it last for a while."""
        self._suspect_until[replica_id] = time.monotonic() + self.suspect_seconds

    def cleared(self, replica_id: str) -> None:
        """The replica answered: no longer suspect."""
        self._suspect_until.pop(replica_id, None)

    def retain(self, live_ids: Iterable[str]) -> None:
        """Forget placements and suspicion of replicas that left the fleet (in-flight counts drain by themselves)."""
        live = set(live_ids)
        for table in (self._placed, self._evicted, self._suspect_until):
            for replica_id in [rid for rid in table if rid not in live]:
                del table[replica_id]


class Attempt:
    """One forward to one replica: counted in flight until `close`, its adapter placed there meanwhile."""

    def __init__(self, tracker: ReplicaTracker, replica: ReplicaPublic, adapter_id: str | None) -> None:
        self.tracker, self.replica = tracker, replica
        tracker.started(replica.id)
        # Placed before the answer, so that concurrent requests already count the slot it takes.
        self._placement = tracker.place(replica, adapter_id) if adapter_id else None
        self._open = True

    def answered(self, status: int) -> None:
        """The replica answered with `status` (anything but 200 leaves its adapters as they were)."""
        self.tracker.cleared(self.replica.id)
        if status != 200:
            self._take_back()

    def failed(self) -> None:
        """The replica could not be reached, or broke off its answer: suspect, and nothing placed."""
        self.tracker.suspect(self.replica.id)
        self._take_back()
        self.close()

    def close(self) -> None:
        """The forward is over (idempotent)."""
        if self._open:
            self._open = False
            self.tracker.finished(self.replica.id)

    def _take_back(self) -> None:
        if self._placement is not None:
            self.tracker.take_back(self._placement)
            self._placement = None
