"""The worker's metrics port on a real (tiny) training run through the job's database context: the job's
tokens/s, step time and step while it runs, its series gone when it ends, and the job counters."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core import job_lifecycle
from core.datasets import Example, Message
from core.db import session_scope
from core.job_lifecycle import QUEUED
from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
from core.settings import Settings
from core.storage import get_storage
from tests.support.job_rows import add_job
from tests.support.migrated import migrated_database
from tests.support.services import free_port
from worker.job_context import DbJobContext, LeaseHeartbeat
from worker.metrics import serve_worker_metrics, stop_worker_metrics, training_metrics

FAST = Settings(lease_seconds=30, heartbeat_seconds=0.5)


@pytest.fixture
def metrics_url():
    """The worker metrics server of this process, on a free port."""
    port = free_port()
    server = serve_worker_metrics(port, host="127.0.0.1")
    assert server is not None
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        stop_worker_metrics(server)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def examples(n: int) -> list[Example]:
    return [Example("chat", [Message("user", f"Count to {i}."), Message("assistant", " ".join(["one"] * (i + 2)))])
            for i in range(n)]


def test_a_training_run_moves_the_job_series_and_counters(metrics_url, tiny_model_dir, tmp_path):
    from worker.training.interface import TrainingJob
    from worker.training.recipe import run_training

    with migrated_database(tmp_path / "data"):
        job_id = add_job(QUEUED)
        with session_scope() as session:
            assert job_lifecycle.start(session, job_id, "w1", lease_seconds=FAST.lease_seconds)
        config = resolve_training(Hyperparameters(n_epochs=2, batch_size=4),
                                  PeftConfigSpec(method="lora", learning_rate=1e-3, checkpoint_every_steps=2),
                                  n_examples=8, seed=1)
        (tmp_path / "work").mkdir()
        job = TrainingJob(job_id=job_id, base_model_path=str(tiny_model_dir), training_examples=examples(8),
                          validation_examples=None, config=config, work_dir=tmp_path / "work")
        metrics = training_metrics()
        before = scrape(metrics_url)  # other tests of this process may have counted already
        with LeaseHeartbeat(job_id, "w1", FAST) as heartbeat:
            context = DbJobContext(job_id, heartbeat, get_storage(), tmp_path / "work")
            metrics.job_started(job_id)
            result = run_training(job, context)
            during = scrape(metrics_url)
            assert context.latest_checkpoint() is not None  # a resume would start from it
        metrics.job_ended(job_id, "succeeded")
        after = scrape(metrics_url)

    job_labels = (("job", job_id),)
    assert during[("patchbay_training_tokens_per_second", job_labels)] > 0
    assert during[("patchbay_training_step_seconds", job_labels)] > 0
    assert during[("patchbay_training_step", job_labels)] == result.steps == 4
    assert during[("patchbay_training_total_steps", job_labels)] == 4
    running = ("patchbay_training_jobs_running", ())
    assert during[running] == before[running] + 1
    assert not any(labels == job_labels for _, labels in after)  # its series went with it
    assert after[running] == before[running]

    def moved(samples, event: str) -> float:
        key = ("patchbay_training_jobs_total", (("event", event),))
        return samples[key] - before[key]

    assert (moved(during, "started"), moved(during, "succeeded")) == (1, 0)
    assert [moved(after, e) for e in ("started", "succeeded", "failed", "stopped")] == [1, 1, 0, 0]
    assert moved(after, "resumed") >= 1  # each resume from a checkpoint counts (the check above made one)

def test_port_0_turns_the_worker_metrics_off():
    assert serve_worker_metrics(0) is None
