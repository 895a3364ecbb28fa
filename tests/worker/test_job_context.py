"""The recipe's view of its job over a real database and storage: heartbeat, stop signals, events, checkpoints."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from core import job_lifecycle
from core.db import session_scope
from core.ids import now
from core.job_lifecycle import QUEUED
from core.models import Checkpoint, Job, JobEvent
from core.settings import Settings
from core.storage import get_storage
from tests.support.job_rows import add_job, read_job
from tests.support.migrated import migrated_database
from worker import job_context
from worker.job_context import DbJobContext, LeaseHeartbeat

FAST = Settings(lease_seconds=30, heartbeat_seconds=0.05)


@pytest.fixture(autouse=True)
def database(tmp_path):
    with migrated_database(tmp_path / "data"):
        yield


@pytest.fixture
def running_job() -> str:
    """A job claimed by worker `w1`."""
    job_id = add_job(QUEUED)
    with session_scope() as session:
        assert job_lifecycle.start(session, job_id, "w1", lease_seconds=FAST.lease_seconds)
    return job_id


def _context(job_id: str, tmp_path, owner: str = "w1") -> DbJobContext:
    return DbJobContext(job_id, LeaseHeartbeat(job_id, owner, FAST), get_storage(), tmp_path)


def _until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_the_heartbeat_renews_the_lease_until_the_job_is_cancelled(running_job):
    with session_scope() as session:
        session.get(Job, running_job).lease_expires_at = now() + 1
    with LeaseHeartbeat(running_job, "w1", FAST) as heartbeat:
        assert _until(lambda: read_job(running_job).lease_expires_at > now() + FAST.lease_seconds - 5)
        assert not heartbeat.lost.is_set()
        with session_scope() as session:
            job_lifecycle.cancel(session, running_job)
        assert _until(heartbeat.lost.is_set)
        assert _until(lambda: not heartbeat._thread.is_alive())  # a lost lease ends the beats


def test_renewing_once_fails_for_a_worker_whose_job_was_taken_over(running_job):
    heartbeat = LeaseHeartbeat(running_job, "w0", FAST)
    assert heartbeat.renew_now() is False and heartbeat.lost.is_set()
    assert LeaseHeartbeat(running_job, "w1", FAST).renew_now() is True


def test_should_stop_notices_a_pause_and_a_lost_lease(running_job, tmp_path, monkeypatch):
    monkeypatch.setattr(job_context, "STATUS_CHECK_SECONDS", 0.0)  # look at the row on every call
    context = _context(running_job, tmp_path)
    assert context.should_stop() is False
    with session_scope() as session:
        job_lifecycle.pause(session, running_job)
    assert context.should_stop() is True
    assert _context(running_job, tmp_path, owner="w0").should_stop() is True  # never ours


def test_should_stop_looks_at_the_row_at_most_once_a_second(running_job, tmp_path):
    context = _context(running_job, tmp_path)
    assert context.should_stop() is False
    with session_scope() as session:
        job_lifecycle.cancel(session, running_job)
    assert context.should_stop() is False  # checked a moment ago
    assert _until(context.should_stop, timeout=3)


def test_events_and_metrics_are_logged_and_the_eta_moves_the_estimated_finish(running_job, tmp_path):
    context = _context(running_job, tmp_path)
    context.event("Loading the base model.", level="warn", data={"x": 1})
    context.metrics({"step": 3, "total_steps": 10, "train_loss": 1.23456, "eta_seconds": 120})
    context.metrics({"step": 4, "total_steps": 10})
    with session_scope() as session:
        events = [(e.type, e.level, e.message) for e in session.scalars(
            select(JobEvent).where(JobEvent.job_id == running_job).order_by(JobEvent.seq))]
    assert events == [("message", "warn", "Loading the base model."),
                      ("metrics", "info", "Step 3/10: training loss=1.2346"), ("metrics", "info", "Step 4/10")]
    assert read_job(running_job).estimated_finish == pytest.approx(now() + 120, abs=10)


def test_checkpoints_are_stored_once_per_step_and_the_newest_comes_back(running_job, tmp_path):
    context = _context(running_job, tmp_path / "scratch")
    assert context.latest_checkpoint() is None
    for step in (5, 10, 10):
        folder = tmp_path / f"ckpt-{step}"
        folder.mkdir(exist_ok=True)
        (folder / "state.txt").write_text(f"step {step}")
        context.save_checkpoint(step, folder, {"train_loss": 1.0 / step})
    with session_scope() as session:
        steps = sorted(session.scalars(select(Checkpoint.step).where(Checkpoint.job_id == running_job)))
    assert steps == [5, 10]
    step, local = context.latest_checkpoint()
    assert step == 10 and (local / "state.txt").read_text() == "step 10"
    assert local.is_relative_to(tmp_path / "scratch")
