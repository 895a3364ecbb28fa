"""One team can't stall another: concurrency on the embedded default, stalled uploads, heavy checks, crashes.

Every test runs a real `patchbay api` process on 127.0.0.1, with bounded counts and times.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import socket
import tarfile
import time

import httpx
import pytest

from core.temporaries import TEMP_PREFIX
from tests.support.datasets import chat_lines, to_jsonl
from tests.support.services import LatencyProbe, embedded_urls, make_stack

pytestmark = pytest.mark.slow


def _stack(tmp_path, tiny_model_dir, database_url=None, broker_url=None, **env):
    sqlite_db, sqlite_broker = embedded_urls(tmp_path)
    stack = make_stack(tmp_path, database_url or sqlite_db, broker_url or sqlite_broker, tiny_model_dir, **env)
    return stack


def _team_keys(stack, count: int) -> list[str]:
    return [stack.cli("team", "create", f"team-{i}").splitlines()[-1] for i in range(count)]


def test_embedded_default_serves_20_uploads_and_20_job_creates_at_once(tmp_path, tiny_model_dir):
    stack = _stack(tmp_path, tiny_model_dir)
    stack.start_api()
    keys = _team_keys(stack, 5)
    dataset = to_jsonl(chat_lines(600))  # about 180 KB
    try:
        with httpx.Client(base_url=stack.base_url, timeout=30) as client:
            files = {key: client.post("/v1/files", headers={"Authorization": f"Bearer {key}"},
                                      data={"purpose": "fine-tune"},
                                      files={"file": ("t.jsonl", dataset)}).json()["id"] for key in keys}

        async def upload(client, key):
            return await client.post("/v1/files", headers={"Authorization": f"Bearer {key}"},
                                     data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", dataset)})

        async def create(client, key):
            return await client.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"},
                                     json={"model": "tiny-llama", "training_file": files[key]})

        async def burst():
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=60,
                                         limits=httpx.Limits(max_connections=50)) as client:
                calls = [upload(client, keys[i % 5]) for i in range(20)] + [create(client, keys[i % 5])
                                                                          for i in range(20)]
                return await asyncio.gather(*calls)

        with LatencyProbe(f"{stack.base_url}/healthz", interval=0.02) as probe:
            started = time.monotonic()
            responses = asyncio.run(burst())
            elapsed = time.monotonic() - started
        statuses = [r.status_code for r in responses]
        assert all(s == 200 or (s == 429 and r.headers.get("retry-after")) for s, r in zip(statuses, responses)), \
            [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
        assert statuses.count(200) >= 30 and elapsed < 60, (statuses, elapsed)
        assert probe.failures == [] and probe.worst < 1.0 and probe.samples >= 1, (probe.worst, probe.failures)
    finally:
        stack.stop()


def test_more_concurrent_writers_than_threads_never_wait_on_each_other(tmp_path, tiny_model_dir):
    """80 job creates at once: more than the threadpool's 40 threads and the pool's 40 connections."""
    stack = _stack(tmp_path, tiny_model_dir)
    stack.start_api()
    try:
        with stack.client() as client:
            file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                                  files={"file": ("t.jsonl", to_jsonl(chat_lines(4)))}).json()["id"]

        async def burst():
            async with httpx.AsyncClient(base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.key}"},
                                         timeout=60, limits=httpx.Limits(max_connections=80)) as client:
                return await asyncio.gather(*[client.post("/v1/fine_tuning/jobs", json={
                    "model": "tiny-llama", "training_file": file_id}) for _ in range(80)])

        started = time.monotonic()
        responses = asyncio.run(burst())
        elapsed = time.monotonic() - started
        failed = [r.text[:200] for r in responses if r.status_code != 200]
        assert failed == [], failed
        assert elapsed < 25, elapsed  # a writer waiting on a thread held by another would take 30 s (busy timeout)
    finally:
        stack.stop()


def _stall_upload(stack, key: str) -> socket.socket:
    """A socket that starts `POST /v1/files`, sends half a part, and then says nothing."""
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=60)
    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n").encode()
    sock.sendall(head + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"te')
    return sock


def _answer(sock: socket.socket) -> tuple[bytes, float]:
    """What the server said before closing the socket, and when it closed (monotonic)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_stalled_uploads_of_one_team_never_stall_another(tmp_path, tiny_model_dir, request, backend):
    urls = (request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url")) \
        if backend == "postgres" else (None, None)
    stack = _stack(tmp_path, tiny_model_dir, *urls, PATCHBAY_BODY_IDLE_TIMEOUT_SECONDS="5")
    stack.start_api()
    stalling, other = _team_keys(stack, 2)
    try:
        with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {other}"},
                          timeout=10) as client:
            file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                                  files={"file": ("t.jsonl", to_jsonl(chat_lines(4)))}).json()["id"]
            sockets = [_stall_upload(stack, stalling) for _ in range(30)]
            opened = time.monotonic()
            time.sleep(1)
            for _ in range(5):
                for call in (lambda: client.get("/v1/files"),
                             lambda: client.post("/v1/fine_tuning/jobs",
                                                 json={"model": "tiny-llama", "training_file": file_id}),
                             lambda: client.get("/readyz")):
                    started = time.monotonic()
                    response = call()
                    assert response.status_code == 200, response.text
                    assert time.monotonic() - started < 2
            answers = [_answer(sock) for sock in sockets]
        statuses = sorted(data.split(b" ", 2)[1] for data, _ in answers)
        assert statuses == [b"408"] * 4 + [b"429"] * 26, statuses  # four upload slots per team, the rest refused
        cut_off = [closed - opened for data, closed in answers if b" 408 " in data[:20]]
        assert all(4 < t < 12 for t in cut_off), cut_off
    finally:
        stack.stop()


def _bomb() -> bytes:
    """A small tar.gz whose first member declares 2 GiB (only a little of it follows)."""
    info = tarfile.TarInfo("adapter/adapter_model.safetensors")
    info.size = 2 * 1024**3
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb") as gz:
        gz.write(header)
        gz.write(b"\0" * (64 * 1024 * 1024))
    return raw.getvalue()


def test_healthz_stays_fast_while_a_bomb_and_a_64_mb_line_are_checked(tmp_path, tiny_model_dir):
    stack = _stack(tmp_path, tiny_model_dir)
    stack.start_api()
    big_line = b'{"text": "' + b"lorem ipsum " * (64 * 1024 * 1024 // 12) + b'"}\n'
    try:
        with LatencyProbe(f"{stack.base_url}/healthz", interval=0.05) as probe, stack.client() as client:
            for _ in range(2):
                bomb = client.post("/v1/adapters/import", data={"name": "bomb", "base_model": "tiny-llama"},
                                   files={"file": ("bomb.tar.gz", _bomb())})
                assert bomb.status_code == 400 and bomb.json()["error"]["code"] == "invalid_archive", bomb.text
                uploaded = client.post("/v1/files", data={"purpose": "fine-tune"},
                                       files={"file": ("big.jsonl", big_line)})
                assert uploaded.status_code == 200 and uploaded.json()["status"] == "processed", uploaded.text
        assert probe.failures == [] and probe.samples >= 5, probe.failures
        assert probe.worst < 0.5, probe.worst
    finally:
        stack.stop()


def test_kill_9_mid_upload_leaves_no_orphan_after_the_next_start(tmp_path, tiny_model_dir):
    stack = _stack(tmp_path, tiny_model_dir)
    api = stack.start_api()
    storage = tmp_path / "data" / "storage"
    try:
        with stack.client() as client:
            kept = [client.post("/v1/files", data={"purpose": "fine-tune"},
                                files={"file": (f"{i}.jsonl", to_jsonl(chat_lines(50, seed=i)))}).json()
                    for i in range(3)]
        sock = socket.create_connection(("127.0.0.1", stack.port), timeout=30)
        sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {stack.key}\r\n"
                      "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 10000000\r\n\r\n"
                      '--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n').encode()
                     + to_jsonl(chat_lines(20000)))  # about 3 MB of the announced 10
        deadline = time.monotonic() + 20
        while not [p for p in (storage / TEMP_PREFIX).rglob("*") if p.is_file()] and time.monotonic() < deadline:
            time.sleep(0.1)
        partial = [p for p in (storage / TEMP_PREFIX).rglob("*") if p.is_file()]
        assert partial, "the upload never reached storage"
        stack.kill(api)
        sock.close()
        assert all(p.exists() for p in partial)  # the dead process left its temporary behind
        stack.processes.remove(api)
        stack.start_api()  # its sweep at start removes what the dead process left
        deadline = time.monotonic() + 20
        while any(p.exists() for p in partial) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(p.exists() for p in partial)
        with stack.client() as client:
            listed = client.get("/v1/files").json()["data"]
            assert sorted(f["id"] for f in listed) == sorted(f["id"] for f in kept)
            for row in kept:
                content = client.get(f"/v1/files/{row['id']}/content").content
                assert hashlib.sha256(content).hexdigest() == row["sha256"]
        assert sorted(p.name for p in (storage / "files").iterdir()) == sorted(f"{f['id']}.jsonl" for f in kept)
    finally:
        stack.stop()
