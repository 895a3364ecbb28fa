"""Forward inference requests to the replicas of their base model, streaming included.

`api/fleet.py` picks the replicas and their order; a replica that cannot be reached (or, for an
answer not streamed, breaks off while answering) is marked suspect and the next one is tried, and so
is the next after a 503 (a replica busy for now); the last candidate's answer is the client's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from fastapi.responses import JSONResponse, Response

from api.fleet import get_fleet
from api.replica_tracker import Attempt
from api.upstream_client import upstream_client
from core.errors import error_response, unavailable
from core.schemas.inference import AdapterRef
from core.schemas.replicas import ReplicaPublic
from core.sse import ServerSentEvent, event_stream, read_events

log = logging.getLogger("patchbay.forward")
ADAPTER_HEADER = "X-Patchbay-Adapter"
RETRY_AFTER_SECONDS = 5

UsageHook = Callable[[int], Awaitable[None]]
"""Told how many tokens a forwarded request generated (the tokens-per-minute limit)."""


def adapter_headers(adapter: AdapterRef | None) -> dict[str, str]:
    """Headers that tell the inference server which adapter version serves the request."""
    return {ADAPTER_HEADER: adapter.model_dump_json()} if adapter else {}


class _Unreachable(Exception):
    """The replica could not be reached, or broke off before its whole answer came."""


async def forward(path: str, body: dict, base_model: str, adapter: AdapterRef | None, stream: bool,
                  on_usage: UsageHook | None = None) -> Response:
    """POST `body` to the best replica of `base_model` for `adapter` that answers; stream its answer back.

    Routing errors come from `Fleet.route` (503 `no_replica` or `replica_loading`, 400
    `adapter_kind_unserved`); when no candidate is reachable, 503 `inference_unavailable`. With
    `on_usage`, the generated token count is reported once the answer is complete; a stream then asks
    the replica for its usage chunk, and drops it again unless the client asked for it too.
    """
    client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if stream and on_usage is not None:
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
    fleet = get_fleet()
    headers = adapter_headers(adapter)
    last_error: Exception | None = None
    candidates = await fleet.route(base_model, adapter)
    for index, replica in enumerate(candidates):
        attempt = Attempt(fleet.tracker, replica, adapter.id if adapter else None)
        try:
            response = await _forward_to(replica, attempt, path, body, headers, stream, on_usage, client_wants_usage)
            if response.status_code == 503 and index + 1 < len(candidates):
                # Busy for now (slots held, engine restarting): another replica of the base may answer.
                log.info("inference replica %s (%s) answered 503; trying the next", replica.id, replica.url)
                continue
            return response
        except _Unreachable as exc:
            attempt.failed()
            last_error = exc.__cause__
            log.warning("inference replica %s (%s) failed: %r", replica.id, replica.url, last_error)
        except BaseException:
            attempt.close()
            raise
    reason = last_error.__class__.__name__ if last_error else "none answered"
    raise unavailable(f"No inference replica of the base model '{base_model}' is reachable ({reason}).",
                      "inference_unavailable", RETRY_AFTER_SECONDS)


async def _forward_to(replica: ReplicaPublic, attempt: Attempt, path: str, body: dict, headers: dict[str, str],
                      stream: bool, on_usage: UsageHook | None, client_wants_usage: bool) -> Response:
    client = upstream_client()
    try:
        upstream = await client.send(client.build_request("POST", f"{replica.url}{path}", json=body,
                                                          headers=headers), stream=True)
    except httpx.TransportError as exc:
        raise _Unreachable() from exc
    if stream and upstream.status_code == 200:
        attempt.answered(200)
        return event_stream(_relay(upstream, on_usage, client_wants_usage),
                            on_close=lambda: _release(upstream, attempt))
    try:
        content = await upstream.aread()
    except httpx.TransportError as exc:
        raise _Unreachable() from exc
    finally:
        await upstream.aclose()
    attempt.answered(upstream.status_code)
    attempt.close()
    try:
        answer = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(502, "The inference server gave an unreadable answer.", None, "bad_gateway")
    if on_usage is not None and upstream.status_code == 200:
        await on_usage(_completion_tokens(answer))
    retry_after = upstream.headers.get("retry-after")
    return JSONResponse(answer, status_code=upstream.status_code,
                        headers={"Retry-After": retry_after} if retry_after else None)


async def _release(upstream: httpx.Response, attempt: Attempt) -> None:
    """The stream is over: its connection closed (again, if the relay ran) and its replica's count released."""
    await upstream.aclose()
    attempt.close()


def _completion_tokens(answer) -> int:
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    return tokens if isinstance(tokens, int) and tokens > 0 else 0


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
