"""Metrics through real processes: `patchbay worker` (Celery's prefork pool trains in a child) serves the job's
series on its own port while it trains and drops them when it ends, and the API's /metrics sees the job."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.flows import FAST_QLORA, follow_events, upload_with_curl, write_dataset
from tests.support.services import embedded_urls, free_port, make_stack

pytestmark = pytest.mark.slow


def scrape(url: str) -> dict[tuple[str, tuple], float] | None:
    try:
        text = httpx.get(url, timeout=5).text
    except httpx.HTTPError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_job_moves_the_worker_and_api_metrics(tmp_path, tiny_model_dir):
    worker_port = free_port()
    stack = make_stack(tmp_path, *embedded_urls(tmp_path), tiny_model_dir,
                       PATCHBAY_WORKER_METRICS_PORT=str(worker_port))
    worker_metrics = f"http://127.0.0.1:{worker_port}/metrics"
    try:
        stack.start_api()
        stack.start_worker()
        uploaded = upload_with_curl(stack, write_dataset(tmp_path))
        with stack.client() as client:
            job = client.post("/v1/fine_tuning/jobs", json={
                "model": "tiny-llama", "training_file": uploaded["id"], "seed": 1,
                "hyperparameters": {"n_epochs": 3, "batch_size": 4}, "peft": FAST_QLORA}).json()
            series = ("patchbay_training_tokens_per_second", (("job", job["id"]),))
            seen, deadline = None, time.monotonic() + 300
            while seen is None and time.monotonic() < deadline:
                samples = scrape(worker_metrics) or {}
                seen = samples.get(series)
                if seen is None and client.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["status"] in (
                        "succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.1)
        assert seen is not None and seen > 0, f"the job's tokens/s never showed:\n{stack.logs()}"
        events = follow_events(stack, job["id"])
        assert events[-1]["message"] == "The job has successfully completed.", stack.logs()

        after = scrape(worker_metrics)
        assert after is not None
        assert after[("patchbay_training_jobs_total", (("event", "started"),))] == 1
        assert after[("patchbay_training_jobs_total", (("event", "succeeded"),))] == 1
        assert after[("patchbay_training_jobs_running", ())] == 0
        assert series not in after and not any(labels == series[1] for _, labels in after)

        api = scrape(f"{stack.base_url}/metrics")
        assert api[("patchbay_jobs", (("status", "succeeded"),))] == 1
        assert api[("patchbay_jobs_waiting", (("team", "acme"),))] == 0
        created = ("patchbay_api_requests_total", (("method", "POST"), ("route", "/v1/fine_tuning/jobs"),
                                                    ("status", "200")))
        assert api[created] == 1
    finally:
        stack.stop()
