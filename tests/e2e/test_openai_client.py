"""The official `openai` package works against Patchbay unchanged."""

from __future__ import annotations

import openai
import pytest

from tests.support.flows import FAST_QLORA, write_dataset
from tests.support.services import make_stack, wait_for_status

pytestmark = pytest.mark.slow


def test_openai_sdk_files_and_fine_tuning_jobs(tmp_path, postgres_url, redis_url, tiny_model_dir):
    stack = make_stack(tmp_path, postgres_url, redis_url, tiny_model_dir)
    try:
        stack.start_api()
        stack.start_worker()
        client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0)
        with open(write_dataset(tmp_path), "rb") as fh:
            uploaded = client.files.create(file=fh, purpose="fine-tune")
        assert uploaded.id.startswith("file-") and uploaded.status == "processed"

        job = client.fine_tuning.jobs.create(
            model="tiny-llama", training_file=uploaded.id, suffix="sdk", seed=5,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
            extra_body={"peft": FAST_QLORA})
        assert job.status in ("validating_files", "queued") and job.hyperparameters.n_epochs == 2
        assert client.fine_tuning.jobs.retrieve(job.id).id == job.id
        assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=10)]
        with stack.client() as http:
            done = wait_for_status(http, job.id, ("succeeded", "failed"), stack=stack)
        assert done["status"] == "succeeded"
        events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert any(e.type == "metrics" for e in events)
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        assert checkpoints and checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].step_number > 0
        finished = client.fine_tuning.jobs.retrieve(job.id)
        assert client.models.retrieve(finished.fine_tuned_model).id == finished.fine_tuned_model
        assert finished.fine_tuned_model in [m.id for m in client.models.list()]
        assert client.files.content(uploaded.id).read() == (tmp_path / "chat-0.jsonl").read_bytes()
        assert [f.id for f in client.files.list(purpose="fine-tune")] == [uploaded.id]

        paused = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)
        assert client.fine_tuning.jobs.pause(paused.id).status == "paused"
        assert client.fine_tuning.jobs.resume(paused.id).status == "queued"
        client.fine_tuning.jobs.cancel(paused.id)

        doomed = client.fine_tuning.jobs.create(model="tiny-llama", training_file=uploaded.id)
        assert client.fine_tuning.jobs.cancel(doomed.id).status == "cancelled"

        with pytest.raises(openai.NotFoundError):
            client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
        with pytest.raises(openai.NotFoundError) as unknown:
            client.fine_tuning.jobs.create(model="no-such-model", training_file=uploaded.id)
        assert unknown.value.body["param"] == "model" and unknown.value.body["code"] == "model_not_found"
        assert client.models.delete(finished.fine_tuned_model).deleted is True
        assert client.files.delete(uploaded.id).deleted is True
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(uploaded.id)
        unauthorized = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            unauthorized.files.list()
    finally:
        stack.stop()
