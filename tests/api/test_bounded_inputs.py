"""Every input has a bound: oversize bodies get 413, out-of-range or unstorable values 400 naming the field.

Each case of the shared-API review is here, on SQLite and on Postgres (where NUL bytes and 64-bit
overflows used to be 500s).
"""

from __future__ import annotations

import json

import pytest

from core.temporaries import TEMP_PREFIX
from tests.support.datasets import chat_lines, to_jsonl

JOBS = "/v1/fine_tuning/jobs"


@pytest.fixture
def training_file(api_on_both) -> str:
    response = api_on_both.client.post("/v1/files", headers=api_on_both.headers(), data={"purpose": "fine-tune"},
                                       files={"file": ("t.jsonl", to_jsonl(chat_lines(4)))})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def _stored_files(api) -> list:
    from core.storage import get_storage

    root = get_storage().root
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("field, body", [
    ("training_file", {"training_file": "file-\u0000x"}),
    ("model", {"model": "tiny\u0000llama"}),
    ("metadata.te\u0000am", {"metadata": {"te\u0000am": "a"}}),
    ("suffix", {"suffix": "a\ud800b"}),
])
def test_unstorable_text_in_a_json_body_is_a_400_naming_the_field(api_on_both, training_file, field, body):
    payload = {"model": "tiny-llama", "training_file": training_file, **body}
    headers = {**api_on_both.headers(), "content-type": "application/json"}
    error = _error(api_on_both.client.post(JOBS, headers=headers, content=json.dumps(payload)), 400)
    assert error["param"] == field and error["code"] == "invalid_characters"


def test_unstorable_text_in_the_query_and_path_is_a_400(api_on_both):
    api = api_on_both
    assert _error(api.client.get(JOBS, headers=api.headers(), params={"after": "ftjob-\x00"}), 400)["param"] == "after"
    assert _error(api.client.get("/v1/files/file-%00", headers=api.headers()), 400)["param"] == "path"


def test_a_long_or_unstorable_filename_is_refused_and_nothing_is_left(api_on_both):
    api = api_on_both
    response = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                               files={"file": ("x" * 4000 + ".jsonl", to_jsonl(chat_lines(2)))})
    assert _error(response, 400)["param"] == "file"
    for filename in (b"bad\x00name.jsonl", b"bad\xffname.jsonl"):
        body = (b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--b\r\n'
                b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n\r\n'
                + to_jsonl(chat_lines(2)) + b"\r\n--b--\r\n")
        response = api.client.post("/v1/files", content=body,
                                   headers={**api.headers(), "content-type": "multipart/form-data; boundary=b"})
        assert _error(response, 400)["param"] == "file"
    assert _stored_files(api) == []
    assert api.client.get("/v1/files", headers=api.headers()).json()["data"] == []


def test_integers_must_fit_their_columns(api_on_both, training_file):
    api = api_on_both
    error = _error(api.client.post("/v1/adapters/x/aliases", headers=api.headers(),
                                   json={"alias": "prod", "version": 2**63 + 5}), 400)
    assert error["param"] == "version"
    assert api.client.get(f"/v1/adapters/x@{2**70}", headers=api.headers()).status_code == 404
    error = _error(api.client.post(JOBS, headers=api.headers(), json={
        "model": "tiny-llama", "training_file": training_file, "peft": {"max_steps": 2**70}}), 400)
    assert error["param"] == "peft.max_steps"


def test_nan_and_infinity_are_refused(api_on_both, training_file):
    api = api_on_both
    headers = {**api.headers(), "content-type": "application/json"}
    body = '{"model": "tiny-llama", "training_file": "%s", "peft": {"method": "lora", "alpha": NaN}}' % training_file
    assert _error(api.client.post(JOBS, headers=headers, content=body), 400)["param"] == "peft.alpha"
    body = body.replace("NaN", "Infinity")
    assert _error(api.client.post(JOBS, headers=headers, content=body), 400)["param"] == "peft.alpha"


def test_free_form_fields_have_bounds(api_on_both, training_file):
    api = api_on_both
    base = {"model": "tiny-llama", "training_file": training_file}
    cases = [
        ({"integrations": [{"type": "wandb", "wandb": {"project": "x" * 9000}}]}, "integrations"),
        ({"integrations": [{}] * 9}, "integrations"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"team\"": "a"}}, "metadata"),
        ({"peft": {"method": "lora", "target_modules": [f"m{i}" for i in range(65)]}}, "peft.target_modules"),
        ({"peft": {"method": "lora", "target_modules": ["q_proj", "x" * 129]}}, "peft.target_modules.1"),
        ({"suffix": "s" * 65}, "suffix"),
    ]
    for extra, param in cases:
        error = _error(api.client.post(JOBS, headers=api.headers(), json={**base, **extra}), 400)
        assert error["param"] == param, (extra, error)


def test_oversize_json_and_chat_bodies_get_413_before_anything_runs(api_on_both, training_file):
    api = api_on_both
    huge_modules = {"model": "tiny-llama", "training_file": training_file,
                    "peft": {"target_modules": ["q_proj"] * 200_000}}
    error = _error(api.client.post(JOBS, headers=api.headers(), json=huge_modules), 413)
    assert error["code"] == "request_too_large" and "1048576" in error["message"]
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    assert _error(api.client.post("/v1/chat/completions", headers=api.headers(), json=chat), 413)
    assert api.client.get(JOBS, headers=api.headers()).json()["data"] == []


def test_metadata_filters_with_bad_keys_are_400_and_good_ones_filter(api_on_both, training_file):
    api = api_on_both
    job = api.client.post(JOBS, headers=api.headers(), json={"model": "tiny-llama", "training_file": training_file,
                                                             "metadata": {"team": "search"}}).json()
    found = api.client.get(JOBS, headers=api.headers(), params={"metadata[team]": "search"}).json()["data"]
    assert [j["id"] for j in found] == [job["id"]]
    assert api.client.get(JOBS, headers=api.headers(), params={"metadata[team]": "other"}).json()["data"] == []
    error = _error(api.client.get(JOBS, headers=api.headers(), params={'metadata[team"]': "A"}), 400)
    assert error["param"] == 'metadata[team"]'


def test_an_upload_over_the_limit_sent_chunked_gets_413_and_leaves_nothing(api_on_both):
    api = api_on_both
    boundary = "b0undary"

    def body():
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
               f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n').encode()
        for _ in range(64):  # 2 MB against a 1 MB limit, with no Content-Length
            yield b'{"text": "' + b"x" * 32_000 + b'"}\n'

    response = api.client.post("/v1/files", headers={**api.headers(),
                                                     "content-type": f"multipart/form-data; boundary={boundary}"},
                               content=body())
    assert _error(response, 413)["code"] in ("file_too_large", "request_too_large")
    assert [p for p in _stored_files(api) if p.parts[0] != TEMP_PREFIX] == []
    assert api.client.get("/v1/files", headers=api.headers()).json()["data"] == []
