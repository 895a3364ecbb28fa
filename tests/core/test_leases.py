"""A worker's lease on a running job: claim, renew, finish, and an expired lease taken over, on both databases."""

from __future__ import annotations

import pytest

from core import job_lifecycle
from core.db import session_scope
from core.ids import now
from core.job_lifecycle import CANCELLED, QUEUED, RUNNING, SUCCEEDED
from core.leases import holds_lease, renew_lease
from core.models import Job
from tests.support.job_rows import add_job, read_job
from tests.support.migrated import migrated_database

LEASE = 30.0


@pytest.fixture(scope="module", params=["sqlite", "postgres"], autouse=True)
def database(request, tmp_path_factory):
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    with migrated_database(tmp_path_factory.mktemp("leases"), url):
        yield


def _claim(job_id: str, owner: str) -> bool:
    with session_scope() as session:
        return job_lifecycle.start(session, job_id, owner, lease_seconds=LEASE)


def _renew(job_id: str, owner: str) -> bool:
    with session_scope() as session:
        return renew_lease(session, job_id, owner, LEASE)


def _holds(job_id: str, owner: str) -> bool:
    with session_scope() as session:
        return holds_lease(session, job_id, owner)


def _expire_lease(job_id: str) -> None:
    with session_scope() as session:
        session.get(Job, job_id).lease_expires_at = now() - 1


def test_a_claim_gives_one_worker_the_lease_and_counts_the_attempt():
    job_id = add_job(QUEUED)
    assert _claim(job_id, "w1") is True
    assert _claim(job_id, "w2") is False  # the lease is live: nobody else takes the job
    job = read_job(job_id)
    assert (job.status, job.lease_owner, job.attempts) == (RUNNING, "w1", 1)
    assert job.started_at is not None and job.lease_expires_at > now() + LEASE - 5
    assert _holds(job_id, "w1") and not _holds(job_id, "w2")


def test_only_the_owner_renews_and_a_cancel_ends_the_renewals():
    job_id = add_job(QUEUED)
    _claim(job_id, "w1")
    _expire_lease(job_id)
    assert _renew(job_id, "w2") is False
    assert _renew(job_id, "w1") is True and read_job(job_id).lease_expires_at > now()
    with session_scope() as session:
        job_lifecycle.cancel(session, job_id)
    assert _renew(job_id, "w1") is False and not _holds(job_id, "w1")


def test_a_worker_without_the_lease_cannot_finish_the_job():
    job_id = add_job(QUEUED)
    _claim(job_id, "w1")
    with session_scope() as session:
        assert job_lifecycle.succeed(session, job_id, "w2", fine_tuned_model="ft:x", trained_tokens=1) is False
        assert job_lifecycle.fail(session, job_id, code="training_error", message="no", owner="w2") is False
    assert read_job(job_id).status == RUNNING
    with session_scope() as session:
        assert job_lifecycle.succeed(session, job_id, "w1", fine_tuned_model="ft:x", trained_tokens=1) is True
    job = read_job(job_id)
    assert (job.status, job.lease_owner, job.lease_expires_at) == (SUCCEEDED, None, None)
    assert _renew(job_id, "w1") is False


def test_an_expired_lease_is_taken_over_and_the_old_owner_is_shut_out():
    job_id = add_job(QUEUED)
    _claim(job_id, "w1")
    first_start = read_job(job_id).started_at
    _expire_lease(job_id)
    assert _holds(job_id, "w1")  # expired, but nobody took it yet: the worker may still renew
    assert _claim(job_id, "w2") is True
    job = read_job(job_id)
    assert (job.lease_owner, job.attempts, job.started_at) == ("w2", 2, first_start)
    assert not _holds(job_id, "w1") and _renew(job_id, "w1") is False
    with session_scope() as session:
        assert job_lifecycle.fail(session, job_id, code="training_error", message="late", owner="w1") is False
    assert read_job(job_id).status == RUNNING and read_job(job_id).error is None


def test_a_cancelled_job_is_never_claimed():
    job_id = add_job(CANCELLED)
    assert _claim(job_id, "w1") is False and read_job(job_id).lease_owner is None
