"""The API's /metrics: Prometheus text that parses, request counters by route template that move, the jobs read
from the database at scrape time, 429s by team and limit, and a switch that removes the route."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from core.db import session_scope
from core.ids import new_id, now
from core.models import Job, Team


def scrape(client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics (fetched without a key) by (name, sorted labels)."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_are_counted_by_route_template_and_status_and_timed(api):
    before = scrape(api.client)
    for _ in range(3):
        assert api.client.get("/v1/files/file-nope", headers=api.headers()).status_code == 404
    assert api.client.get("/v1/files", headers=api.headers()).status_code == 200
    assert api.client.get("/no/such/path/42").status_code == 404
    after = scrape(api.client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("patchbay_api_requests_total", method="GET", route="/v1/files/{file_id}", status="404") == 3
    assert moved("patchbay_api_requests_total", method="GET", route="/v1/files", status="200") == 1
    assert moved("patchbay_api_requests_total", method="GET", route="unmatched", status="404") == 1
    assert moved("patchbay_api_request_duration_seconds_count", method="GET", route="/v1/files/{file_id}") == 3
    assert not any("file-nope" in str(labels) or "42" in str(labels) for _, labels in after)  # no raw paths
    assert after[("patchbay_api_process_resident_memory_bytes", ())] > 0


def test_a_body_refused_at_the_edge_is_counted_under_its_route(api):
    before = scrape(api.client)
    too_big = api.client.post("/v1/fine_tuning/jobs", headers={**api.headers(), "content-type": "application/json"},
                              content=b"[" + b"1," * 700_000 + b"1]")
    assert too_big.status_code == 413
    after = scrape(api.client)
    labels = {"method": "POST", "route": "/v1/fine_tuning/jobs", "status": "413"}
    assert value(after, "patchbay_api_requests_total", **labels) - value(before, "patchbay_api_requests_total",
                                                                          **labels) == 1


def test_jobs_are_read_from_the_database_at_scrape_time(api):
    with session_scope() as session:
        team = session.query(Team).filter_by(name="acme").one()
        for status, age in (("queued", 120.0), ("queued", 5.0), ("validating_files", 1.0), ("succeeded", 9.0)):
            session.add(Job(id=new_id("ftjob"), team_id=team.id, model="tiny-llama", training_file="file-x",
                            status=status, spec={}, seed=0, created_at=now() - age, deadline_at=now() + 3600,
                            attempts=0))
    samples = scrape(api.client)
    assert value(samples, "patchbay_jobs_store_up") == 1
    assert value(samples, "patchbay_jobs", status="queued") == 2
    assert value(samples, "patchbay_jobs", status="succeeded") == 1
    assert value(samples, "patchbay_jobs_waiting", team="acme") == 3
    assert value(samples, "patchbay_jobs_waiting", team="globex") == 0
    assert 120 <= value(samples, "patchbay_jobs_oldest_waiting_seconds", team="acme") < 180


def test_a_database_outage_leaves_the_job_series_out_instead_of_failing(api, monkeypatch):
    from api import metrics

    def down():
        raise OSError("database unreachable")

    monkeypatch.setattr(metrics, "_read_jobs", down)
    samples = scrape(api.client)
    assert value(samples, "patchbay_jobs_store_up") == 0
    assert not any(name == "patchbay_jobs_waiting" for name, _ in samples)


def test_429s_are_counted_by_team_and_limit(api_with):
    api = api_with(KEY_REQUESTS_PER_MINUTE="2", FAILED_AUTH_PER_MINUTE="1")
    before = scrape(api.client)
    statuses = [api.client.get("/v1/files", headers=api.headers()).status_code for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    bad = [api.client.get("/v1/files", headers=api.headers("sk-wrong")).status_code for _ in range(3)]
    assert bad == [401, 429, 429]
    after = scrape(api.client)
    key = {"team": "acme", "limit": "key_requests_per_minute"}
    auth = {"team": "", "limit": "failed_auth_per_minute"}
    assert value(after, "patchbay_api_limited_requests_total", **key) - value(
        before, "patchbay_api_limited_requests_total", **key) == 2
    assert value(after, "patchbay_api_limited_requests_total", **auth) - value(
        before, "patchbay_api_limited_requests_total", **auth) == 2


def test_metrics_stay_out_of_the_schema(api):
    assert "/metrics" not in api.client.get("/openapi.json").json()["paths"]


def test_metrics_can_be_turned_off(api_with):
    off = api_with(METRICS_ENABLED="false")
    assert off.client.get("/metrics").status_code == 404
