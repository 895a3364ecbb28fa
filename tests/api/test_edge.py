"""The ASGI edge on a real uvicorn server: request ids, stalled and oversize bodies, and keep-alive after a 500."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.live_server import live_server


@pytest.fixture
def server(api_with) -> Iterator[tuple[str, str]]:
    """The API under uvicorn in a thread (1 s body idle timeout), with a route that fails; yields (url, key)."""
    harness = api_with(BODY_IDLE_TIMEOUT_SECONDS="1")
    app = harness.client.app

    @app.get("/v1/broken")
    def broken() -> dict:
        raise RuntimeError("a bug")

    with live_server(app) as url:
        yield url, harness.key


def _raw_request(url: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head + body)
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    sock.settimeout(timeout)
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def test_a_500_quotes_its_request_id_and_keeps_the_connection_usable(server):
    url, key = server
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        failed = client.get("/v1/broken")
        assert failed.status_code == 500
        request_id = failed.headers["x-request-id"]
        assert request_id.startswith("req_") and request_id in failed.json()["error"]["message"]
        assert failed.headers.get("connection") != "close"
        after = client.get("/v1/files")  # the same keep-alive connection
        assert after.status_code == 200 and after.headers["x-request-id"] != request_id


def test_a_stalled_body_is_cut_off_with_408_and_the_socket_closed(server):
    url, key = server
    head = (f"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    sock = _raw_request(url, head, b'{"model": ')
    data, waited = _read_until_closed(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 408") and b"body_timeout" in data
    assert b"connection: close" in data.lower()
    assert 0.8 < waited < 5


def test_a_stalled_upload_is_cut_off_and_leaves_no_slot_held(server):
    url, key = server
    head = (f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{"text": "hi"'
    sock = _raw_request(url, head, f"{len(part):x}\r\n".encode() + part + b"\r\n")
    data, _ = _read_until_closed(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 408")
    from api.team_slots import UPLOADS

    assert UPLOADS.held() == 0


def test_a_chunked_json_body_over_the_limit_gets_413_at_once(server):
    url, key = server
    head = (f"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    sock = _raw_request(url, head)
    chunk = b"x" * 65536
    sent = 0
    try:
        # Stop as soon as the answer arrives (never past 8 MB), so the reset of an unread upload never
        # swallows it.
        while sent < 8 * 1024 * 1024 and not select.select([sock], [], [], 0.01)[0]:
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sent += len(chunk)
    except OSError:
        pass  # the server answered and closed while we were still sending
    data, _ = _read_until_closed(sock, timeout=10)
    assert data.startswith(b"HTTP/1.1 413") and b"request_too_large" in data
    assert sent < 4 * 1024 * 1024
