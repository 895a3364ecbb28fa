"""Per-team quotas and rate limits: 429 and 413 that name the limit and the use, and admin overrides."""

from __future__ import annotations

from tests.support.datasets import chat_lines, to_jsonl

JOBS = "/v1/fine_tuning/jobs"


def _upload(api, content: bytes, key: str | None = None):
    return api.client.post("/v1/files", headers=api.headers(key), data={"purpose": "fine-tune"},
                           files={"file": ("t.jsonl", content)})


def _admin_key() -> str:
    from core.auth import create_api_key, create_team
    from core.db import session_scope

    with session_scope() as session:
        return create_api_key(session, create_team(session, "platform"), is_admin=True)


def test_over_the_queued_jobs_limit_is_429_naming_limit_and_use(api_with):
    api = api_with(TEAM_MAX_QUEUED_JOBS="2")
    file_id = _upload(api, to_jsonl(chat_lines(4))).json()["id"]
    body = {"model": "tiny-llama", "training_file": file_id}
    assert [api.client.post(JOBS, headers=api.headers(), json=body).status_code for _ in range(2)] == [200, 200]
    refused = api.client.post(JOBS, headers=api.headers(), json=body)
    assert refused.status_code == 429 and refused.headers["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "max_queued_jobs_exceeded" and error["limit"] == 2 and error["current"] == 2
    assert "max_queued_jobs" in error["message"] and "limit 2, current 2" in error["message"]
    other_file = _upload(api, to_jsonl(chat_lines(4)), api.other_key).json()["id"]
    assert api.client.post(JOBS, headers=api.headers(api.other_key),
                           json={**body, "training_file": other_file}).status_code == 200  # another team is free


def test_over_the_storage_limit_is_413_and_nothing_is_kept(api_with):
    content = to_jsonl(chat_lines(20))
    api = api_with(TEAM_STORAGE_BYTES=str(len(content) + 100))
    assert _upload(api, content).status_code == 200
    refused = _upload(api, content)
    assert refused.status_code == 413
    error = refused.json()["error"]
    assert error["code"] == "storage_bytes_exceeded" and error["limit"] == len(content) + 100
    assert error["current"] == len(content)
    assert len(api.client.get("/v1/files", headers=api.headers()).json()["data"]) == 1


def test_admins_override_limits_per_team_and_others_may_not(api_with):
    api = api_with(TEAM_MAX_QUEUED_JOBS="5")
    admin = _admin_key()
    path = "/v1/admin/teams/acme/limits"
    assert api.client.get(path, headers=api.headers()).status_code == 403
    shown = api.client.get(path, headers=api.headers(admin)).json()
    assert shown["limits"]["max_queued_jobs"] == 5 and shown["overrides"]["max_queued_jobs"] is None
    changed = api.client.patch(path, headers=api.headers(admin), json={"max_queued_jobs": 1, "storage_bytes": 0})
    assert changed.status_code == 200, changed.text
    assert changed.json()["limits"]["max_queued_jobs"] == 1 and changed.json()["overrides"]["storage_bytes"] == 0
    file_id = _upload(api, to_jsonl(chat_lines(4))).json()["id"]
    body = {"model": "tiny-llama", "training_file": file_id}
    assert [api.client.post(JOBS, headers=api.headers(), json=body).status_code for _ in range(2)] == [200, 429]
    reset = api.client.patch(path, headers=api.headers(admin), json={"max_queued_jobs": None}).json()
    assert reset["limits"]["max_queued_jobs"] == 5 and reset["usage"]["queued_jobs"] == 1
    assert api.client.get("/v1/admin/teams/nobody/limits", headers=api.headers(admin)).status_code == 404
    assert api.client.patch(path, headers=api.headers(admin), json={"max_queued_jobs": -1}).status_code == 400


def test_the_cli_shows_and_overrides_limits(api_with, tmp_path):
    import json

    from typer.testing import CliRunner

    from patchbay_cli import app

    api_with()
    runner = CliRunner()
    result = runner.invoke(app, ["team", "limits", "acme", "--max-running-jobs", "2", "--storage-bytes", "1000"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["limits"]["max_running_jobs"] == 2 and shown["limits"]["storage_bytes"] == 1000
    result = runner.invoke(app, ["team", "limits", "acme", "--max-running-jobs", "default"])
    assert json.loads(result.output)["overrides"]["max_running_jobs"] is None
    assert runner.invoke(app, ["team", "limits", "nobody"]).exit_code == 2


def test_per_key_request_limit_gives_openai_rate_limit_headers(api_with):
    api = api_with(KEY_REQUESTS_PER_MINUTE="5")
    statuses = [api.client.get("/v1/files", headers=api.headers()).status_code for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    refused = api.client.get("/v1/files", headers=api.headers())
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert api.client.get("/v1/files", headers=api.headers(api.other_key)).status_code == 200  # other key


def test_team_requests_per_minute_limit_inference_before_anything_is_forwarded(api_with):
    api = api_with(TEAM_REQUESTS_PER_MINUTE="2", INFERENCE_URL="http://127.0.0.1:9")
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
    statuses = [api.client.post("/v1/chat/completions", headers=api.headers(), json=body) for _ in range(3)]
    assert [r.status_code for r in statuses] == [503, 503, 429]  # nothing serves; the third is not even tried
    assert statuses[0].headers["retry-after"] and statuses[0].json()["error"]["code"] == "no_replica"
    assert statuses[2].headers["x-ratelimit-limit-requests"] == "2"
    assert api.client.post("/v1/chat/completions", headers=api.headers(api.other_key),
                           json=body).status_code == 503


def test_failed_authentications_from_one_address_are_limited(api_with):
    api = api_with(FAILED_AUTH_PER_MINUTE="5")
    bad = {"Authorization": "Bearer pb-wrong"}
    statuses = [api.client.get("/v1/files", headers=bad).status_code for _ in range(7)]
    assert statuses[:5] == [401] * 5 and statuses[5:] == [429, 429]
    assert api.client.get("/v1/files").status_code == 429  # a missing key is a failure too
    # A valid key from the same address (another team behind the same proxy) is not locked out.
    assert api.client.get("/v1/files", headers=api.headers()).status_code == 200
