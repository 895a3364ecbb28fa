"""The whole path through real processes: upload, QLoRA job, live events, published adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.flows import (
    FAST_QLORA,
    assert_adapter_changes_logits,
    follow_events,
    metrics_of,
    published_adapter_dir,
    stack_s3_storage,
    upload_with_curl,
    write_dataset,
)
from tests.support.reference import peft_greedy_chat
from tests.support.services import free_port, make_stack

pytestmark = pytest.mark.slow


def _train_and_check(stack, tmp_path, model_dir) -> tuple[dict, Path]:
    uploaded = upload_with_curl(stack, write_dataset(tmp_path))
    assert uploaded["status"] == "processed", uploaded
    validation = upload_with_curl(stack, write_dataset(tmp_path, n=4, seed=9))
    with stack.client() as client:
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": uploaded["id"], "validation_file": validation["id"],
            "suffix": "colours", "seed": 1,
            "hyperparameters": {"n_epochs": 3, "batch_size": 4}, "peft": FAST_QLORA}).json()
    events = follow_events(stack, job["id"])
    with stack.client() as client:
        final = client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
    assert final["status"] == "succeeded", (final, stack.logs())
    assert final["fine_tuned_model"].startswith("ft:tiny-llama:acme:colours:")
    assert final["trained_tokens"] > 0 and final["finished_at"] >= final["created_at"]

    metrics = metrics_of(events)
    assert metrics[0]["step"] == 1 and metrics[-1]["step"] == 18
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["valid_loss"] is not None
    for key in ("step", "train_loss", "learning_rate", "tokens_per_second", "eta_seconds"):
        assert key in metrics[-1]

    quantization = [e["data"] for e in events if e["data"].get("decoder_linears")]
    assert quantization, events
    report = quantization[0]
    assert report["decoder_linears"] == report["linear4bit"] == 14  # 2 layers x 7 projections
    assert report["all_nested"] is True and report["quant_type"] == "nf4"

    adapter_dir = published_adapter_dir(stack, events)
    assert_adapter_changes_logits(adapter_dir, model_dir)
    with stack.client() as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]
        checkpoints = client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"]
    assert "tiny-llama" in models and final["fine_tuned_model"] in models
    assert checkpoints and checkpoints[0]["step_number"] >= 4
    return final, adapter_dir


def _serve_and_check(stack, model: str, adapter_dir: Path, model_dir: Path) -> None:
    """An inference replica fetches the adapter from storage and answers as plain PEFT does."""
    port = free_port()
    stack.start_inference(port, "tiny-llama")
    question = "What colour is item 7?"
    with stack.client() as client:
        response = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 12,
            "temperature": 0})
    assert response.status_code == 200, (response.text, stack.logs())
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer == peft_greedy_chat(model_dir, adapter_dir, question, 12)


def _run_stack(tmp_path, database_url: str, broker_url: str, model_dir, **extra_env: str) -> None:
    stack = make_stack(tmp_path, database_url, broker_url, model_dir, **extra_env)
    try:
        stack.start_api()
        stack.start_worker()
        final, adapter_dir = _train_and_check(stack, tmp_path, model_dir)
        if "PATCHBAY_STORAGE_URL" in extra_env:  # everything went to the bucket, nothing to the local dir
            _serve_and_check(stack, final["fine_tuned_model"], adapter_dir, model_dir)
            assert not [p for p in (stack.data_dir / "storage").rglob("*") if p.is_file()]
            storage = stack_s3_storage(stack)
            assert storage.children("files") and storage.children("adapters") and storage.children("checkpoints")
    finally:
        stack.stop()


def test_qlora_job_on_postgres_and_redis(tmp_path, postgres_url, redis_url, tiny_model_dir):
    _run_stack(tmp_path, postgres_url, redis_url, tiny_model_dir)


def test_qlora_job_on_embedded_sqlite_and_sqlalchemy_broker(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    _run_stack(tmp_path, f"sqlite:///{data / 'patchbay.sqlite'}", f"sqla+sqlite:///{data / 'broker.sqlite'}",
               tiny_model_dir)


def test_qlora_job_on_postgres_redis_and_s3(tmp_path, postgres_url, redis_url, tiny_model_dir, s3_env):
    """The same flow with uploads, checkpoints and the adapter in a real S3-compatible bucket (SeaweedFS)."""
    _run_stack(tmp_path, postgres_url, redis_url, tiny_model_dir, **s3_env)
