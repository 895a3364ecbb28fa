"""The pure replica choice (`api.replica_routing`) and this API's own account of the fleet (`api.replica_tracker`)."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict

import pytest

from api.replica_routing import LocalView, order_replicas, rendezvous_order, resident_on, shortlist
from api.replica_tracker import Attempt, ReplicaTracker
from core.schemas.replicas import ReplicaPublic
from core.serving_kinds import PATCHBAY_ENGINE_KINDS, VLLM_ENGINE_KINDS

ADAPTERS = ["adp-a1", "adp-a2", "adp-a3", "adp-a4"]


def replica(replica_id: str, base: str = "base", state: str = "ready", engine: str = "patchbay", cap: int = 2,
            resident: tuple[str, ...] = (), heartbeat_at: float = 100.0) -> ReplicaPublic:
    kinds = PATCHBAY_ENGINE_KINDS if engine == "patchbay" else VLLM_ENGINE_KINDS
    return ReplicaPublic(id=replica_id, url=f"http://{replica_id}", base_model=base, engine=engine, state=state,
                         kinds=list(kinds), max_resident_adapters=cap, max_batch=8, resident_adapters=list(resident),
                         source="registered", heartbeat_at=heartbeat_at)


class SimulatedReplica:
    """A replica's resident LRU, counting the adapter loads it would do."""

    def __init__(self, cap: int) -> None:
        self.cap, self.lru, self.loads = cap, OrderedDict(), []

    def serve(self, adapter_id: str) -> None:
        if adapter_id not in self.lru:
            self.loads.append(adapter_id)
        self.lru[adapter_id] = None
        self.lru.move_to_end(adapter_id)
        while len(self.lru) > self.cap:
            self.lru.popitem(last=False)


def _rotate(replicas: list[ReplicaPublic], policy: str, heartbeats: bool, rounds: int = 4) -> list[str]:
    """Send ADAPTERS in rotation, one at a time, to the first replica routing names; every load.

    With `heartbeats`, each replica's resident list is renewed after every request, as its heartbeat would."""
    tracker = ReplicaTracker()
    served = {r.id: SimulatedReplica(r.max_resident_adapters) for r in replicas}
    for turn, adapter_id in enumerate(ADAPTERS * rounds):
        first = order_replicas(replicas, adapter_id, tracker.view(), policy, turn)[0]
        attempt = Attempt(tracker, first, adapter_id)
        served[first.id].serve(adapter_id)
        attempt.answered(200)
        attempt.close()
        if heartbeats:
            replicas = [r.model_copy(update={"resident_adapters": list(served[r.id].lru), "heartbeat_at": time.time()})
                        for r in replicas]
    return [load for replica in served.values() for load in replica.loads]


@pytest.mark.parametrize("heartbeats", [False, True])
@pytest.mark.parametrize("ids", [(f"replica-{i}", f"replica-{i + 1}") for i in range(0, 40, 2)])
def test_two_replicas_of_two_slots_load_four_adapters_in_rotation_once_each(ids, heartbeats):
    loads = _rotate([replica(ids[0]), replica(ids[1])], "affinity", heartbeats)
    assert sorted(loads) == sorted(ADAPTERS)


def test_candidates_are_ready_replicas_of_the_base_that_serve_every_kind():
    replicas = [replica("mine"), replica("other-base", base="other"), replica("starting", state="loading"),
                replica("vllm", engine="vllm")]
    plain = shortlist(replicas, "base", ["lora"])
    assert [r.id for r in plain.ready] == ["mine", "vllm"] and [r.id for r in plain.starting] == ["starting"]
    assert [r.id for r in plain.of_base] == ["mine", "starting", "vllm"]
    dora = shortlist(replicas, "base", ["dora", "sparse"])
    assert [r.id for r in dora.ready] == ["mine"]
    assert shortlist(replicas, "missing", []).of_base == []


def test_a_resident_adapter_goes_where_it_is_whatever_the_hash_says():
    for adapter_id in ADAPTERS:
        hashed = rendezvous_order(adapter_id, [replica("r1"), replica("r2")])
        last = hashed[-1].id
        replicas = [replica("r1", resident=(adapter_id,) if last == "r1" else ()),
                    replica("r2", resident=(adapter_id,) if last == "r2" else ())]
        assert order_replicas(replicas, adapter_id, LocalView(), "affinity", 0)[0].id == last


def test_own_placements_count_as_resident_and_an_eviction_since_the_heartbeat_does_not():
    r1 = replica("r1", resident=("adp-old",), heartbeat_at=100.0)
    view = LocalView(placed={"r1": ["adp-new"]}, evicted={"r1": {"adp-old": 150.0}})
    assert resident_on(r1, view) == {"adp-new"}
    stale_eviction = LocalView(evicted={"r1": {"adp-old": 50.0}})
    assert resident_on(r1, stale_eviction) == {"adp-old"}


def test_a_full_replica_yields_to_one_with_a_free_slot():
    adapter_id = "adp-new"
    first, second = rendezvous_order(adapter_id, [replica("r1"), replica("r2")])
    full = replica(first.id, resident=("adp-x", "adp-y"))
    ordered = order_replicas([full, replica(second.id)], adapter_id, LocalView(), "affinity", 0)
    assert [r.id for r in ordered] == [second.id, first.id]


def test_a_replica_over_its_share_of_requests_in_flight_is_skipped():
    adapter_id = "adp-hot"
    r1, r2 = replica("r1", resident=(adapter_id,)), replica("r2", resident=(adapter_id,))
    hashed = [r.id for r in rendezvous_order(adapter_id, [r1, r2])]
    busy = LocalView(in_flight={hashed[0]: 5})  # share: ceil(1.25 * 6 / 2) = 4
    assert [r.id for r in order_replicas([r1, r2], adapter_id, busy, "affinity", 0)] == hashed[::-1]
    within = LocalView(in_flight={hashed[0]: 4, hashed[1]: 1})  # share: ceil(1.25 * 6 / 2) = 4
    assert [r.id for r in order_replicas([r1, r2], adapter_id, within, "affinity", 0)] == hashed


def test_base_requests_go_to_the_least_busy_replica_ties_rotated():
    replicas = [replica("r1"), replica("r2"), replica("r3")]
    busy = LocalView(in_flight={"r1": 2, "r2": 1})
    assert [r.id for r in order_replicas(replicas, None, busy, "affinity", 0)] == ["r3", "r2", "r1"]
    firsts = {order_replicas(replicas, None, LocalView(), "affinity", turn)[0].id for turn in range(3)}
    assert firsts == {"r1", "r2", "r3"}


def test_round_robin_rotates_and_suspects_come_last():
    replicas = [replica("r1"), replica("r2"), replica("r3")]
    orders = [[r.id for r in order_replicas(replicas, "adp-a1", LocalView(), "round_robin", t)] for t in range(3)]
    assert orders == [["r1", "r2", "r3"], ["r2", "r3", "r1"], ["r3", "r1", "r2"]]
    for policy, adapter_id in itertools.product(("affinity", "round_robin"), ("adp-a1", None)):
        ordered = order_replicas(replicas, adapter_id, LocalView(suspects={"r1", "r2"}), policy, 0)
        assert [r.id for r in ordered][0] == "r3"


def test_rendezvous_hashing_moves_only_the_adapters_of_a_replica_that_left():
    replicas = [replica(f"r{i}") for i in range(4)]
    adapters = [f"adp-{i}" for i in range(200)]
    before = {a: rendezvous_order(a, replicas)[0].id for a in adapters}
    after = {a: rendezvous_order(a, replicas[1:])[0].id for a in adapters}
    assert {a for a in adapters if before[a] != after[a]} == {a for a in adapters if before[a] == "r0"}
    assert 20 < sum(1 for a in adapters if before[a] == "r0") < 80


def test_the_tracker_mirrors_a_replicas_lru_and_a_failed_forward_places_nothing():
    tracker, r1 = ReplicaTracker(), replica("r1")
    for adapter_id in ("adp-a1", "adp-a2", "adp-a3"):
        attempt = Attempt(tracker, r1, adapter_id)
        assert tracker.view().in_flight == {"r1": 1}
        attempt.answered(200)
        attempt.close()
        attempt.close()  # idempotent
    view = tracker.view()
    assert list(view.placed["r1"]) == ["adp-a2", "adp-a3"] and "adp-a1" in view.evicted["r1"]
    assert view.in_flight == {}
    Attempt(tracker, r1, "adp-a4").failed()
    assert list(tracker.view().placed["r1"]) == ["adp-a2", "adp-a3"]
    assert tracker.view().suspects == {"r1"}
    refused = Attempt(tracker, r1, "adp-a2")
    refused.answered(404)  # already placed before: stays placed
    refused.close()
    assert "adp-a2" in tracker.view().placed["r1"] and tracker.view().suspects == set()
    tracker.retain([])
    assert tracker.view().placed == {}
