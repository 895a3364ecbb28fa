"""A 300 MB upload streams to S3 (multipart) without growing the API process: measured on a real `patchbay api`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.datasets import chat_lines, to_jsonl
from tests.support.services import embedded_urls, make_stack

UPLOAD_BYTES = 300 * 1024 * 1024
BOUNDARY = "patchbay-memory-test"


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _body(block: bytes, total: int) -> Iterator[bytes]:
    yield (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
           f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
           "Content-Type: application/jsonl\r\n\r\n").encode()
    sent = 0
    while sent < total:
        yield block
        sent += len(block)
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.mark.slow
def test_a_300_mb_upload_to_s3_keeps_the_api_small(tmp_path, tiny_model_dir, s3_server, s3_env):
    database, broker = embedded_urls(tmp_path)
    stack = make_stack(tmp_path, database, broker, tiny_model_dir, **s3_env,
                       PATCHBAY_MAX_UPLOAD_BYTES=str(UPLOAD_BYTES + 2**20), PATCHBAY_RUN_DISPATCHER="false")
    api = stack.start_api()
    try:
        with stack.client() as client:
            warmup = client.post("/v1/files", data={"purpose": "fine-tune"},
                                 files={"file": ("w.jsonl", to_jsonl(chat_lines(3)), "application/jsonl")})
            assert warmup.status_code == 200, warmup.text
            time.sleep(1)
            idle_kib = _kib(api.pid, "VmRSS")
            line = to_jsonl(chat_lines(1))
            block = line * (2**20 // len(line))
            total = (UPLOAD_BYTES // len(block)) * len(block)
            response = client.post("/v1/files", content=_body(block, total), timeout=600,
                                   headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["bytes"] == total and body["status"] == "processed", body
            peak_kib = _kib(api.pid, "VmHWM")
        grown_mb = (peak_kib - idle_kib) / 1024
        print(f"API RSS: {idle_kib / 1024:.0f} MB idle, peak {peak_kib / 1024:.0f} MB during a {total >> 20} MB upload")
        assert grown_mb < 200, f"the API grew {grown_mb:.0f} MB above idle during a 300 MB upload"
        bucket, prefix = s3_env["PATCHBAY_STORAGE_URL"].removeprefix("s3://").split("/", 1)
        head = s3_server.client().head_object(Bucket=bucket, Key=f"{prefix}/files/{body['id']}.jsonl")
        assert head["ContentLength"] == total
        assert not list((stack.data_dir / "storage").rglob("*.jsonl"))  # nothing on the API's disk
    finally:
        stack.stop()
