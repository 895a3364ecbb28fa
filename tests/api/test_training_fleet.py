"""`GET /v1/workers` and `GET /v1/queue`: what an admin key sees of the training side (the console's Fleet)."""

from __future__ import annotations

from core.db import session_scope
from core.models import Job
from core.workers import heartbeat_worker
from tests.api.test_api_keys import admin_key
from tests.api.test_jobs import create
from tests.support.datasets import chat_lines, to_jsonl


def test_only_admin_keys_see_the_training_fleet(api):
    for path in ("/v1/workers", "/v1/queue"):
        response = api.client.get(path, headers=api.headers())
        assert response.status_code == 403 and response.json()["error"]["code"] == "admin_required"


def test_workers_and_the_queue_per_team(api):
    with session_scope() as session:
        heartbeat_worker(session, "host-a:1", 2)
    training = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                               files={"file": ("t.jsonl", to_jsonl(chat_lines(8)))}).json()["id"]
    jobs = [create(api, model="tiny-llama", training_file=training).json()["id"] for _ in range(3)]
    with session_scope() as session:
        running = session.get(Job, jobs[0])
        running.status, running.lease_owner, running.started_at = "running", "host-a:7", 1.0
    admin = api.headers(admin_key("globex"))
    workers = api.client.get("/v1/workers", headers=admin).json()
    assert [w["id"] for w in workers["data"]] == ["host-a:1"] and workers["capacity"] == 2
    queue = api.client.get("/v1/queue", headers=admin).json()
    assert queue["teams"] == [{"team": "acme", "running": 1, "queued": 2, "paused": 0,
                               "oldest_queued_at": queue["teams"][0]["oldest_queued_at"]}]
    assert [(j["id"], j["team"], j["worker"]) for j in queue["running"]] == [(jobs[0], "acme", "host-a:7")]
