"""Forward inference requests to the inference replicas, streaming included."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from core.errors import ApiError, error_response
from core.schemas.inference import AdapterRef
from core.settings import get_settings

log = logging.getLogger("patchbay.forward")
ADAPTER_HEADER = "X-Patchbay-Adapter"
_round_robin = itertools.count()
_client: httpx.AsyncClient | None = None


def _http() -> httpx.AsyncClient:
    global _client
    if _client is None:
        _client = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5))
    return _client


def replica_order() -> list[str]:
    """Every replica, starting at the next in round-robin order."""
    urls = get_settings().inference_urls
    start = next(_round_robin) % len(urls)
    return urls[start:] + urls[:start]


def adapter_headers(adapter: AdapterRef | None) -> dict[str, str]:
    """Headers that tell the inference server which adapter version serves the request."""
    return {ADAPTER_HEADER: adapter.model_dump_json()} if adapter else {}


async def forward(path: str, body: dict, headers: dict[str, str], stream: bool) -> Response:
    """POST `body` to the first replica that answers; stream the answer back as it comes."""
    last_error: Exception | None = None
    for base_url in replica_order():
        request = _http().build_request("POST", f"{base_url}{path}", json=body, headers=headers)
        try:
            upstream = await _http().send(request, stream=True)
        except httpx.TransportError as exc:
            last_error = exc
            log.warning("inference replica %s unreachable: %s", base_url, exc)
            continue
        if stream and upstream.status_code == 200:
            return StreamingResponse(_relay(upstream), status_code=200, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        content = await upstream.aread()
        await upstream.aclose()
        try:
            return JSONResponse(json.loads(content), status_code=upstream.status_code)
        except json.JSONDecodeError:
            return error_response(502, "The inference server gave an unreadable answer.", None, "bad_gateway")
    reason = last_error.__class__.__name__ if last_error else "none configured"
    raise ApiError(503, f"No inference server is reachable ({reason}).", code="inference_unavailable")


async def broadcast(path: str, body: dict) -> list[dict]:
    """POST to every replica (runtime adapter loading); returns each replica's answer."""
    answers = []
    for base_url in get_settings().inference_urls:
        try:
            response = await _http().post(f"{base_url}{path}", json=body)
            answers.append({"replica": base_url, "status": response.status_code, "body": response.json()})
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            answers.append({"replica": base_url, "status": 503, "body": {"error": str(exc)}})
    return answers


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    finally:
        await upstream.aclose()
