"""Keys and team isolation: 401 without a key, 404 for another team's objects."""

from __future__ import annotations

import pytest

from tests.support.datasets import chat_lines, to_jsonl


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_missing_or_bad_key_is_401(api, headers):
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
        response = api.client.get(path, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"


def test_health_needs_no_key(api):
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_another_teams_file_job_and_events_are_404(api):
    file_id = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", to_jsonl(chat_lines(3)))}).json()["id"]
    job_id = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(),
                             json={"model": "tiny-llama", "training_file": file_id}).json()["id"]
    theirs = api.headers(api.other_key)
    for method, path in [
        ("GET", f"/v1/files/{file_id}"), ("GET", f"/v1/files/{file_id}/content"), ("DELETE", f"/v1/files/{file_id}"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"), ("GET", f"/v1/fine_tuning/jobs/{job_id}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints"), ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
    ]:
        response = api.client.request(method, path, headers=theirs)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["type"] == "not_found_error"
    assert api.client.get("/v1/files", headers=theirs).json()["data"] == []
    assert api.client.get("/v1/fine_tuning/jobs", headers=theirs).json()["data"] == []
    assert api.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=api.headers()).status_code == 200


def test_unknown_route_is_an_error_object(api):
    response = api.client.get("/v1/nothing-here", headers=api.headers())
    assert response.status_code == 404 and "error" in response.json()
