"""A generation request, the events it produces, and the handle that streams them to threads or asyncio."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class GenerationRequest:
    """One completion to generate from already tokenized input."""

    prompt_ids: list[int]
    adapter: str | None  # a name already ensured in engine.adapters, or None for the base
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None  # the same seed gives the same output, whatever it is batched with
    stop: list[str] = field(default_factory=list)  # the output ends before the first occurrence
    logprobs: bool = False


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it made decodable (may be empty while a character is incomplete).

    End-of-sequence tokens are not emitted, except when ending the sequence releases text held back
    earlier (a possible stop-string start, or an incomplete character): then the event carries the
    end-of-sequence id and that text, so that token texts always add up to the whole output.
    """

    token_id: int
    text: str
    logprob: float | None = None  # log-probability under the model (before temperature/top_p), if asked


@dataclass(frozen=True)
class FinishEvent:
    """The last event of a successful generation; `completion_tokens` counts an end-of-sequence token."""

    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    """The last event of a failed or cancelled generation."""

    message: str


GenerationEvent = TokenEvent | FinishEvent | ErrorEvent


class GenerationError(RuntimeError):
    """A generation ended with an `ErrorEvent`."""


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation, gathered from its events."""

    token_ids: list[int]  # the TokenEvents' ids (see TokenEvent about end-of-sequence ids)
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None


class GenerationHandle:
    """The events of one request, as they are produced; iterate from a thread or `aiter()` from asyncio.

    Every iterator sees every event from the first one. `cancel()` drops the request at the next step.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self._events: list[GenerationEvent] = []
        self._changed = threading.Condition()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._cancelled = False
        self.on_cancel: list = []  # callbacks run by cancel(), e.g. to wake the scheduler

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` was called."""
        return self._cancelled

    @property
    def done(self) -> bool:
        """Whether the final event (finish or error) has been produced."""
        with self._changed:
            return bool(self._events) and not isinstance(self._events[-1], TokenEvent)

    def cancel(self) -> None:
        """Stop generating (e.g. the client disconnected); the stream ends with an `ErrorEvent`."""
        self._cancelled = True
        for callback in list(self.on_cancel):
            callback()

    def push(self, event: GenerationEvent) -> None:
        """Deliver an event to every consumer (called by the scheduler thread)."""
        with self._changed:
            if self._events and not isinstance(self._events[-1], TokenEvent):
                return  # already finished
            self._events.append(event)
            self._changed.notify_all()
            listeners = list(self._listeners)
        for loop, queue in listeners:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop was closed
                pass

    def __iter__(self) -> Iterator[GenerationEvent]:
        index = 0
        while True:
            with self._changed:
                while index >= len(self._events):
                    self._changed.wait()
                event = self._events[index]
            index += 1
            yield event
            if not isinstance(event, TokenEvent):
                return

    async def aiter(self) -> AsyncIterator[GenerationEvent]:
        """The events, for `async for` in an asyncio loop (never blocks the loop)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._changed:
            for event in self._events:
                queue.put_nowait(event)
            listener = (loop, queue)
            self._listeners.append(listener)
        try:
            while True:
                event = await queue.get()
                yield event
                if not isinstance(event, TokenEvent):
                    return
        finally:
            with self._changed:
                self._listeners.remove(listener)

    def result(self) -> GenerationResult:
        """Block until the end and gather the events; raises `GenerationError` on an `ErrorEvent`."""
        token_ids: list[int] = []
        texts: list[str] = []
        logprobs: list[float] = []
        for event in self:
            if isinstance(event, TokenEvent):
                token_ids.append(event.token_id)
                texts.append(event.text)
                if event.logprob is not None:
                    logprobs.append(event.logprob)
            elif isinstance(event, FinishEvent):
                return GenerationResult(
                    token_ids=token_ids,
                    text="".join(texts),
                    finish_reason=event.finish_reason,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    logprobs=logprobs if self.request.logprobs else None,
                )
            else:
                raise GenerationError(event.message)
        raise GenerationError("the event stream ended without a final event")
