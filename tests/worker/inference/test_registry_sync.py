"""worker/inference/registry_sync.py against a real database (and real Redis): every kind of change is applied."""

from __future__ import annotations

import time

import pytest

from core.db import session_scope
from core.models import Adapter
from core.registry import delete_version, move_alias
from core.settings import get_settings
from tests.support.registry_rows import add_version, fresh_registry
from worker.inference.registry_sync import RegistrySync
from worker.inference.service import InferenceService


class RecordingService:
    """An inference service without a model: which adapters are resident, and what it was asked to do.

    It looks adapters up in the registry exactly as the real service does.
    """

    base_model_id = "tiny-base"
    ref_for = InferenceService.ref_for

    def __init__(self, *resident: str) -> None:
        self.resident, self.loaded, self.unloaded = set(resident), [], []

    def resident_ids(self) -> set[str]:
        return set(self.resident)

    def ensure(self, ref) -> str:
        self.loaded.append(ref.id)
        self.resident.add(ref.id)
        return ref.id

    def unload(self, adapter_id: str) -> bool:
        self.unloaded.append(adapter_id)
        self.resident.discard(adapter_id)
        return True


@pytest.fixture
def teams(tmp_path):
    with fresh_registry(tmp_path / "data", PATCHBAY_REGISTRY_POLL_SECONDS="0.2") as teams:
        yield teams


def _move(team_id: str, name: str, alias: str, adapter_id: str) -> None:
    with session_scope() as session:
        move_alias(session, team_id, name, alias, session.get(Adapter, adapter_id))


def _delete(adapter_id: str) -> None:
    with session_scope() as session:
        delete_version(session, session.get(Adapter, adapter_id))


def _eventually(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the change was not applied in time"
        time.sleep(0.02)


def test_it_starts_after_the_newest_change(teams):
    add_version(teams.acme, "bot")
    sync = RegistrySync(RecordingService(), get_settings())
    assert sync.catch_up() == 0
    add_version(teams.acme, "bot")
    assert sync.catch_up() == 1 and sync.catch_up() == 0


def test_a_deleted_resident_version_is_unloaded(teams):
    resident, other = add_version(teams.acme, "bot"), add_version(teams.acme, "bot")
    service = RecordingService(resident.id)
    sync = RegistrySync(service, get_settings())
    _delete(other.id)
    _delete(resident.id)
    sync.catch_up()
    assert service.unloaded == [resident.id] and service.resident == set()


def test_a_moved_alias_preloads_its_new_version_when_the_old_one_is_resident(teams):
    v1, v2, v3 = (add_version(teams.acme, "bot") for _ in range(3))
    elsewhere = add_version(teams.acme, "bot", base_model="other-base")
    _move(teams.acme, "bot", "prod", v1.id)
    service = RecordingService(v1.id)
    sync = RegistrySync(service, get_settings())
    _move(teams.acme, "bot", "canary", v3.id)  # came from nothing resident: no preload
    _move(teams.acme, "bot", "prod", v2.id)
    sync.catch_up()
    assert service.loaded == [v2.id]
    _move(teams.acme, "bot", "prod", elsewhere.id)  # another base: not for this server
    sync.catch_up()
    assert service.loaded == [v2.id]


def test_a_published_version_is_preloaded_when_an_older_one_is_resident(teams):
    resident = add_version(teams.acme, "bot")
    service = RecordingService(resident.id)
    sync = RegistrySync(service, get_settings())
    newer = add_version(teams.acme, "bot")
    add_version(teams.acme, "other")  # no version of it is resident: nothing to do
    add_version(teams.globex, "bot")  # another team's name
    add_version(teams.acme, "bot", base_model="other-base")  # not for this server
    assert sync.catch_up() == 4
    assert (service.loaded, service.unloaded) == ([newer.id], [])


def test_a_change_that_fails_does_not_hold_up_the_next(teams):
    v1, v2 = add_version(teams.acme, "bot"), add_version(teams.acme, "bot")
    _move(teams.acme, "bot", "prod", v1.id)
    service = RecordingService(v1.id, v2.id)
    sync = RegistrySync(service, get_settings())

    def broken(ref):
        raise RuntimeError("storage is down")

    service.ensure = broken
    _move(teams.acme, "bot", "prod", v2.id)
    _delete(v1.id)
    assert sync.catch_up() == 2
    assert service.unloaded == [v1.id] and sync.catch_up() == 0


def test_the_thread_polls_without_redis(teams):
    resident = add_version(teams.acme, "bot")
    service = RecordingService(resident.id)
    sync = RegistrySync(service, get_settings())
    sync.start()
    try:
        _delete(resident.id)
        _eventually(lambda: service.unloaded == [resident.id], timeout=2 * 0.2 + 1)
    finally:
        sync.stop()


def test_the_thread_is_woken_by_redis(tmp_path, redis_url):
    # Polling every minute: only pub/sub can bring the change within seconds.
    with fresh_registry(tmp_path / "data", broker_url=redis_url, PATCHBAY_REGISTRY_POLL_SECONDS="60") as teams:
        resident = add_version(teams.acme, "bot")
        service = RecordingService(resident.id)
        sync = RegistrySync(service, get_settings())
        sync.start()
        try:
            time.sleep(0.5)  # subscribed (a change before that is caught up from the feed anyway)
            _delete(resident.id)
            _eventually(lambda: service.unloaded == [resident.id], timeout=5)
        finally:
            sync.stop()
