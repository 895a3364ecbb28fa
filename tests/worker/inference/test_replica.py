"""A replica's life: announced as `loading` and answering 503 while its base loads, `ready` (row first, then
/readyz), its /status counters, the row renewed when what is resident changes, and retired at shutdown."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from core.base_models import register_base_model
from core.db import session_scope
from core.replicas import live_replicas
from core.schemas.inference import AdapterRef
from core.schemas.replicas import ReplicaStatus
from core.serving_kinds import PATCHBAY_ENGINE_KINDS
from core.settings import get_settings
from tests.support.migrated import migrated_database

URL = "http://replica.test:8001"
CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


def _rows() -> list:
    with session_scope() as session:
        return live_replicas(session, get_settings().replica_ttl_seconds)


def _within(seconds: float, condition) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.02)


@pytest.fixture
def database(tmp_path, tiny_model_dir):
    """A migrated SQLite database with the tiny model registered; the replica advertises URL, and its
    heartbeat is slow, so only announcements at state changes reach the row within a test."""
    with migrated_database(tmp_path / "data", PATCHBAY_INFERENCE_BASE_MODEL="tiny-llama",
                           PATCHBAY_INFERENCE_ADVERTISE_URL=URL, PATCHBAY_REPLICA_HEARTBEAT_SECONDS="60"):
        with session_scope() as session:
            register_base_model(session, "tiny-llama", tiny_model_dir)
        yield


@pytest.fixture
def gate(monkeypatch):
    """Holds the base model's load until set."""
    from worker.inference.service import InferenceService

    opened = threading.Event()

    def gated(settings):
        assert opened.wait(60)
        return InferenceService(settings)

    monkeypatch.setattr("worker.inference.replica.InferenceService", gated)
    return opened


def test_a_loading_replica_serves_http_says_so_and_becomes_ready(database, gate, lora_dirs):
    from worker.inference.server import create_inference_app

    with TestClient(create_inference_app()) as client:
        assert client.get("/healthz").status_code == 200
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.headers["retry-after"] and loading.json()["status"] == "loading"
        status = ReplicaStatus.model_validate(client.get("/status").json())
        assert (status.state, status.base_model, status.engine) == ("loading", "tiny-llama", "patchbay")
        assert status.url == URL
        assert status.kinds == list(PATCHBAY_ENGINE_KINDS) and status.max_resident_adapters == 8
        assert status.max_batch >= 1 and status.resident_adapters == [] and status.load == 0
        refused = client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503 and refused.headers["retry-after"]
        assert refused.json()["error"]["code"] == "model_loading" and "tiny-llama" in refused.json()["error"]["message"]
        assert [(r.url, r.state) for r in _rows()] == [(URL, "loading")]

        gate.set()
        _within(60, lambda: client.get("/readyz").status_code == 200)
        assert [(r.url, r.state) for r in _rows()] == [(URL, "ready")]  # the row said so before /readyz did

        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        other_base = AdapterRef(id="adp-other", storage_key="adapters/adp-other", sha256="0" * 64,
                                base_model="another-base")
        wrong = client.post("/v1/chat/completions", json=CHAT,
                            headers={"X-Patchbay-Adapter": other_base.model_dump_json()})
        assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "adapter_unavailable"

        replica = client.app.state.replica
        for _ in range(2):
            replica.service.engine.adapters.ensure("adp-a", lambda: lora_dirs["A"])
        _within(5, lambda: _rows()[0].resident_adapters == ["adp-a"])  # nudged at once, not at the heartbeat
        stats = client.get("/status").json()["stats"]
        assert stats["requests"] == 3
        assert stats["requests_by_model"] == {"tiny-llama": 2, "adp-other": 1}
        assert (stats["adapter_loads"], stats["loads_by_adapter"]) == (1, {"adp-a": 1})
        assert stats["decode_steps"] > 0  # the engine's batching counters come along
        internal = client.get("/internal/status").json()
        assert internal["base_model"] == "tiny-llama" and set(internal["adapters"]) == {"adp-a"}
    assert _rows() == []  # retired at shutdown


def test_a_base_that_cannot_load_answers_503_with_the_reason_and_leaves_the_fleet(database, monkeypatch):
    from worker.inference.server import create_inference_app

    monkeypatch.setenv("PATCHBAY_INFERENCE_BASE_MODEL", "no-such-base")
    get_settings.cache_clear()
    with TestClient(create_inference_app()) as client:
        _within(10, lambda: client.get("/readyz").json()["status"] == "failed")
        assert "not registered" in client.get("/readyz").json()["error"]
        refused = client.post("/v1/chat/completions", json={**CHAT, "model": "no-such-base"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_load_failed"
        assert _rows() == []
