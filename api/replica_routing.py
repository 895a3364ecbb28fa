"""Which replicas may serve a request, and in which order to try them: pure functions, no I/O.

The API keeps the adapters it sends to a replica resident there: a request goes first where its
adapter version already is, else where consistent hashing of the version id puts it (rendezvous
hashing over replica ids, so every API process agrees), preferring a replica with a free resident
slot and skipping one with more than its share of the requests in flight (bounded load).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from core.schemas.replicas import ReplicaPublic

LOAD_FACTOR = 1.25
"""A replica's share of the in-flight requests is this times the even share (bounded-load hashing)."""


@dataclass(frozen=True)
class LocalView:
    """What this API process knows beyond the heartbeats (all keyed by replica id)."""

    in_flight: Mapping[str, int] = field(default_factory=dict)
    """requests this API is forwarding to each replica now"""
    placed: Mapping[str, Collection[str]] = field(default_factory=dict)
    """adapter versions this API sent each replica lately, as many as it keeps resident"""
    evicted: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """adapter versions that fell out of `placed`, with the unix time they did (newer than a heartbeat: gone)"""
    suspects: Collection[str] = frozenset()
    """replicas that failed lately: tried last"""


@dataclass(frozen=True)
class Shortlist:
    """The replicas of one base model, as far as one request is concerned."""

    of_base: list[ReplicaPublic]
    """every live replica of the base, whatever its state or kinds"""
    ready: list[ReplicaPublic]
    """ready, and serving every kind the request's adapter needs"""
    starting: list[ReplicaPublic]
    """still loading, and serving every kind the adapter needs"""


def shortlist(replicas: Sequence[ReplicaPublic], base_model: str, kinds: Collection[str]) -> Shortlist:
    """Sort the live replicas for a request on `base_model` whose adapter needs `kinds` (none for the base)."""
    of_base = [r for r in replicas if r.base_model == base_model]
    serving = [r for r in of_base if set(kinds) <= set(r.kinds)]
    return Shortlist(of_base=of_base, ready=[r for r in serving if r.state == "ready"],
                     starting=[r for r in serving if r.state == "loading"])


def order_replicas(candidates: Sequence[ReplicaPublic], adapter_id: str | None, view: LocalView, policy: str,
                   turn: int) -> list[ReplicaPublic]:
    """The order to try `candidates` in; suspects always last.

    `policy` 'round_robin' rotates by `turn`; 'affinity' sends an adapter by residency and hashing, and a
    base-model request (`adapter_id` None) to the replica with the fewest requests in flight, ties rotated.
    """
    stable = sorted(candidates, key=lambda r: r.id)
    if policy == "round_robin":
        ordered = _rotated(stable, turn)
    elif adapter_id is None:
        ordered = sorted(_rotated(stable, turn), key=lambda r: view.in_flight.get(r.id, 0))
    else:
        ordered = _by_affinity(stable, adapter_id, view)
    return sorted(ordered, key=lambda r: r.id in view.suspects)


def rendezvous_order(adapter_id: str, replicas: Sequence[ReplicaPublic]) -> list[ReplicaPublic]:
    """Replicas by descending hash weight of (adapter, replica): the same order in every process."""
    def weight(replica: ReplicaPublic) -> int:
        digest = hashlib.blake2b(f"{adapter_id}\0{replica.id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    return sorted(replicas, key=weight, reverse=True)


def resident_on(replica: ReplicaPublic, view: LocalView) -> set[str]:
    """The adapter versions resident on `replica`: its heartbeat's, less those evicted since, plus our placements."""
    evicted = view.evicted.get(replica.id, {})
    heard_at = replica.heartbeat_at or 0.0
    heard = {a for a in replica.resident_adapters if evicted.get(a, -math.inf) < heard_at}
    return heard | set(view.placed.get(replica.id, ()))


def _by_affinity(replicas: list[ReplicaPublic], adapter_id: str, view: LocalView) -> list[ReplicaPublic]:
    in_flight = [view.in_flight.get(r.id, 0) for r in replicas]
    share = math.ceil(LOAD_FACTOR * (sum(in_flight) + 1) / len(replicas))

    def tier(replica: ReplicaPublic) -> int:
        if view.in_flight.get(replica.id, 0) > share:
            return 3
        resident = resident_on(replica, view)
        if adapter_id in resident:
            return 0
        return 1 if len(resident) < replica.max_resident_adapters else 2

    return sorted(rendezvous_order(adapter_id, replicas), key=tier)  # stable: hash order within a tier


def _rotated(items: list[ReplicaPublic], turn: int) -> list[ReplicaPublic]:
    start = turn % len(items) if items else 0
    return items[start:] + items[:start]
