"""`GET /v1/files/{id}/preview`: the first lines and the invalid ones, judged exactly as the upload was."""

from __future__ import annotations

import json

from tests.api.test_files import upload
from tests.support.datasets import chat_lines, to_jsonl


def preview(api, file_id: str, key: str | None = None, **params):
    return api.client.get(f"/v1/files/{file_id}/preview", headers=api.headers(key), params=params)


def test_a_valid_file_shows_its_first_lines_without_errors(api):
    lines = chat_lines(30)
    file_id = upload(api, to_jsonl(lines)).json()["id"]
    body = preview(api, file_id, limit=5).json()
    assert body["object"] == "file.preview" and body["format"] == "chat" and body["status"] == "processed"
    assert [r["line"] for r in body["rows"]] == [1, 2, 3, 4, 5]
    assert json.loads(body["rows"][0]["text"]) == lines[0] and body["rows"][0]["error"] is None
    assert body["invalid_rows"] == [] and body["n_errors"] == 0 and body["truncated"] is True


def test_an_invalid_file_names_each_bad_line_with_its_reason_and_text(api):
    good = to_jsonl(chat_lines(3)).decode().splitlines()
    far_lines = [*good, "{not json", json.dumps({"messages": "nope"}), *good * 20, '["a list"]']
    uploaded = upload(api, "\n".join(far_lines).encode()).json()
    assert uploaded["status"] == "error"
    body = preview(api, uploaded["id"], limit=4).json()
    assert body["n_errors"] == 3
    assert [r["line"] for r in body["invalid_rows"]] == [4, 5, len(far_lines)]
    assert body["invalid_rows"][0]["text"] == "{not json" and "invalid JSON" in body["invalid_rows"][0]["error"]
    assert body["invalid_rows"][2]["error"] == "each line must be a JSON object"
    assert [r["error"] is None for r in body["rows"]] == [True, True, True, False]
    # The same reasons as the file's own status_details.
    for row in body["invalid_rows"]:
        assert f"line {row['line']}: {row['error']}" in uploaded["status_details"]


def test_long_lines_are_cut_and_limits_are_bounded(api):
    file_id = upload(api, to_jsonl([{"text": "x" * 9000}])).json()["id"]
    body = preview(api, file_id).json()
    assert len(body["rows"][0]["text"]) == 4000 and body["truncated"] is False
    refused = preview(api, file_id, limit=1000)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "limit"


def test_another_teams_file_is_not_found(api):
    file_id = upload(api, to_jsonl(chat_lines(2))).json()["id"]
    assert preview(api, file_id, key=api.other_key).status_code == 404
