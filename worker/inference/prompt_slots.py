"""Prompt-learning adapters per slot: virtual tokens or prefix keys/values, ready on the serving device.

They only change a sequence's prefill (the scheduler prepends the virtual tokens to the prompt's
embeddings, or starts the cache with the prefix); afterwards the sequence's KV cache holds their
positions and decoding needs nothing, so these rows decode in the shared batch with any others.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from worker.formats.prompt_learning import PrefixKV, VirtualTokens


class PromptSlots:
    """The virtual tokens or prefix of each slot that has a prompt-learning adapter."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self._device, self._dtype = device, dtype
        self._prompts: dict[int, VirtualTokens | PrefixKV] = {}

    def write_slot(self, slot: int, prompt: VirtualTokens | PrefixKV | None) -> None:
        """Set (or clear, with None) the slot's prompt-learning state."""
        if prompt is None:
            self._prompts.pop(slot, None)
        elif isinstance(prompt, VirtualTokens):
            self._prompts[slot] = VirtualTokens(prompt.embeddings.to(self._device, self._dtype))
        else:
            self._prompts[slot] = PrefixKV(prompt.keys.to(self._device, self._dtype),
                                           prompt.values.to(self._device, self._dtype))

    def count(self, slot: int | None) -> int:
        """Positions the slot's adapter adds before a prompt (0 for none)."""
        prompt = self._prompts.get(slot) if slot is not None else None
        return 0 if prompt is None else prompt.count

    def virtual_tokens(self, slot: int | None) -> torch.Tensor | None:
        """The slot's virtual-token embeddings [count, hidden], if it has prompt/p-tuning."""
        prompt = self._prompts.get(slot) if slot is not None else None
        return prompt.embeddings if isinstance(prompt, VirtualTokens) else None

    def prefix(self, slot: int | None) -> PrefixKV | None:
        """The slot's prefix keys/values, if it has prefix tuning."""
        prompt = self._prompts.get(slot) if slot is not None else None
        return prompt if isinstance(prompt, PrefixKV) else None

    def seed_cache(self, cache: DynamicCache, slot: int, rows: int) -> None:
        """Fill an empty prefill cache with the slot's prefix, repeated for `rows` sequences."""
        prefix = self._prompts[slot]
        for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values)):
            cache.update(keys.unsqueeze(0).expand(rows, -1, -1, -1).contiguous(),
                         values.unsqueeze(0).expand(rows, -1, -1, -1).contiguous(), layer)
