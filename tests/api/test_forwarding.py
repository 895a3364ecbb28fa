"""`api.forwarding` against real replicas: answers and streams relayed, usage counted, dead replicas skipped.

The stand-in is a static replica (PATCHBAY_INFERENCE_URL, asked at `GET /status`) beside a dead one, over
a real migrated database that holds no registered replica unless a test adds one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from api import forwarding
from api.adapter_broadcast import unload_everywhere
from api.upstream_client import close_upstream_client
from core import sse
from core.db import session_scope
from core.errors import ApiError
from core.replicas import announce_replica
from core.schemas.inference import AdapterRef
from core.schemas.replicas import ReplicaStatus
from core.sse import DONE, ServerSentEvent, event_stream
from tests.support.api_app import clear_caches
from tests.support.live_server import live_server
from tests.support.migrated import migrated_database
from tests.support.services import free_port

BASE = "tiny"
ADAPTER = AdapterRef(id="adp-1", storage_key="adapters/adp-1", sha256="0" * 64, base_model=BASE)

CHUNKS = [{"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
          for word in ("Hello", " there")]
USAGE = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _status(url: str) -> ReplicaStatus:
    return ReplicaStatus(url=url, base_model=BASE, engine="patchbay", state="ready", kinds=["lora"],
                         max_resident_adapters=2, max_batch=4)


def _replica(received: list[dict]) -> FastAPI:
    """An inference server stand-in: it streams CHUNKS (pausing between them) and a usage chunk when asked."""
    app = FastAPI()

    @app.get("/status")
    async def status(request: Request) -> dict:
        return _status(str(request.base_url).rstrip("/")).model_dump()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        received.append({"body": body, "adapter": request.headers.get(forwarding.ADAPTER_HEADER)})
        if not body.get("stream"):
            return JSONResponse({"choices": [{"index": 0, "message": {"content": "Hello there"}}],
                                 "usage": USAGE["usage"]})

        async def events():
            for chunk in CHUNKS:
                yield chunk
                await asyncio.sleep(body.get("pause", 0))
            yield ServerSentEvent(comment="the replica's own comment")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield USAGE
            yield DONE

        return event_stream(events())

    @app.post("/v1/missing")
    async def missing() -> JSONResponse:
        return JSONResponse({"error": {"message": "no such model", "code": "model_not_found"}}, status_code=404)

    @app.post("/v1/garbled")
    async def garbled() -> PlainTextResponse:
        return PlainTextResponse("<html>oops</html>")

    @app.post("/internal/adapters/unload")
    async def unload(request: Request) -> dict:
        return {"echo": await request.json()}

    return app


@pytest.fixture
def replica(tmp_path) -> Iterator[tuple[str, list[dict]]]:
    """A live static replica behind a dead one; yields (its URL, the requests it received)."""
    received: list[dict] = []
    with live_server(_replica(received)) as url:
        with migrated_database(tmp_path, PATCHBAY_INFERENCE_URL=f"http://127.0.0.1:{free_port()},{url}"):
            yield url, received


def _dead_registered_replica() -> None:
    with session_scope() as session:
        announce_replica(session, "dead", _status(f"http://127.0.0.1:{free_port()}"))


def _run(coroutine):
    """Run one test's requests in a fresh event loop, closing the pooled client in it afterwards."""
    async def main():
        try:
            return await coroutine
        finally:
            await close_upstream_client()

    return asyncio.run(main())


async def _forwarded(path: str, body: dict, *, stream: bool = False, on_usage=None,
                     adapter: AdapterRef | None = None) -> tuple[int, str, bytes]:
    """Forward a request and send the answer on: (status, content type, body)."""
    return await _read(await forwarding.forward(path, body, BASE, adapter, stream, on_usage))


async def _read(response) -> tuple[int, str, bytes]:
    """Send the response as an ASGI app would: (status, content type, body)."""
    start, body = {}, []

    async def receive() -> dict:
        await asyncio.Event().wait()  # the client stays
        return {}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        else:
            body.append(message.get("body", b""))

    await response({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}}, receive, send)
    content_type = dict(start["headers"]).get(b"content-type", b"").decode()
    return start["status"], content_type, b"".join(body)


def _data_lines(body: bytes) -> list[str]:
    return [line for line in body.decode().split("\n") if line.startswith("data: ")]


def _counter() -> tuple[list[int], forwarding.UsageHook]:
    counted: list[int] = []

    async def on_usage(tokens: int) -> None:
        counted.append(tokens)

    return counted, on_usage


def test_an_answer_is_relayed_with_its_status_and_usage_counted(replica):
    _, received = replica
    counted, on_usage = _counter()

    async def both():
        answer = await _forwarded("/v1/chat/completions", {"model": "m"}, on_usage=on_usage, adapter=ADAPTER)
        return answer, await _forwarded("/v1/missing", {"model": "m"})

    (status, content_type, body), (missing_status, _, missing_body) = _run(both())
    assert status == 200 and content_type == "application/json"
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello there"
    assert counted == [2] and AdapterRef.model_validate_json(received[0]["adapter"]) == ADAPTER
    assert missing_status == 404 and json.loads(missing_body)["error"]["code"] == "model_not_found"


def test_a_stream_is_relayed_frame_for_frame(replica):
    status, content_type, body = _run(_forwarded("/v1/chat/completions", {"model": "m", "stream": True}, stream=True))
    assert status == 200 and content_type.startswith("text/event-stream")
    assert _data_lines(body) == [f"data: {json.dumps(c)}" for c in CHUNKS] + ["data: [DONE]"]
    assert body.endswith(b"data: [DONE]\n\n") and b"the replica's own comment" not in body


def _stream(body: dict, on_usage=None):
    return _forwarded("/v1/chat/completions", {"model": "m", "stream": True, **body}, stream=True, on_usage=on_usage)


def test_a_stream_counts_its_usage_and_keeps_the_usage_chunk_only_when_asked(replica):
    _, received = replica
    counted, on_usage = _counter()
    _, _, unasked = _run(_stream({}, on_usage))
    _, _, asked = _run(_stream({"stream_options": {"include_usage": True}}, on_usage))
    assert received[0]["body"]["stream_options"] == {"include_usage": True}  # asked of the replica for counting
    assert _data_lines(unasked) == [f"data: {json.dumps(c)}" for c in CHUNKS] + ["data: [DONE]"]
    assert _data_lines(asked) == [f"data: {json.dumps(c)}" for c in (*CHUNKS, USAGE)] + ["data: [DONE]"]
    assert counted == [2, 2]


def test_a_quiet_stream_is_kept_alive_with_the_relays_own_pings(replica, monkeypatch):
    monkeypatch.setattr(sse, "PING_SECONDS", 0.1)
    _, _, body = _run(_stream({"pause": 0.45}))
    frames = body.split(b"\n\n")[:-1]
    assert frames.count(b": ping") >= 4  # the replica's pings stay behind; the relay's own go out
    assert [f for f in frames if f != b": ping"] == [f"data: {json.dumps(c)}".encode() for c in CHUNKS] + \
        [b"data: [DONE]"]


def test_an_unreadable_answer_is_a_502_and_no_reachable_replica_a_503(replica, monkeypatch):
    status, _, body = _run(_forwarded("/v1/garbled", {"model": "m"}))
    assert status == 502 and json.loads(body)["error"]["code"] == "bad_gateway"
    _dead_registered_replica()
    monkeypatch.setenv("PATCHBAY_INFERENCE_URL", "")
    clear_caches()
    with pytest.raises(ApiError) as refused:
        _run(forwarding.forward("/v1/chat/completions", {"model": "m"}, BASE, None, False))
    assert refused.value.status == 503 and refused.value.code == "inference_unavailable"
    assert refused.value.headers["Retry-After"] == "5"


def test_a_static_replica_that_does_not_answer_its_status_is_not_routed_to(replica, monkeypatch):
    monkeypatch.setenv("PATCHBAY_INFERENCE_URL", f"http://127.0.0.1:{free_port()}")
    clear_caches()
    with pytest.raises(ApiError) as refused:
        _run(forwarding.forward("/v1/chat/completions", {"model": "m"}, BASE, None, False))
    assert refused.value.status == 503 and refused.value.code == "no_replica"


def test_unloading_asks_every_replica_of_the_base_and_reports_each_answer(replica):
    url, _ = replica
    _dead_registered_replica()
    dead, live = _run(unload_everywhere(ADAPTER))
    assert dead["replica_id"] == "dead" and dead["status"] == 503 and "error" in dead["body"]
    assert live == {"replica": url, "replica_id": f"static:{url}", "status": 200,
                    "body": {"echo": {"adapter_id": "adp-1"}}}
