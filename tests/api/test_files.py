"""`/v1/files`: uploads, validation messages, listing, content and deletion."""

from __future__ import annotations

import json

import pytest

from tests.support.datasets import chat_lines, to_jsonl


def upload(api, content: bytes, *, purpose: str | None = "fine-tune", key: str | None = None,
           filename: str = "data.jsonl"):
    data = {"purpose": purpose} if purpose is not None else {}
    return api.client.post("/v1/files", headers=api.headers(key), data=data,
                           files={"file": (filename, content, "application/jsonl")})


def test_upload_valid_chat_file_is_processed_with_hash_and_count(api):
    content = to_jsonl(chat_lines(5))
    response = upload(api, content)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "file" and body["id"].startswith("file-")
    assert body["status"] == "processed" and body["status_details"] is None
    assert body["bytes"] == len(content) and body["purpose"] == "fine-tune" and body["filename"] == "data.jsonl"
    import hashlib

    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["n_examples"] == 5 and body["format"] == "chat"
    fetched = api.client.get(f"/v1/files/{body['id']}", headers=api.headers()).json()
    assert fetched == body
    assert api.client.get(f"/v1/files/{body['id']}/content", headers=api.headers()).content == content


@pytest.mark.parametrize("lines, fmt", [
    ([{"prompt": "2+2=", "completion": "4"}], "prompt_completion"),
    ([{"instruction": "Add.", "input": "2 and 2", "output": "4"}, {"instruction": "Hi", "output": "Hello"}], "alpaca"),
    ([{"text": "Once upon a time."}], "text"),
])
def test_every_format_is_accepted(api, lines, fmt):
    body = upload(api, to_jsonl(lines)).json()
    assert body["status"] == "processed", body
    assert body["format"] == fmt


BAD_LINES = [
    (b'{"messages": [', "line 1: invalid JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "line 1: no assistant message"),
    (b'{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "line 1: messages[0].role must be one of system, user, assistant"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     "line 1: messages[1].content is empty"),
    (b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "extra": 1}',
     "line 1: unexpected field(s): 'extra'"),
    (b'{"prompt": "a"}', "line 1: missing field 'completion'"),
    (b'{"instruction": "a"}', "line 1: missing field 'output'"),
    (b'{"colour": "red"}', "line 1: unknown example format"),
    (b'[1, 2]', "line 1: each line must be a JSON object"),
    (b'{"text": "caf\xe9"}', "line 1: not valid UTF-8"),
]


@pytest.mark.parametrize("content, expected", BAD_LINES)
def test_invalid_lines_give_error_status_with_line_numbers(api, content, expected):
    body = upload(api, content).json()
    assert body["status"] == "error"
    assert expected in body["status_details"], body["status_details"]


def test_error_lines_are_numbered_and_capped_at_twenty(api):
    good = json.dumps(chat_lines(1)[0]).encode()
    content = b"\n".join([good] + [b"{oops"] * 30 + [json.dumps({"text": "mixed"}).encode()])
    body = upload(api, content).json()
    assert body["status"] == "error"
    details = body["status_details"]
    assert details.startswith("31 invalid line(s)")
    assert "line 2: invalid JSON" in details and "line 21: invalid JSON" in details
    assert "line 22:" not in details and "and 11 more" in details


def test_empty_file_is_an_error(api):
    body = upload(api, b"").json()
    assert body["status"] == "error" and "no examples" in body["status_details"]


def test_missing_fields_and_bad_purpose_are_400(api):
    response = upload(api, b'{"text": "x"}', purpose=None)
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    response = upload(api, b'{"text": "x"}', purpose="batch")
    assert response.status_code == 400 and response.json()["error"]["param"] == "purpose"
    response = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"
    response = api.client.post("/v1/files", headers=api.headers(), json={"purpose": "fine-tune"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_too_large_upload_is_413_and_leaves_nothing(api):
    response = upload(api, b'{"text": "' + b"x" * (1100 * 1024) + b'"}')
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert api.client.get("/v1/files", headers=api.headers()).json()["data"] == []


def test_list_pages_newest_first(api):
    ids = [upload(api, to_jsonl(chat_lines(1, seed=i))).json()["id"] for i in range(3)]
    page = api.client.get("/v1/files", headers=api.headers(), params={"limit": 2}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [f["id"] for f in page["data"]] == ids[::-1][:2]
    rest = api.client.get("/v1/files", headers=api.headers(), params={"after": page["data"][-1]["id"]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[0]] and rest["has_more"] is False


def test_delete_file(api):
    file_id = upload(api, to_jsonl(chat_lines(2))).json()["id"]
    response = api.client.delete(f"/v1/files/{file_id}", headers=api.headers())
    assert response.json() == {"id": file_id, "object": "file", "deleted": True}
    assert api.client.get(f"/v1/files/{file_id}", headers=api.headers()).status_code == 404


def test_deleting_a_file_used_by_an_unfinished_job_is_409(api):
    file_id = upload(api, to_jsonl(chat_lines(4))).json()["id"]
    job = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(),
                          json={"model": "tiny-llama", "training_file": file_id})
    assert job.status_code == 200, job.text
    response = api.client.delete(f"/v1/files/{file_id}", headers=api.headers())
    assert response.status_code == 409 and job.json()["id"] in response.json()["error"]["message"]
    api.client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", headers=api.headers())
    assert api.client.delete(f"/v1/files/{file_id}", headers=api.headers()).status_code == 200


def test_windows_line_endings_and_a_byte_order_mark_are_accepted(api):
    content = b"\xef\xbb\xbf" + to_jsonl(chat_lines(3)).replace(b"\n", b"\r\n")
    body = upload(api, content).json()
    assert body["status"] == "processed" and body["n_examples"] == 3
