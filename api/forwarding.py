"""Forward inference requests to the inference replicas, streaming included."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from core.errors import error_response, unavailable
from core.schemas.inference import AdapterRef
from core.settings import get_settings
from core.sse import ServerSentEvent, event_stream, read_events

log = logging.getLogger("patchbay.forward")
ADAPTER_HEADER = "X-Patchbay-Adapter"
_round_robin = itertools.count()
_client: httpx.AsyncClient | None = None
_client_loop: asyncio.AbstractEventLoop | None = None


def _http() -> httpx.AsyncClient:
    """The pooled client of the running event loop (a server runs one loop; its connections belong to it)."""
    global _client, _client_loop
    loop = asyncio.get_running_loop()
    if _client is None or _client_loop is not loop:
        _client, _client_loop = httpx.AsyncClient(timeout=httpx.Timeout(600, connect=5)), loop
    return _client


def replica_order() -> list[str]:
    """Every replica, starting at the next in round-robin order."""
    urls = get_settings().inference_urls
    start = next(_round_robin) % len(urls)
    return urls[start:] + urls[:start]


def adapter_headers(adapter: AdapterRef | None) -> dict[str, str]:
    """Headers that tell the inference server which adapter version serves the request."""
    return {ADAPTER_HEADER: adapter.model_dump_json()} if adapter else {}


UsageHook = Callable[[int], Awaitable[None]]
"""Told how many tokens a forwarded request generated (the tokens-per-minute limit)."""


async def forward(path: str, body: dict, headers: dict[str, str], stream: bool,
                  on_usage: UsageHook | None = None) -> Response:
    """POST `body` to the first replica that answers; stream the answer back as it comes.

    With `on_usage`, the generated token count is reported once the answer is complete; a stream then
    asks the replica for its usage chunk, and drops it again unless the client asked for it too.
    """
    client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if stream and on_usage is not None:
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
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
            return event_stream(_relay(upstream, on_usage, client_wants_usage))
        try:
            content = await upstream.aread()
        except httpx.TransportError as exc:
            last_error = exc
            continue
        finally:
            await upstream.aclose()
        try:
            answer = json.loads(content)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(502, "The inference server gave an unreadable answer.", None, "bad_gateway")
        if on_usage is not None and upstream.status_code == 200:
            await on_usage(_completion_tokens(answer))
        return JSONResponse(answer, status_code=upstream.status_code)
    reason = last_error.__class__.__name__ if last_error else "none configured"
    raise unavailable(f"No inference server is reachable ({reason})", "inference_unavailable", retry_after=5)


def _completion_tokens(answer) -> int:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and tokens > 0 else 0


async def broadcast(path: str, body: BaseModel) -> list[dict]:
    """POST to every replica (runtime adapter loading); returns each replica's answer."""
    answers = []
    for base_url in get_settings().inference_urls:
        try:
            response = await _http().post(f"{base_url}{path}", json=body.model_dump(mode="json"))
            answers.append({"replica": base_url, "status": response.status_code, "body": response.json()})
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            answers.append({"replica": base_url, "status": 503, "body": {"error": str(exc)}})
    return answers


async def _relay(upstream: httpx.Response, on_usage: UsageHook | None,
                 client_wants_usage: bool) -> AsyncIterator[ServerSentEvent]:
    """The replica's events; note the usage chunk's token count, keeping the chunk only if the client asked.

    The replica's keep-alive comments stay behind: the relay sends its own.
    """
    tokens = 0
    try:
        async for event in read_events(upstream.aiter_bytes()):
            usage_tokens = _usage_event_tokens(event.raw_data or "") if on_usage is not None else None
            tokens += usage_tokens or 0
            if usage_tokens is None or client_wants_usage:
                yield event
    finally:
        await upstream.aclose()
        if on_usage is not None and tokens:
            await on_usage(tokens)


def _usage_event_tokens(data: str) -> int | None:
    """The completion tokens of a usage-only chunk, or None for any other event."""
    if '"usage"' not in data or not data.startswith("{"):
        return None
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict) or payload.get("choices") or not isinstance(payload.get("usage"), dict):
        return None
    return _completion_tokens(payload)
