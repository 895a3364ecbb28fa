"""A generation's events as OpenAI's chat or text completion: the whole response, or its stream of chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from core.errors import ApiError
from core.ids import new_id
from core.sse import DONE, Event
from worker.inference.generation import ErrorEvent, FinishEvent, GenerationHandle, TokenEvent


class CompletionShaper:
    """Builds the response objects of one request (chat or text) with a shared id and timestamp."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _choice(self, index: int, text: str, finish_reason: str | None, logprobs: list | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": index, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish_reason, "logprobs": None}
            if logprobs is not None:
                choice["logprobs"] = {"content": logprobs}
            return choice
        choice = {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if logprobs is not None:
            choice["logprobs"] = {"tokens": [lp["token"] for lp in logprobs],
                                  "token_logprobs": [lp["logprob"] for lp in logprobs]}
        return choice

    def response(self, choices: list[tuple[str, str, list | None]], usage: dict[str, int]) -> dict[str, Any]:
        """The whole non-streamed response; `choices` holds (text, finish_reason, logprobs) per choice."""
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [self._choice(i, t, f, lp) for i, (t, f, lp) in enumerate(choices)], "usage": usage}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              first: bool = False, logprobs: list | None = None) -> dict[str, Any]:
        """One chunk of a streamed response."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            if logprobs:
                choice["logprobs"] = {"content": logprobs}
            return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [choice]}
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}]}

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The final usage-only chunk (`stream_options.include_usage`)."""
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def collect(handle: GenerationHandle) -> tuple[str, str, list | None, int]:
    """Run one generation to the end: (text, finish_reason, logprobs, completion_tokens)."""
    parts, logprobs = [], []
    async for event in handle.aiter():
        if isinstance(event, TokenEvent):
            parts.append(event.text)
            if event.logprob is not None:
                logprobs.append(_logprob_entry(event))
        elif isinstance(event, FinishEvent):
            return "".join(parts), event.finish_reason, (logprobs or None), event.completion_tokens
        elif isinstance(event, ErrorEvent):
            raise ApiError(500, f"generation failed: {event.message}", code="generation_failed")
    raise ApiError(500, "generation ended without finishing", code="generation_failed")


async def stream_chunks(handles: list[GenerationHandle], shaper: CompletionShaper, include_usage: bool,
                        prompt_tokens: int) -> AsyncIterator[Event]:
    """Merge the choices' events into chunks, in the order they are produced, then `[DONE]`.

    Closing the stream (the client went away) cancels the generations.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: GenerationHandle) -> None:
        async for event in handle.aiter():
            await queue.put((index, event))
        await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    open_choices, completion_tokens = len(handles), 0
    started = set()
    try:
        while open_choices:
            index, event = await queue.get()
            if event is None:
                open_choices -= 1
            elif isinstance(event, TokenEvent):
                first = index not in started
                started.add(index)
                yield shaper.chunk(index, event.text, first=first,
                                   logprobs=[_logprob_entry(event)] if event.logprob is not None else None)
            elif isinstance(event, FinishEvent):
                if index not in started:
                    started.add(index)
                    yield shaper.chunk(index, "", first=True)
                completion_tokens += event.completion_tokens
                yield shaper.chunk(index, None, finish_reason=event.finish_reason)
            elif isinstance(event, ErrorEvent):
                yield {"error": {"message": f"generation failed: {event.message}", "type": "api_error"}}
        if include_usage:
            yield shaper.usage_chunk(usage(prompt_tokens, completion_tokens))
        yield DONE
    finally:
        for handle in handles:
            handle.cancel()
        for task in tasks:
            task.cancel()


def _logprob_entry(event: TokenEvent) -> dict:
    return {"token": event.text, "logprob": event.logprob, "bytes": list(event.text.encode()), "top_logprobs": []}
