"""The outbox dispatcher and the reconciler, on SQLite and kombu's SQLAlchemy broker (no worker)."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from api.dispatch import MAX_ATTEMPTS, dispatch_pending, reconcile
from core.db import session_scope
from core.ids import now
from core.models import File, Job, OutboxMessage, Team, WorkerRecord
from core.settings import get_settings
from core.storage import get_storage
from core.workers import heartbeat_worker
from tests.support.datasets import chat_lines, to_jsonl


@pytest.fixture
def job_id(api) -> str:
    file_id = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", to_jsonl(chat_lines(8)))}).json()["id"]
    return api.client.post("/v1/fine_tuning/jobs", headers=api.headers(),
                           json={"model": "tiny-llama", "training_file": file_id}).json()["id"]


def offer_worker_slots(slots: int, worker_id: str = "test-worker") -> None:
    """Register a worker's capacity, as `patchbay worker` does by heartbeat."""
    with session_scope() as session:
        heartbeat_worker(session, worker_id, slots)


def _job(job_id: str) -> Job:
    with session_scope() as session:
        return session.get(Job, job_id)


def _outbox(job_id: str) -> list[OutboxMessage]:
    with session_scope() as session:
        return list(session.scalars(select(OutboxMessage).where(OutboxMessage.job_id == job_id)))


def test_dispatch_queues_the_job_and_marks_the_message_sent(job_id):
    offer_worker_slots(1)
    assert dispatch_pending() == 1
    job = _job(job_id)
    assert job.status == "queued" and job.dispatched_at is not None
    assert [m.sent_at is not None for m in _outbox(job_id)] == [True]
    assert dispatch_pending() == 0


def test_a_file_gone_from_storage_fails_the_job_instead_of_dispatching(job_id):
    with session_scope() as session:
        get_storage().delete(session.get(File, session.get(Job, job_id).training_file).storage_key)
    assert dispatch_pending() == 0
    job = _job(job_id)
    assert job.status == "failed" and job.error["code"] == "invalid_training_file"


def test_without_a_live_worker_the_job_waits_queued_in_the_database(job_id):
    assert dispatch_pending() == 0
    assert _job(job_id).status == "queued" and _job(job_id).dispatched_at is None
    assert [m.sent_at for m in _outbox(job_id)] == [None]
    with session_scope() as session:
        heartbeat_worker(session, "stale", 1)
        session.get(WorkerRecord, "stale").heartbeat_at = now() - get_settings().lease_seconds - 1
    assert dispatch_pending() == 0  # a worker whose heartbeat stopped offers nothing
    offer_worker_slots(1)
    assert dispatch_pending() == 1


def test_reconciler_redispatches_a_queued_job_nobody_took(job_id):
    offer_worker_slots(1)
    dispatch_pending()
    with session_scope() as session:
        session.get(Job, job_id).dispatched_at = now() - get_settings().redispatch_after_seconds - 1
    assert reconcile(get_settings())["redispatched"] == 1
    assert len(_outbox(job_id)) == 2
    assert reconcile(get_settings())["redispatched"] == 0  # the new message is pending, not lost


def test_reconciler_requeues_an_expired_lease_and_fails_after_max_attempts(job_id):
    offer_worker_slots(1)
    dispatch_pending()
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.lease_owner, job.lease_expires_at, job.attempts = "running", "gone", now() - 1, 1
    assert reconcile(get_settings())["redispatched"] == 1
    assert _job(job_id).status == "queued" and _job(job_id).lease_owner is None
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.lease_owner, job.lease_expires_at, job.attempts = "running", "gone", now() - 1, MAX_ATTEMPTS
    assert reconcile(get_settings())["failed"] == 1
    assert _job(job_id).error["code"] == "worker_lost"


def test_reconciler_fails_jobs_past_their_deadline(job_id):
    with session_scope() as session:
        session.get(Job, job_id).deadline_at = now() - 1
    assert reconcile(get_settings())["failed"] == 1
    job = _job(job_id)
    assert job.status == "failed" and job.error["code"] == "deadline_exceeded" and job.finished_at


def _create_jobs(api, key: str, count: int) -> list[str]:
    file_id = api.client.post("/v1/files", headers=api.headers(key), data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", to_jsonl(chat_lines(8)))}).json()["id"]
    return [api.client.post("/v1/fine_tuning/jobs", headers=api.headers(key),
                            json={"model": "tiny-llama", "training_file": file_id}).json()["id"] for _ in range(count)]


def _sent(job_ids: list[str]) -> list[str]:
    return [j for j in job_ids if _job(j).dispatched_at is not None]


def _finish(job_id: str) -> None:
    """What a worker does: take the job, then end it."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.started_at = "running", now()
    with session_scope() as session:
        job = session.get(Job, job_id)
        job.status, job.finished_at = "succeeded", now()


def test_fair_share_a_team_that_queued_later_gets_the_next_free_slot(api):
    offer_worker_slots(1)
    team_a = _create_jobs(api, api.key, 3)
    team_b = _create_jobs(api, api.other_key, 1)
    assert dispatch_pending() == 1 and _sent(team_a) == team_a[:1]
    assert dispatch_pending() == 0  # the only slot is taken
    _finish(team_a[0])
    assert dispatch_pending() == 1 and _sent(team_b) == team_b  # B before A's second job
    _finish(team_b[0])
    assert dispatch_pending() == 1 and _sent(team_a) == team_a[:2]


def test_a_team_at_its_running_limit_waits_while_others_use_the_free_slots(api, monkeypatch):
    monkeypatch.setenv("PATCHBAY_TEAM_MAX_RUNNING_JOBS", "1")
    get_settings.cache_clear()
    offer_worker_slots(3)
    team_a = _create_jobs(api, api.key, 3)
    team_b = _create_jobs(api, api.other_key, 2)
    assert dispatch_pending() == 2
    assert len(_sent(team_a)) == 1 and len(_sent(team_b)) == 1
    assert dispatch_pending() == 0  # a slot is free, but both teams are at their limit
    with session_scope() as session:  # an admin lifts B's limit
        session.scalar(select(Team).where(Team.name == "globex")).max_running_jobs = 0
    assert dispatch_pending() == 1 and len(_sent(team_b)) == 2 and len(_sent(team_a)) == 1


def test_a_job_with_two_waiting_messages_is_sent_once(job_id):
    with session_scope() as session:
        session.add(OutboxMessage(job_id=job_id, task="patchbay.train", reason="resumed"))
    offer_worker_slots(2)
    assert dispatch_pending() == 1
    assert all(m.sent_at is not None for m in _outbox(job_id))


def test_admission_never_overwrites_a_cancel_that_came_first(api, job_id):
    from core import job_lifecycle

    with session_scope() as dispatcher:
        job = dispatcher.get(Job, job_id)  # the dispatcher has read the job as validating_files...
        assert job.status == "validating_files"
        cancelled = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers())
        assert cancelled.json()["status"] == "cancelled"  # ...when the user cancels it
        assert job_lifecycle.queue(dispatcher, job.id, from_statuses=(job.status,)) is False
    assert _job(job_id).status == "cancelled"
    offer_worker_slots(1)
    assert dispatch_pending() == 0 and _job(job_id).status == "cancelled"
