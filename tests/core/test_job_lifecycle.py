"""Every (from, to) pair of job statuses: the legal ones move through their function, the others raise."""

from __future__ import annotations

import itertools

import pytest

from core import job_lifecycle as life
from core.db import session_scope
from core.ids import now
from core.job_lifecycle import (
    ACTIVE_STATUSES,
    CANCELLED,
    FAILED,
    PAUSED,
    QUEUED,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    TERMINAL_STATUSES,
    TRANSITIONS,
    UNFINISHED_STATUSES,
    VALIDATING_FILES,
    IllegalTransition,
)
from core.models import Job
from tests.support.job_rows import add_job, read_job
from tests.support.migrated import migrated_database

OWNER = "worker-1"
MOVES = {
    "queue": (QUEUED, lambda s, j, f: life.queue(s, j, from_statuses=f)),
    "resume": (QUEUED, lambda s, j, f: life.resume(s, j, deadline_seconds=600, from_statuses=f)),
    "start": (RUNNING, lambda s, j, f: life.start(s, j, "worker-2", lease_seconds=60, from_statuses=f)),
    "succeed": (SUCCEEDED, lambda s, j, f: life.succeed(s, j, OWNER, fine_tuned_model="ft:m", trained_tokens=7,
                                                         from_statuses=f)),
    "fail": (FAILED, lambda s, j, f: life.fail(s, j, code="boom", message="it broke", from_statuses=f)),
    "expire": (FAILED, lambda s, j, f: life.expire(s, j, deadline_seconds=60, from_statuses=f)),
    "cancel": (CANCELLED, lambda s, j, f: life.cancel(s, j, from_statuses=f)),
    "pause": (PAUSED, lambda s, j, f: life.pause(s, j, from_statuses=f)),
}
LEGAL = {
    (VALIDATING_FILES, QUEUED), (VALIDATING_FILES, FAILED), (VALIDATING_FILES, CANCELLED), (VALIDATING_FILES, PAUSED),
    (QUEUED, RUNNING), (QUEUED, FAILED), (QUEUED, CANCELLED), (QUEUED, PAUSED),
    (RUNNING, RUNNING), (RUNNING, QUEUED), (RUNNING, SUCCEEDED), (RUNNING, FAILED), (RUNNING, CANCELLED),
    (RUNNING, PAUSED),
    (PAUSED, QUEUED), (PAUSED, CANCELLED),
}
"""The moves a job may make, written out: running to running is a re-claim of an expired lease."""


@pytest.fixture(scope="module", autouse=True)
def database(tmp_path_factory):
    with migrated_database(tmp_path_factory.mktemp("lifecycle")):
        yield


def _job_in(status: str, **fields) -> str:
    """A job in `status` whose deadline has passed; a running one holds an expired lease of OWNER."""
    lease = {"lease_owner": OWNER, "lease_expires_at": now() - 1} if status == RUNNING else {}
    return add_job(status, **{"deadline_at": now() - 1, "dispatched_at": now() - 5, **lease, **fields})


def _try(move: str, from_status: str) -> tuple[str, bool | IllegalTransition]:
    job_id = _job_in(from_status)
    with session_scope() as session:
        try:
            return job_id, MOVES[move][1](session, job_id, (from_status,))
        except IllegalTransition as exc:
            return job_id, exc


def _check_side_fields(move: str, job: Job) -> None:
    if job.status in TERMINAL_STATUSES:
        assert job.finished_at is not None
    if move != "start":
        assert job.lease_owner is None and job.lease_expires_at is None
    if job.status == QUEUED:
        assert job.dispatched_at is None
    if move == "resume":
        assert job.deadline_at > now()
    if move == "start":
        assert job.lease_owner == "worker-2" and job.lease_expires_at > now()
        assert job.attempts == 1 and job.started_at is not None
    if move == "succeed":
        assert job.fine_tuned_model == "ft:m" and job.trained_tokens == 7 and job.error is None
    if move in ("fail", "expire"):
        assert job.error["code"] == ("boom" if move == "fail" else "deadline_exceeded")


@pytest.mark.parametrize(("from_status", "to_status"), list(itertools.product(STATUSES, STATUSES)))
def test_each_pair_moves_through_its_function_or_raises(from_status, to_status):
    legal = (from_status, to_status) in LEGAL
    assert life.can_move(from_status, to_status) is legal
    accepted = []
    for move, (target, _) in MOVES.items():
        if target != to_status:
            continue
        job_id, outcome = _try(move, from_status)
        job = read_job(job_id)
        if isinstance(outcome, IllegalTransition):
            assert (outcome.from_status, outcome.to_status) == (from_status, to_status)
            assert job.status == from_status  # nothing was written
            continue
        assert legal and outcome is True, (move, from_status, to_status)
        assert job.status == to_status
        _check_side_fields(move, job)
        accepted.append(move)
    assert bool(accepted) is legal, accepted  # every legal pair has a function, no illegal one does


def test_the_table_is_the_legal_moves_and_nothing_leaves_a_terminal_status():
    assert set(TRANSITIONS) == set(STATUSES)
    assert {(a, b) for a, targets in TRANSITIONS.items() for b in targets} == LEGAL
    assert all(not TRANSITIONS[status] for status in TERMINAL_STATUSES)
    assert all(TRANSITIONS[status] for status in UNFINISHED_STATUSES)
    assert life.sources(VALIDATING_FILES) == ()  # a job starts there, and never returns


def test_each_pair_has_one_function_except_failing_an_active_job_which_expire_also_does():
    takers = {pair: [m for m, (target, _) in MOVES.items() if target == pair[1]
                     and not isinstance(_try(m, pair[0])[1], IllegalTransition)] for pair in LEGAL}
    assert {pair: moves for pair, moves in takers.items() if len(moves) != 1} == {
        (status, FAILED): ["fail", "expire"] for status in ACTIVE_STATUSES}


def test_a_job_that_moved_on_is_left_alone():
    job_id = _job_in(SUCCEEDED)
    with session_scope() as session:
        assert life.cancel(session, job_id) is False  # every unfinished status, but the job has succeeded
        assert life.fail(session, job_id, code="x", message="y") is False
    assert read_job(job_id).status == SUCCEEDED and read_job(job_id).error is None
    job_id = _job_in(RUNNING)
    with session_scope() as session:
        assert life.pause(session, job_id, from_statuses=(QUEUED,)) is False  # the caller read it as queued
    assert read_job(job_id).status == RUNNING


def test_queueing_a_running_job_needs_its_lease_expired():
    job_id = _job_in(RUNNING, lease_expires_at=now() + 60)
    with session_scope() as session:
        assert life.queue(session, job_id, from_statuses=(RUNNING,)) is False
    assert read_job(job_id).lease_owner == OWNER


def test_expire_spares_a_job_whose_deadline_is_ahead():
    job_id = _job_in(QUEUED, deadline_at=now() + 60)
    with session_scope() as session:
        assert life.expire(session, job_id, deadline_seconds=60) is False
    assert read_job(job_id).status == QUEUED


def test_the_callers_object_sees_the_move_and_the_callers_rollback_undoes_it():
    job_id = _job_in(QUEUED)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert life.cancel(session, job_id, from_statuses=(job.status,))
        assert job.status == CANCELLED and job.finished_at is not None
        session.rollback()
    assert read_job(job_id).status == QUEUED


def test_a_new_job_validates_its_files_first_and_has_a_deadline():
    job = life.new_job(deadline_seconds=100, id="ftjob-new")
    assert job.status == VALIDATING_FILES and job.deadline_at == pytest.approx(job.created_at + 100)
