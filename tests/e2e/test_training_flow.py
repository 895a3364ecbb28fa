"""The whole path through real processes: upload, QLoRA job, live events, published adapter."""

from __future__ import annotations

import pytest

from tests.support.flows import (
    FAST_QLORA,
    assert_adapter_changes_logits,
    follow_events,
    metrics_of,
    published_adapter_dir,
    upload_with_curl,
    write_dataset,
)
from tests.support.services import make_stack

pytestmark = pytest.mark.slow


def _train_and_check(stack, tmp_path, model_dir) -> None:
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


def _run_stack(tmp_path, database_url: str, broker_url: str, model_dir) -> None:
    stack = make_stack(tmp_path, database_url, broker_url, model_dir)
    try:
        stack.start_api()
        stack.start_worker()
        _train_and_check(stack, tmp_path, model_dir)
    finally:
        stack.stop()


def test_qlora_job_on_postgres_and_redis(tmp_path, postgres_url, redis_url, tiny_model_dir):
    _run_stack(tmp_path, postgres_url, redis_url, tiny_model_dir)


def test_qlora_job_on_embedded_sqlite_and_sqlalchemy_broker(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    _run_stack(tmp_path, f"sqlite:///{data / 'patchbay.sqlite'}", f"sqla+sqlite:///{data / 'broker.sqlite'}",
               tiny_model_dir)
