"""Nothing lost, nothing run twice: worker crash, lost queue message, cancel."""

from __future__ import annotations

import time

import pytest
import redis
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from core.workers import heartbeat_worker
from tests.support.datasets import preference_lines, to_jsonl
from tests.support.flows import FAST_QLORA, upload_with_curl, write_dataset
from tests.support.services import all_events, make_stack, wait_for_status

pytestmark = pytest.mark.slow
LONG_JOB = {**FAST_QLORA, "checkpoint_every_steps": 10, "max_steps": 400}


@pytest.fixture
def stack(tmp_path, postgres_url, redis_url, tiny_model_dir):
    stack = make_stack(tmp_path, postgres_url, redis_url, tiny_model_dir)
    stack.start_api()
    yield stack
    stack.stop()


def _create(stack, tmp_path, peft: dict, epochs: int = 50) -> str:
    file_id = upload_with_curl(stack, write_dataset(tmp_path, n=32))["id"]
    with stack.client() as client:
        response = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file_id, "seed": 3,
            "hyperparameters": {"n_epochs": epochs, "batch_size": 4}, "peft": peft})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _wait_for_checkpoint(client, job_id: str, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
        if data:
            return data[0]["step_number"]
        time.sleep(0.2)
    raise AssertionError("no checkpoint was written")


@pytest.fixture
def s3_stack(tmp_path, fresh_postgres_url, redis_url, tiny_model_dir, s3_env):
    """The stack with its storage in a real S3-compatible bucket (SeaweedFS).

    Its database is its own: the module's database already holds the adapter that
    the local-storage variant of the SIGKILL test published.
    """
    stack = make_stack(tmp_path, fresh_postgres_url, redis_url, tiny_model_dir, **s3_env)
    stack.start_api()
    yield stack
    stack.stop()


def test_worker_killed_mid_training_resumes_from_checkpoint(stack, tmp_path):
    _killed_worker_resumes(stack, tmp_path)


def test_worker_killed_mid_training_resumes_from_a_checkpoint_on_s3(s3_stack, tmp_path):
    _killed_worker_resumes(s3_stack, tmp_path)
    assert not [p for p in (s3_stack.data_dir / "storage").rglob("*") if p.is_file()]


def test_worker_killed_mid_dpo_resumes_from_its_checkpoint(fresh_postgres_url, redis_url, tiny_model_dir, tmp_path):
    stack = make_stack(tmp_path, fresh_postgres_url, redis_url, tiny_model_dir)
    try:
        stack.start_api()
        path = tmp_path / "pairs.jsonl"
        path.write_bytes(to_jsonl(preference_lines(32)))
        file_id = upload_with_curl(stack, path)["id"]
        with stack.client() as client:
            response = client.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-llama", "training_file": file_id, "seed": 3, "peft": {**LONG_JOB, "max_steps": 300},
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 50, "batch_size": 4}}}})
        assert response.status_code == 200, response.text
        _killed_worker_resumes(stack, tmp_path, response.json()["id"])
    finally:
        stack.stop()


def _killed_worker_resumes(stack, tmp_path, job_id: str | None = None) -> None:
    job_id = job_id or _create(stack, tmp_path, {**LONG_JOB, "max_steps": 300})
    worker = stack.start_worker()
    with stack.client() as client:
        step = _wait_for_checkpoint(client, job_id)
        assert step > 0
        stack.kill(worker)  # SIGKILL to the worker and its pool child
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "running"
        stack.start_worker()
        final = wait_for_status(client, job_id, ("succeeded", "failed", "cancelled"), stack=stack)
        assert final["status"] == "succeeded", (final, stack.logs())
        events = all_events(client, job_id)
    resumed = [e["data"]["resumed_from_step"] for e in events if "resumed_from_step" in e.get("data", {})]
    assert resumed and resumed[0] >= step > 0, [e["message"] for e in events]
    assert any("stopped renewing its lease" in e["message"] for e in events)
    published = [e for e in events if e["message"].startswith("New fine-tuned model created")]
    assert len(published) == 1
    with stack.client() as client:
        models = [m for m in client.get("/v1/models").json()["data"] if m.get("parent") == "tiny-llama"]
    assert [m["id"] for m in models] == [final["fine_tuned_model"]]


def test_lost_queue_message_is_redispatched(stack, tmp_path, postgres_url, redis_url):
    job_id = _create(stack, tmp_path, FAST_QLORA, epochs=1)
    broker = redis.Redis.from_url(redis_url)
    engine = create_engine(postgres_url)
    with Session(engine) as session:  # a worker slot on offer, so the dispatcher sends the message
        heartbeat_worker(session, "about-to-vanish", 1)
        session.commit()
    engine.dispose()
    deadline = time.monotonic() + 30
    while not broker.llen("train") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker.llen("train") == 1
    with stack.client() as client:
        broker.flushdb()  # the broker forgets the message
        stack.start_worker()
        final = wait_for_status(client, job_id, ("succeeded", "failed"), stack=stack)
        assert final["status"] == "succeeded", (final, stack.logs())
        messages = [e["message"] for e in all_events(client, job_id)]
    assert any("Re-dispatching" in m for m in messages), messages


def test_cancel_stops_a_running_job_within_ten_seconds(stack, tmp_path):
    job_id = _create(stack, tmp_path, LONG_JOB)
    stack.start_worker()
    with stack.client() as client:
        _wait_for_checkpoint(client, job_id)
        started = time.monotonic()
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
        while time.monotonic() - started < 10:
            messages = [e["message"] for e in all_events(client, job_id)]
            if any(m.startswith("Training stopped") for m in messages):
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"the worker did not stop within 10 s: {stack.logs()}")
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["fine_tuned_model"] is None


def test_pause_stops_the_worker_and_resume_continues_from_a_checkpoint(stack, tmp_path):
    job_id = _create(stack, tmp_path, {**LONG_JOB, "max_steps": 300})
    stack.start_worker()
    with stack.client() as client:
        step = _wait_for_checkpoint(client, job_id)
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/pause").json()["status"] == "paused"
        deadline = time.monotonic() + 30
        while not any(m.startswith("Training stopped") for m in [e["message"] for e in all_events(client, job_id)]):
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.2)
        assert client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "paused"
        assert client.post(f"/v1/fine_tuning/jobs/{job_id}/resume").json()["status"] == "queued"
        final = wait_for_status(client, job_id, ("succeeded", "failed", "cancelled"), stack=stack)
        assert final["status"] == "succeeded", (final, stack.logs())
        resumed = [e["data"]["resumed_from_step"] for e in all_events(client, job_id)
                   if "resumed_from_step" in e.get("data", {})]
    assert resumed and resumed[0] >= step > 0


def test_a_failing_job_gets_a_readable_error_and_the_worker_serves_the_next(stack, tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    stack.cli("models", "add", "broken-llama", str(broken))
    (broken / "model.safetensors").write_bytes(b"not weights any more")
    file_id = upload_with_curl(stack, write_dataset(tmp_path, n=8))["id"]
    stack.start_worker()
    with stack.client() as client:
        bad = client.post("/v1/fine_tuning/jobs", json={"model": "broken-llama", "training_file": file_id}).json()
        failed = wait_for_status(client, bad["id"], ("succeeded", "failed"), stack=stack)
        assert failed["status"] == "failed" and failed["error"]["code"] == "training_error"
        assert failed["error"]["message"] and "Traceback" not in failed["error"]["message"]
        good = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file_id, "hyperparameters": {"n_epochs": 1},
            "peft": FAST_QLORA}).json()
        assert wait_for_status(client, good["id"], ("succeeded", "failed"), stack=stack)["status"] == "succeeded"
