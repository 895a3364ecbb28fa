"""Server-Sent Events: the one place our streams are framed, kept alive and read back.

Every stream Patchbay sends (a job's live events, chat and text completion chunks, and the API's
relay of an inference server's chunks) is an `event_stream`: each event is framed by FastAPI's SSE
encoder (`fastapi.sse.format_sse_event`, so `data: {json}` then a blank line), and FastAPI's
keep-alive comment (`: ping`) goes out whenever the source has been quiet for `PING_SECONDS`, so
that proxies keep the connection open and a client that has gone is noticed.

FastAPI applies the same encoder and pings by itself only to a path operation that is a generator.
Ours answer JSON or a stream from one URL, and refuse a bad request with its status before the
first byte, so they return `event_stream(...)` instead: the same encoder, comment and response class.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from fastapi.sse import KEEPALIVE_COMMENT, EventSourceResponse, ServerSentEvent, format_sse_event

__all__ = ["DONE", "PING_SECONDS", "Event", "EventSourceResponse", "ServerSentEvent", "encode", "event_stream",
           "read_events"]

PING_SECONDS = 15.0
"""Quiet time before a keep-alive comment (FastAPI's own interval)."""

DONE = ServerSentEvent(raw_data="[DONE]")
"""OpenAI's end of a stream: `data: [DONE]`."""

Event = ServerSentEvent | Mapping[str, Any]
"""What a stream yields: a mapping is sent as its JSON in one `data:` field."""

_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(r"\r\n|\r|\n")
_END = object()


def encode(event: Event) -> bytes:
    """One event in the wire format."""
    if not isinstance(event, ServerSentEvent):
        return format_sse_event(data_str=json.dumps(event))
    data = event.raw_data if event.raw_data is not None else (
        None if event.data is None else json.dumps(event.data))
    return format_sse_event(data_str=data, event=event.event, id=event.id, retry=event.retry,
                            comment=event.comment)


def event_stream(events: AsyncIterable[Event],
                 on_close: Callable[[], Awaitable[None]] | None = None) -> EventSourceResponse:
    """A response that sends `events` as they come, with a ping whenever none came for `PING_SECONDS`.

    `on_close` runs once the response is over however it ended, even when the client left before the
    first event (when `events` never started, so its own cleanup never ran).
    """
    if on_close is None:
        return EventSourceResponse(_with_pings(events), headers=_HEADERS)
    return _ClosingEventSourceResponse(_with_pings(events), on_close, headers=_HEADERS)


class _ClosingEventSourceResponse(EventSourceResponse):
    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **kwargs) -> None:
        super().__init__(content, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _with_pings(events: AsyncIterable[Event]) -> AsyncIterator[bytes]:
    # The source runs in a task of its own, so that waiting for its next event can time out without
    # cancelling it; one event is buffered at most. Closing this stream cancels the source.
    queue: asyncio.Queue = asyncio.Queue(maxsize=1)

    async def produce() -> None:
        try:
            async for event in events:
                await queue.put(encode(event))
            await queue.put(_END)
        except Exception as exc:  # raised again by the consumer, in the response
            await queue.put(exc)
        finally:
            if hasattr(events, "aclose"):
                await events.aclose()

    producer = asyncio.create_task(produce())
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), PING_SECONDS)
            except TimeoutError:
                yield KEEPALIVE_COMMENT
                continue
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        producer.cancel()


async def read_events(chunks: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    """The events of an SSE byte stream, comments left out; a data field of several lines is joined by `\\n`."""
    pending = b""
    async for chunk in chunks:
        *blocks, pending = _BLANK_LINE.split(pending + chunk)
        for block in blocks:
            if (event := _parse(block)) is not None:
                yield event
    if (event := _parse(pending)) is not None:  # a last event cut short by the end of the stream
        yield event


def _parse(block: bytes) -> ServerSentEvent | None:
    fields: dict[str, list[str]] = {}
    for line in _LINE_END.split(block.decode("utf-8", errors="replace")):
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
    if "data" not in fields:
        return None
    event, event_id = fields.get("event", [None])[-1], fields.get("id", [None])[-1]
    return ServerSentEvent(raw_data="\n".join(fields["data"]), event=event, id=event_id)
