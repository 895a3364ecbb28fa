"""The adapter manager: states, the cap with LRU eviction, pinning, in-use holds, bad adapters."""

from __future__ import annotations

import threading

import pytest

from tests.worker.inference.conftest import MAX_LORA_RANK
from worker.formats.files import AdapterLoadError
from worker.inference.adapters import (
    SLOT_WAIT_SECONDS,
    AdapterCapacityError,
    AdapterInUseError,
    AdapterNotReadyError,
    AdapterPinLimitError,
)
from worker.inference.engine import GenerationRequest, InferenceEngine


@pytest.fixture(scope="module")
def capped_engine(tiny_model_dir):
    """An fp32 engine that holds at most two adapters."""
    with InferenceEngine(
        tiny_model_dir, quantization="none", max_loaded_adapters=2, max_lora_rank=MAX_LORA_RANK
    ) as engine:
        yield engine


@pytest.fixture(scope="module")
def expected(fp32_engine, lora_dirs, prompts):
    """Greedy outputs of every adapter from an engine with room for all of them."""
    fp32_engine.adapters.ensure("D", lambda: lora_dirs["D"])
    return {
        name: fp32_engine.generate(GenerationRequest(prompts[0], name, 12, temperature=0.0)).token_ids
        for name in ("A", "B", "C", "D")
    }


class CountingFetch:
    """A fetch callable that returns a folder and counts its calls."""

    def __init__(self, folder):
        self.folder = folder
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.folder


def reset(engine):
    for name in list(engine.adapters.states()):
        engine.adapters.unload(name)


def test_cap_holds_with_lru_eviction_and_reloads_stay_correct(capped_engine, lora_dirs, prompts, expected):
    reset(capped_engine)
    fetches = {name: CountingFetch(lora_dirs[name]) for name in lora_dirs}
    loads_before = capped_engine.adapters.load_counts()
    for _ in range(2):
        for name in ("A", "B", "C", "D"):
            status = capped_engine.adapters.ensure(name, fetches[name])
            assert status.state == "ready"
            assert len(capped_engine.adapters.loaded()) <= 2
            result = capped_engine.generate(GenerationRequest(prompts[0], name, 12, temperature=0.0))
            assert result.token_ids == expected[name]
    # Every adapter was evicted by the two that followed it, so each was fetched again.
    assert all(fetch.calls == 2 for fetch in fetches.values())
    loads = capped_engine.adapters.load_counts()
    assert {name: loads[name] - loads_before.get(name, 0) for name in fetches} == dict.fromkeys(fetches, 2)
    assert sorted(capped_engine.adapters.loaded()) == ["C", "D"]
    # Least recently used goes first: touching C makes D the victim.
    capped_engine.adapters.ensure("C", fetches["C"])
    capped_engine.adapters.ensure("A", fetches["A"])
    assert sorted(capped_engine.adapters.loaded()) == ["A", "C"]


def test_ensure_and_unload_are_idempotent(capped_engine, lora_dirs):
    reset(capped_engine)
    fetch = CountingFetch(lora_dirs["A"])
    first = capped_engine.adapters.ensure("A", fetch)
    second = capped_engine.adapters.ensure("A", fetch)
    assert fetch.calls == 1 and first.slot == second.slot
    assert capped_engine.adapters.states()["A"]["state"] == "ready"
    assert capped_engine.adapters.unload("A") is True
    assert capped_engine.adapters.unload("A") is False
    assert "A" not in capped_engine.adapters.states()
    with pytest.raises(AdapterNotReadyError):
        capped_engine.submit(GenerationRequest([1, 2, 3], "A", 4))


def test_concurrent_ensures_fetch_once(capped_engine, lora_dirs):
    reset(capped_engine)
    release = threading.Event()
    seen_states = []

    def slow_fetch():
        seen_states.append(capped_engine.adapters.states()["B"]["state"])
        release.wait(10)
        return lora_dirs["B"]

    threads = [threading.Thread(target=capped_engine.adapters.ensure, args=("B", slow_fetch)) for _ in range(3)]
    for thread in threads:
        thread.start()
    release.set()
    for thread in threads:
        thread.join(10)
    assert seen_states == ["downloading"]
    assert capped_engine.adapters.states()["B"]["state"] == "ready"


def test_pinned_and_in_use_adapters_are_never_evicted(capped_engine, lora_dirs, prompts, expected):
    reset(capped_engine)
    adapters = capped_engine.adapters
    adapters.ensure("A", lambda: lora_dirs["A"], pinned=True)
    for name in ("B", "C", "D"):
        adapters.ensure(name, lambda name=name: lora_dirs[name])
        assert "A" in adapters.loaded()
    # D holds the other slot; an in-flight request keeps it there.
    handle = capped_engine.submit(GenerationRequest(prompts[0], "D", 2000, temperature=0.0))
    assert adapters.status("D").in_use == 1
    adapters.slot_wait_seconds = 0.2
    try:
        with pytest.raises(AdapterCapacityError, match="busy or pinned"):
            adapters.ensure("B", lambda: lora_dirs["B"])
    finally:
        adapters.slot_wait_seconds = SLOT_WAIT_SECONDS
    state = adapters.states()["B"]
    assert state["state"] == "errored" and "busy or pinned" in state["error"]
    with pytest.raises(AdapterInUseError):
        adapters.unload("D")
    assert sorted(adapters.loaded()) == ["A", "D"]
    handle.cancel()
    list(handle)
    assert adapters.status("D").in_use == 0
    adapters.ensure("B", lambda: lora_dirs["B"])  # a retry after an error; D is now the LRU victim
    assert sorted(adapters.loaded()) == ["A", "B"]
    assert capped_engine.generate(GenerationRequest(prompts[0], "A", 12, temperature=0.0)).token_ids == expected["A"]
    adapters.set_pinned("A", False)


def test_a_load_waits_for_a_request_to_free_a_slot(capped_engine, lora_dirs, prompts):
    reset(capped_engine)
    adapters = capped_engine.adapters
    for name in ("A", "B"):
        adapters.ensure(name, lambda name=name: lora_dirs[name])
    holds = [capped_engine.submit(GenerationRequest(prompts[0], name, 2000, temperature=0.0)) for name in ("A", "B")]
    loaded = []
    waiter = threading.Thread(target=lambda: loaded.append(adapters.ensure("C", lambda: lora_dirs["C"]).state))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and adapters.states()["C"]["state"] == "loading"  # waiting, not failed
    holds[0].cancel()
    list(holds[0])
    waiter.join(30)
    assert loaded == ["ready"] and sorted(adapters.loaded()) == ["B", "C"]
    holds[1].cancel()
    list(holds[1])


def test_pinned_adapters_take_at_most_half_of_the_slots(capped_engine, lora_dirs):
    reset(capped_engine)
    adapters = capped_engine.adapters
    adapters.ensure("A", lambda: lora_dirs["A"], pinned=True)
    adapters.ensure("A", lambda: lora_dirs["A"], pinned=True)  # idempotent: A is already pinned
    with pytest.raises(AdapterPinLimitError, match="at most 1 of the 2 slots"):
        adapters.ensure("B", lambda: lora_dirs["B"], pinned=True)
    adapters.ensure("B", lambda: lora_dirs["B"])  # unpinned, it loads
    with pytest.raises(AdapterPinLimitError):
        adapters.set_pinned("B", True)
    for name in ("C", "D"):  # every other team's adapter can still take the free slot
        adapters.ensure(name, lambda name=name: lora_dirs[name])
        assert sorted(adapters.loaded()) == ["A", name]
    adapters.set_pinned("A", False)
    adapters.set_pinned("D", True)  # the pin's room is free again
    adapters.set_pinned("D", False)


@pytest.mark.parametrize(
    "kind", ["wrong-shapes", "unknown-module", "rank-over-max", "bin-only", "dora", "unknown-type"]
)
def test_bad_adapters_end_errored_with_a_clear_message(capped_engine, bad_lora_dirs, kind):
    folder, message = bad_lora_dirs[kind]
    with pytest.raises(AdapterLoadError, match=message):
        capped_engine.adapters.ensure(kind, lambda: folder)
    state = capped_engine.adapters.states()[kind]
    assert state["state"] == "errored" and message in state["error"]
    assert state["slot"] is None
    assert kind not in capped_engine.adapters.loaded()


def test_a_failing_fetch_ends_errored(capped_engine):
    def broken():
        raise OSError("storage unreachable")

    with pytest.raises(AdapterLoadError, match="storage unreachable"):
        capped_engine.adapters.ensure("broken", broken)
    assert capped_engine.adapters.states()["broken"]["state"] == "errored"
