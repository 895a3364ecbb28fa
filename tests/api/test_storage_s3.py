"""The API over S3 (a real SeaweedFS): uploads, downloads, previews, imports, quotas, /readyz and outages."""

from __future__ import annotations

import io
import secrets
import tarfile
import threading
import time

import pytest

from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.datasets import chat_lines, to_jsonl


def _s3_settings(env: dict[str, str], **extra: str) -> dict[str, str]:
    return {"STORAGE_URL": env["PATCHBAY_STORAGE_URL"], "S3_ENDPOINT_URL": env["PATCHBAY_S3_ENDPOINT_URL"], **extra}


def _objects(server, env: dict[str, str]) -> dict[str, int]:
    bucket, prefix = env["PATCHBAY_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1:]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _upload(api, content: bytes):
    return api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                           files={"file": ("data.jsonl", content, "application/jsonl")})


@pytest.fixture(scope="module")
def peft_adapter(tiny_model_dir, tmp_path_factory):
    return save_peft_lora(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "a")


def test_files_live_in_the_bucket_and_stream_back(api_with, s3_server, s3_env):
    api = api_with(**_s3_settings(s3_env, MAX_UPLOAD_BYTES=str(32 * 1024 * 1024)))
    content = to_jsonl(chat_lines(40)) * 2500  # several 8 MB parts
    assert len(content) > 17 * 1024 * 1024
    body = _upload(api, content).json()
    assert body["status"] == "processed" and body["n_examples"] == 100000, body
    assert _objects(s3_server, s3_env) == {f"files/{body['id']}.jsonl": len(content)}  # no temporary left
    got = api.client.get(f"/v1/files/{body['id']}/content", headers=api.headers())
    assert got.status_code == 200 and got.content == content
    preview = api.client.get(f"/v1/files/{body['id']}/preview?limit=3", headers=api.headers()).json()
    assert [row["line"] for row in preview["rows"]] == [1, 2, 3]

    bad = _upload(api, b'{"messages": [\n').json()
    assert bad["status"] == "error" and "line 1: invalid JSON" in bad["status_details"]
    assert api.client.delete(f"/v1/files/{body['id']}", headers=api.headers()).status_code == 200
    assert list(_objects(s3_server, s3_env)) == [f"files/{bad['id']}.jsonl"]


def test_adapter_import_and_download_on_s3(api_with, s3_server, s3_env, peft_adapter):
    api = api_with(**_s3_settings(s3_env))
    imported = api.client.post("/v1/adapters/import", headers=api.headers(),
                               data={"name": "bot", "base_model": "tiny-llama"},
                               files={"file": ("a.tar.gz", tar_gz(peft_adapter), "application/gzip")})
    assert imported.status_code == 200, imported.text
    adapter_id = imported.json()["id"]
    stored = _objects(s3_server, s3_env)
    assert f"adapters/{adapter_id}/.patchbay-complete" in stored
    assert not [k for k in stored if k.startswith("tmp/")]
    download = api.client.get(f"/v1/adapters/{adapter_id}/download", headers=api.headers())
    assert download.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tf:
        assert sorted(tf.getnames()) == ["bot-v1/README.md", "bot-v1/adapter_config.json",
                                         "bot-v1/adapter_model.safetensors", "bot-v1/patchbay.json"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_storage_quota_counts_the_same_bytes_on_both_backends(backend, api_with, request, peft_adapter):
    content = to_jsonl(chat_lines(20))
    archive = tar_gz(peft_adapter)
    settings = {"TEAM_STORAGE_BYTES": str(len(content) * 2 + 10)}
    if backend == "s3":
        settings = _s3_settings(request.getfixturevalue("s3_env"), **settings)
    api = api_with(**settings)
    assert _upload(api, content).status_code == 200
    assert _upload(api, content).status_code == 200
    refused = _upload(api, content)
    assert refused.status_code == 413 and refused.json()["error"]["current"] == 2 * len(content)
    if backend == "s3":
        files = {k: v for k, v in _objects(request.getfixturevalue("s3_server"),
                                           request.getfixturevalue("s3_env")).items() if k.startswith("files/")}
        assert sum(files.values()) == 2 * len(content)
    assert archive  # the adapters' bytes count through the same rows (core.quotas.storage_used)


def test_readyz_names_a_missing_bucket_and_uploads_get_503(api_with, s3_server, s3_env):
    api = api_with(STORAGE_URL=f"s3://missing-{secrets.token_hex(4)}/x", S3_ENDPOINT_URL=s3_server.endpoint)
    ready = api.client.get("/readyz")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert "bucket does not exist" in ready.json()["checks"]["storage"]
    refused = _upload(api, to_jsonl(chat_lines(2)))
    assert refused.status_code == 503 and refused.headers.get("Retry-After"), refused.text
    assert refused.json()["error"]["message"]


def test_readyz_names_bad_credentials(api_with, s3_server, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    api = api_with(**_s3_settings(s3_env))
    ready = api.client.get("/readyz")
    assert ready.status_code == 503 and "access denied" in ready.json()["checks"]["storage"]


def test_readyz_is_ok_on_a_good_bucket(api_with, s3_env):
    api = api_with(**_s3_settings(s3_env))
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["storage"] == "ok"


def test_an_outage_gives_503_loses_nothing_and_recovers(api_with, s3_server, s3_env):
    """Stop the S3 server for 5 s under light load: 200 or 503 with Retry-After, never 500; then all is back."""
    api = api_with(**_s3_settings(s3_env))
    answers: list[int] = []
    accepted: dict[str, bytes] = {}
    stop = threading.Event()

    def load(n: int) -> None:
        i = 0
        while not stop.is_set():
            content = to_jsonl(chat_lines(3)) + f'{{"text": "client {n} upload {i}"}}\n'.encode()
            response = _upload(api, content)
            answers.append(response.status_code)
            if response.status_code == 200:
                accepted[response.json()["id"]] = content
            else:
                assert response.status_code == 503 and response.headers.get("Retry-After"), response.text
            i += 1
            time.sleep(0.1)

    threads = [threading.Thread(target=load, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        s3_server.stop()
        time.sleep(5)
    finally:
        s3_server.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and answers[-2:] != [200, 200]:
        time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    assert set(answers) <= {200, 503} and 503 in answers and answers[-1] == 200, answers
    for file_id, content in accepted.items():
        assert api.client.get(f"/v1/files/{file_id}/content", headers=api.headers()).content == content
