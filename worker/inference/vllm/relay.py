"""Requests to vLLM's server and its answers back, as they come: the client's fields pass through unchanged.

The one change on the way in is `model` (vLLM knows an adapter by its version id, the base by its id);
on the way out, the `model` of the answer and of every stream chunk is the name the client asked for.
Everything else (sampling fields, `n`, `stop`, `seed`, `logprobs`, usage, stream options) is vLLM's to
handle. vLLM's error objects come back as ours, with vLLM's status.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response

from core.errors import ApiError, error_response
from core.sse import Event, event_stream, read_events

TIMEOUT = httpx.Timeout(600, connect=5)
_CODES = {"NotFoundError": "not_found", "BadRequestError": "invalid_value", "InvalidUserInput": "invalid_value"}


class VllmRelay:
    """A pooled HTTP client of vLLM's server (create and close it on the event loop that uses it)."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._client = httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT)

    async def send(self, path: str, body: dict) -> httpx.Response:
        """POST `body` and return the answer unread (its body may be a stream); 503 when vLLM is unreachable."""
        request = self._client.build_request("POST", path, json=body)
        try:
            return await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ApiError(503, f"vLLM is not reachable on this replica ({exc.__class__.__name__}); retry.",
                           code="engine_unavailable", headers={"Retry-After": "2"}) from exc

    async def close(self) -> None:
        await self._client.aclose()


def is_stream(upstream: httpx.Response) -> bool:
    """Whether vLLM answered with Server-Sent Events."""
    return upstream.status_code == 200 and upstream.headers.get("content-type", "").startswith("text/event-stream")


async def read_json(upstream: httpx.Response) -> Any:
    """The whole answer as JSON (None when it is not JSON); the connection is released."""
    try:
        content = await upstream.aread()
    except httpx.TransportError as exc:
        raise ApiError(502, f"vLLM's answer was cut off ({exc.__class__.__name__}).", code="bad_gateway") from exc
    finally:
        await upstream.aclose()
    try:
        return json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def missing_model(status: int, payload: Any) -> bool:
    """Whether vLLM says it does not know the requested model (an adapter it dropped)."""
    error = _error_of(payload)
    return status == 404 and error.get("param") in ("model", None) and "does not exist" in str(error.get("message"))


def json_answer(status: int, payload: Any, model: str) -> Response:
    """vLLM's whole answer with the client's model name, or its error as our error object."""
    if status != 200:
        return error_answer(status, payload)
    if not isinstance(payload, dict):
        return error_response(502, "vLLM gave an unreadable answer.", None, "bad_gateway")
    return JSONResponse(_renamed(payload, model))


def error_answer(status: int, payload: Any) -> JSONResponse:
    """One of vLLM's error objects as OpenAI's (ours): its message and param, with vLLM's status."""
    error = _error_of(payload)
    kind = str(error.get("type") or "")
    message = str(error.get("message") or f"vLLM answered {status}.")
    param = error.get("param") if isinstance(error.get("param"), str) else None
    code = _CODES.get(kind) or _snake(kind) or "engine_error"
    if status == 404 and param == "model":
        code = "model_not_found"
    return error_response(status if 400 <= status < 600 else 502, message, param, code)


def stream_answer(upstream: httpx.Response, model: str, on_close: Callable[[], None]) -> Response:
    """vLLM's stream of chunks, relayed as it comes with the client's model name; `on_close` runs at its end."""
    return event_stream(_chunks(upstream, model, on_close))


async def _chunks(upstream: httpx.Response, model: str, on_close: Callable[[], None]) -> AsyncIterator[Event]:
    try:
        async for event in read_events(upstream.aiter_bytes()):
            data = event.raw_data or ""
            if data.startswith("{"):
                try:
                    payload = json.loads(data)
                except json.JSONDecodeError:
                    yield event
                    continue
                yield _renamed(payload, model) if isinstance(payload, dict) else event
            else:
                yield event  # data: [DONE]
    finally:
        await upstream.aclose()
        on_close()


def _renamed(payload: dict, model: str) -> dict:
    return {**payload, "model": model} if "model" in payload else payload


def _error_of(payload: Any) -> dict:
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else {}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
