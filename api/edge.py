"""The ASGI edge around the whole API: request ids, bounded bodies and text, and connections that stay sane.

- Every request gets an id (`x-request-id` on every response; 500s quote it).
- A body that stalls for `body_idle_timeout_seconds` is cut off (408); a body over its route's limit gets
  413 as soon as the limit is crossed, chunked or not. JSON bodies are read here, whole, before the app
  runs; upload routes stream, and their reads carry the same timeout and limit.
- Text the database cannot store (NUL, lone surrogates) in the path, the query or a JSON body is a 400
  naming the field.
- A response sent before its request body was read says `Connection: close`, and an exception raised after
  a complete response never resets the client's keep-alive connection.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from urllib.parse import parse_qsl

import anyio
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import ApiError, error_response
from core.settings import Settings

log = logging.getLogger("patchbay.edge")
STREAMED_UPLOADS = {"/v1/files", "/v1/adapters/import"}
CHAT_ROUTES = {"/v1/chat/completions", "/v1/completions"}
MULTIPART_SLACK_BYTES = 1024 * 1024
"""Room for multipart boundaries and form fields around an upload's file part."""
# A JSON escape of NUL, or of a surrogate that is not half of a pair (valid pairs, which encoders that
# escape non-ASCII send for every emoji, decode to a storable character).
_SUSPECT_ESCAPE = re.compile(rb"\\u0000|\\ud[89ab][0-9a-f]{2}(?!\\ud[c-f][0-9a-f]{2})"
                             rb"|(?<!\\ud[89ab][0-9a-f]{2})\\ud[c-f][0-9a-f]{2}", re.IGNORECASE)


def unstorable_text(value: str) -> bool:
    """Whether a string holds characters the database cannot store: NUL, or a lone surrogate."""
    if "\x00" in value:
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def find_unstorable(value, path: str = "") -> str | None:
    """The dotted path of the first unstorable string (key or value) in parsed JSON, or None."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if unstorable_text(item):
                return where or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{where}.{key}" if where else str(key)
                if unstorable_text(str(key)):
                    return child_path
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{i}" if where else str(i)) for i, child in enumerate(item))
    return None


def _nul_error(param: str) -> ApiError:
    return ApiError(400, f"'{param}' holds a NUL character or an invalid Unicode surrogate, which cannot be stored.",
                    param=param, code="invalid_characters")


def _has_body(scope: Scope) -> bool:
    """Whether the request carries a body: a length over 0, chunked, or a body method with no length at all."""
    for name, value in scope["headers"]:
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return scope["method"] in ("POST", "PUT", "PATCH", "DELETE")


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


class _Body:
    """The request body as the edge sees it: how much arrived, whether all of it did, and the limits."""

    def __init__(self, scope: Scope, receive: Receive, limit: int, idle_timeout: float) -> None:
        self.complete = not _has_body(scope)
        self.received = 0
        self.limit, self.idle_timeout = limit, idle_timeout
        self._receive = receive

    async def receive(self) -> Message:
        """One message from the client, within the idle timeout and the size limit."""
        if self.complete:
            return await self._receive()
        try:
            with anyio.fail_after(self.idle_timeout):
                message = await self._receive()
        except TimeoutError:
            raise ApiError(408, f"The request body sent nothing for {self.idle_timeout:g} seconds.",
                           code="body_timeout") from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise ApiError(413, f"The request body is larger than the limit of {self.limit} bytes.",
                               code="request_too_large")
            self.complete = not message.get("more_body", False)
        return message

    async def read_all(self) -> bytes:
        """The whole body (it is small: under the route's limit)."""
        chunks = []
        while not self.complete:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
        return b"".join(chunks)


class AsgiEdge:
    """Wraps the API app; see the module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def _limit(self, path: str) -> int:
        if path in STREAMED_UPLOADS:
            return self.settings.max_upload_bytes + MULTIPART_SLACK_BYTES
        if path in CHAT_ROUTES:
            return self.settings.max_chat_bytes
        return self.settings.max_json_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        body = _Body(scope, receive, self._limit(scope["path"]), self.settings.body_idle_timeout_seconds)
        state = {"started": False, "done": False}

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                if not body.complete:
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["done"] = True
            await send(message)

        try:
            app_receive = await self._prepare(scope, body)
        except ApiError as exc:
            await self._reply(exc, scope, receive, send_with_headers)
            return
        try:
            await self.app(scope, app_receive, send_with_headers)
        except Exception:
            if state["done"]:
                return  # already answered (a 500 with this request's id) and logged by the error edge
            if state["started"]:
                raise  # a half-sent response: the server must drop the connection
            log.exception("unhandled error before any response (request %s)", request_id)
            await self._reply(ApiError(500, f"The server had an error (request id {request_id}).",
                                       code="internal_error"), scope, receive, send_with_headers)

    async def _prepare(self, scope: Scope, body: _Body) -> Receive:
        """Check the path and query, read a JSON body whole, and return the `receive` the app gets."""
        if unstorable_text(scope["path"]):
            raise _nul_error("path")
        for name, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if unstorable_text(name) or unstorable_text(value):
                raise _nul_error(name if not unstorable_text(name) else "query")
        declared = _declared_length(scope)
        if declared is not None and declared > body.limit:
            raise ApiError(413, f"The request body is larger than the limit of {body.limit} bytes.",
                           code="request_too_large")
        if scope["path"] in STREAMED_UPLOADS:
            return body.receive
        data = await body.read_all()
        if _SUSPECT_ESCAPE.search(data):
            await run_in_threadpool(self._refuse_unstorable_json, data)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await body.receive()

        return replay

    @staticmethod
    def _refuse_unstorable_json(data: bytes) -> None:
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError):
            return  # the app answers malformed JSON itself
        where = find_unstorable(parsed)
        if where is not None:
            raise _nul_error(where)

    @staticmethod
    async def _reply(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(exc.status, exc.message, exc.param, exc.code, exc.headers, exc.extra)
        await response(scope, receive, send)
