"""Fair share and the running-jobs limit, with real workers training real (tiny) jobs."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from core.models import Job
from tests.support.flows import FAST_QLORA, upload_with_curl, write_dataset
from tests.support.services import make_stack, wait_for_status

pytestmark = pytest.mark.slow
TINY_JOB = {**FAST_QLORA, "max_steps": 2}


def _queue(stack, key: str, file_id: str, count: int) -> list[str]:
    with stack.client(key) as client:
        return [client.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file_id,
                                                          "hyperparameters": {"n_epochs": 1, "batch_size": 4},
                                                          "peft": TINY_JOB}).json()["id"] for _ in range(count)]


def _upload(stack, tmp_path, key: str, seed: int) -> str:
    stack.key, previous = key, stack.key
    try:
        return upload_with_curl(stack, write_dataset(tmp_path, n=8, seed=seed))["id"]
    finally:
        stack.key = previous


def _timeline(database_url: str, job_ids: list[str]) -> dict[str, tuple[float, float]]:
    engine = create_engine(database_url)
    with Session(engine) as session:
        rows = session.execute(select(Job.id, Job.started_at, Job.finished_at).where(Job.id.in_(job_ids))).all()
    engine.dispose()
    return {job_id: (started, finished) for job_id, started, finished in rows}


def _all_succeed(stack, key: str, job_ids: list[str]) -> None:
    with stack.client(key) as client:
        for job_id in job_ids:
            final = wait_for_status(client, job_id, ("succeeded", "failed", "cancelled"), stack=stack)
            assert final["status"] == "succeeded", (final, stack.logs())


def _train(stack, tmp_path, database_url: str, jobs_of_a: int, jobs_of_b: int):
    """Team A queues its jobs, then team B; a worker starts; every job trains. Returns A's and B's job ids and
    each job's (started_at, finished_at)."""
    stack.start_api()
    team_a, team_b = stack.key, stack.cli("team", "create", "globex").splitlines()[-1]
    try:
        jobs_a = _queue(stack, team_a, _upload(stack, tmp_path, team_a, 0), jobs_of_a)
        jobs_b = _queue(stack, team_b, _upload(stack, tmp_path, team_b, 1), jobs_of_b)
        stack.start_worker()
        _all_succeed(stack, team_a, jobs_a)
        _all_succeed(stack, team_b, jobs_b)
        return jobs_a, jobs_b, _timeline(database_url, jobs_a + jobs_b)
    finally:
        stack.stop()


def test_a_team_that_queues_later_starts_second_with_one_worker(tmp_path, tiny_model_dir, postgres_url, redis_url):
    stack = make_stack(tmp_path, postgres_url, redis_url, tiny_model_dir)
    jobs_a, jobs_b, timeline = _train(stack, tmp_path, postgres_url, 3, 1)
    started = sorted(timeline, key=lambda job_id: timeline[job_id][0])
    assert started == [jobs_a[0], jobs_b[0], jobs_a[1], jobs_a[2]], (started, jobs_a, jobs_b)


def test_a_team_at_its_running_limit_never_runs_two_jobs_at_once(tmp_path, tiny_model_dir, postgres_url,
                                                                 redis_url):
    stack = make_stack(tmp_path, postgres_url, redis_url, tiny_model_dir, PATCHBAY_TEAM_MAX_RUNNING_JOBS="1",
                       PATCHBAY_WORKER_CONCURRENCY="2")
    jobs_a, jobs_b, timeline = _train(stack, tmp_path, postgres_url, 2, 1)
    (a1_start, a1_end), (a2_start, _) = sorted(timeline[j] for j in jobs_a)
    assert a2_start >= a1_end, timeline  # A's second job waited for its first
    b_start, b_end = timeline[jobs_b[0]]
    assert b_start < a1_end and a1_start < b_end, timeline  # B used the worker's other slot meanwhile
