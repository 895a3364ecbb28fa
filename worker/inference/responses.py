"""OpenAI response and stream-chunk shapes for chat and text completions."""

from __future__ import annotations

import json
import time
from typing import Any

from core.ids import new_id


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
              first: bool = False, logprobs: list | None = None) -> bytes:
        """One SSE line of a streamed response."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else {}
            if text and not first:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            if logprobs:
                choice["logprobs"] = {"content": logprobs}
            payload = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                       "choices": [choice]}
        else:
            payload = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                       "choices": [{"index": index, "text": text or "", "finish_reason": finish_reason,
                                    "logprobs": None}]}
        return f"data: {json.dumps(payload)}\n\n".encode()

    def usage_chunk(self, usage: dict[str, int]) -> bytes:
        """The final usage-only chunk (`stream_options.include_usage`)."""
        payload = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                   "created": self.created, "model": self.model, "choices": [], "usage": usage}
        return f"data: {json.dumps(payload)}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
