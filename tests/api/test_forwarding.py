"""`api.forwarding` against real replicas: answers and streams relayed, usage counted, dead replicas skipped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from api import forwarding
from core import sse
from core.errors import ApiError
from core.schemas.inference import InternalUnloadAdapter
from core.settings import get_settings
from core.sse import DONE, ServerSentEvent, event_stream
from tests.support.live_server import live_server
from tests.support.services import free_port

CHUNKS = [{"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": word}}]}
          for word in ("Hello", " there")]
USAGE = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
         "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}


def _replica(received: list[dict]) -> FastAPI:
    """An inference server stand-in: it streams CHUNKS (pausing between them) and a usage chunk when asked."""
    app = FastAPI()

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
def replica(monkeypatch) -> Iterator[tuple[str, list[dict]]]:
    """A live replica behind a dead one; yields (its URL, the requests it received)."""
    received: list[dict] = []
    with live_server(_replica(received)) as url:
        monkeypatch.setenv("PATCHBAY_INFERENCE_URL", f"http://127.0.0.1:{free_port()},{url}")
        get_settings.cache_clear()
        yield url, received
    get_settings.cache_clear()


def _run(coroutine):
    """Run one test's requests in a fresh event loop, closing the module's client in it afterwards."""
    async def main():
        try:
            return await coroutine
        finally:
            if forwarding._client is not None:
                await forwarding._client.aclose()
                forwarding._client = None

    return asyncio.run(main())


async def _forwarded(path: str, body: dict, *, stream: bool = False, on_usage=None,
                     headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    """Forward a request and send the answer on: (status, content type, body)."""
    return await _read(await forwarding.forward(path, body, headers or {}, stream, on_usage))


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
        answer = await _forwarded("/v1/chat/completions", {"model": "m"}, on_usage=on_usage,
                                  headers={forwarding.ADAPTER_HEADER: "ref"})
        return answer, await _forwarded("/v1/missing", {"model": "m"})

    (status, content_type, body), (missing_status, _, missing_body) = _run(both())
    assert status == 200 and content_type == "application/json"
    assert json.loads(body)["choices"][0]["message"]["content"] == "Hello there"
    assert counted == [2] and received[0]["adapter"] == "ref"
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


def test_an_unreadable_answer_is_a_502_and_no_replica_a_503(replica, monkeypatch):
    status, _, body = _run(_forwarded("/v1/garbled", {"model": "m"}))
    assert status == 502 and json.loads(body)["error"]["code"] == "bad_gateway"
    monkeypatch.setenv("PATCHBAY_INFERENCE_URL", f"http://127.0.0.1:{free_port()}")
    get_settings.cache_clear()
    with pytest.raises(ApiError) as refused:
        _run(forwarding.forward("/v1/chat/completions", {"model": "m"}, {}, False))
    assert refused.value.status == 503 and refused.value.code == "inference_unavailable"
    assert refused.value.headers["Retry-After"] == "5"


def test_broadcast_asks_every_replica_and_reports_each_answer(replica):
    url, _ = replica
    answers = _run(forwarding.broadcast("/internal/adapters/unload", InternalUnloadAdapter(adapter_id="adp-1")))
    dead, live = answers
    assert dead["status"] == 503 and "error" in dead["body"]
    assert live == {"replica": url, "status": 200, "body": {"echo": {"adapter_id": "adp-1"}}}
