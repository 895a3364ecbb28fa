"""A long prompt prefilled a chunk at a time, between the running batch's decode steps.

One forward over a prompt of thousands of tokens would hold every running sequence for as long as it
takes. Instead, the scheduler feeds such a prompt `chunk_tokens` at a time on a cache of its own (one
row, no padding, so causal attention over cache + chunk needs no mask) and runs a decode step of the
running batch after each chunk. After the last chunk the row samples its first token and joins the batch.
Only plain prompts are chunked: rows with prompt-learning virtual tokens or a prefix prefill whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

DEFAULT_CHUNK_TOKENS = 512
"""Prompt tokens per chunk: long enough to keep the matmuls efficient, short enough not to stall decoding."""


@dataclass
class ChunkedPrefill:
    """The prefill in progress of one sequence's prompt: its cache and how many tokens are in it."""

    prompt_ids: list[int]
    cache: DynamicCache
    done: int = 0

    @property
    def finished(self) -> bool:
        """Whether the whole prompt is in the cache."""
        return self.done >= len(self.prompt_ids)

    def feed(self, decoder: torch.nn.Module, chunk_tokens: int, device: torch.device) -> torch.Tensor:
        """Run the next chunk through `decoder` (routed by the caller); returns its last hidden state, [hidden]."""
        chunk = self.prompt_ids[self.done : self.done + chunk_tokens]
        positions = torch.arange(self.done, self.done + len(chunk), device=device).unsqueeze(0)
        output = decoder(input_ids=torch.tensor([chunk], dtype=torch.long, device=device), position_ids=positions,
                         cache=self.cache, use_cache=True)
        self.done += len(chunk)
        return output.last_hidden_state[0, -1]
