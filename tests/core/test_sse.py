"""`core.sse`: the wire format, reading it back, keep-alive pings, and closing a stream."""

from __future__ import annotations

import asyncio

import pytest

from core import sse
from core.sse import DONE, ServerSentEvent, encode, event_stream, read_events


def test_encode_writes_openai_data_frames():
    assert encode({"a": 1, "b": "x"}) == b'data: {"a": 1, "b": "x"}\n\n'
    assert encode(DONE) == b"data: [DONE]\n\n"
    assert encode(ServerSentEvent(raw_data='{"raw":true}')) == b'data: {"raw":true}\n\n'
    assert encode(ServerSentEvent(data={"k": [1]}, event="update", id="7")) == \
        b'event: update\ndata: {"k": [1]}\nid: 7\n\n'
    assert encode(ServerSentEvent(raw_data="two\nlines")) == b"data: two\ndata: lines\n\n"


async def _chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start:start + size]


async def _read(data: bytes, size: int) -> list[ServerSentEvent]:
    return [event async for event in read_events(_chunks(data, size))]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_read_events_gives_back_what_encode_wrote_whatever_the_chunking(size):
    sent = [{"n": 1, "text": "héllo"}, ServerSentEvent(raw_data="two\nlines", event="e", id="9"), DONE]
    wire = b"".join(encode(e) for e in sent[:1]) + b": ping\n\n" + b"".join(encode(e) for e in sent[1:])
    events = asyncio.run(_read(wire, size))
    assert [e.raw_data for e in events] == ['{"n": 1, "text": "h\\u00e9llo"}', "two\nlines", "[DONE]"]
    assert (events[1].event, events[1].id) == ("e", "9")
    assert b"".join(encode(e) for e in events) == wire.replace(b": ping\n\n", b"")


def test_read_events_takes_crlf_lines_and_a_last_event_cut_short():
    events = asyncio.run(_read(b"data: a\r\ndata:b\r\n\r\n: comment\r\n\r\nevent: x\n\ndata: tail", 4))
    assert [e.raw_data for e in events] == ["a\nb", "tail"]


def test_event_stream_pings_while_the_source_is_quiet_and_closing_cancels_it(monkeypatch):
    monkeypatch.setattr(sse, "PING_SECONDS", 0.05)
    closed = asyncio.Event()

    async def source():
        try:
            yield {"n": 1}
            await asyncio.sleep(0.3)
            yield {"n": 2}
            await asyncio.sleep(3600)
            yield {"n": 3}
        finally:
            closed.set()

    async def main():
        response = event_stream(source())
        assert response.media_type == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        chunks, iterator = [], response.body_iterator
        while b'data: {"n": 2}\n\n' not in chunks[:-2]:  # the second event and two pings after it
            chunks.append(await anext(iterator))
        await iterator.aclose()
        await asyncio.wait_for(closed.wait(), 5)
        return chunks

    chunks = asyncio.run(main())
    assert [c for c in chunks if c != b": ping\n\n"] == [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n']
    assert chunks[0] == b'data: {"n": 1}\n\n' and chunks[1] == b": ping\n\n"  # pinged while it slept


def test_event_stream_ends_with_the_source_and_raises_its_error():
    async def fine():
        yield {"n": 1}
        yield DONE

    async def broken():
        yield {"n": 1}
        raise RuntimeError("the store broke")

    async def collect(events):
        return [chunk async for chunk in event_stream(events).body_iterator]

    assert asyncio.run(collect(fine())) == [b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"]
    with pytest.raises(RuntimeError, match="the store broke"):
        asyncio.run(collect(broken()))
