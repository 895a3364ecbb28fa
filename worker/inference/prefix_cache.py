"""Prompt prefixes already prefilled, kept as key/value blocks for the next prompt that opens the same way.

Chat prompts share their opening: the template's system prompt, a team's instructions, the earlier
turns of a conversation. After each prefill the scheduler stores a row's keys and values in blocks of
`block_tokens` positions. A block is found by its tokens, the block before it (so only after the same
whole prefix) and its owner: the adapter that computed it, since an adapter's keys and values differ
from the base's (`None` for the base, else a slot and the generation of what that slot holds). A new
prompt takes the longest chain of stored blocks that matches it, short of its last token (the prefill
must compute that token's logits), and only the rest is prefilled.

Blocks are kept least recently used within `max_bytes`. A chain is touched from its last block back
to its first, so a block is always more recent than the blocks after it: eviction takes the ends of
chains first and never leaves a block whose prefix is gone. Used from the scheduler's thread only;
`stats` may be read from any thread.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

DEFAULT_BLOCK_TOKENS = 8
"""Positions per stored block: small, so that short chat prompts share all of their template's opening
(SmolLM2's system turn and user header are 24 tokens)."""


@dataclass(eq=False)
class _Block:
    """`block_tokens` positions of keys and values ([layers, 2, kv_heads, block_tokens, head_dim])."""

    id: int
    key: tuple
    kv: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


@dataclass(frozen=True, eq=False)
class PrefixHit:
    """The stored blocks that open a prompt: `length` positions whose keys and values need no prefill."""

    blocks: tuple[_Block, ...]

    @property
    def length(self) -> int:
        """Prompt positions covered."""
        return sum(block.kv.shape[3] for block in self.blocks)

    @property
    def group_key(self) -> int:
        """Equal for hits on the same chain of blocks (such rows can share one seeded prefill)."""
        return self.blocks[-1].id

    def seed(self, cache: DynamicCache, rows: int) -> None:
        """Fill an empty prefill cache with these positions, repeated for `rows` sequences."""
        kv = torch.cat([block.kv for block in self.blocks], dim=3) if len(self.blocks) > 1 else self.blocks[0].kv
        for layer in range(kv.shape[0]):
            keys, values = (kv[layer, i].unsqueeze(0).expand(rows, -1, -1, -1).contiguous() for i in (0, 1))
            cache.update(keys, values, layer)


class PrefixCache:
    """Stored prompt prefixes of one served model, by owner, in blocks, within a byte budget."""

    def __init__(self, max_bytes: int, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.max_bytes, self.block_tokens = max_bytes, block_tokens
        self._blocks: collections.OrderedDict[tuple, _Block] = collections.OrderedDict()  # oldest first
        self._bytes = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._counts = {"lookups": 0, "hits": 0, "hit_tokens": 0, "stored_blocks": 0, "evicted_blocks": 0}

    @property
    def enabled(self) -> bool:
        """Whether anything can be stored at all."""
        return self.max_bytes > 0

    def lookup(self, owner: Hashable, prompt_ids: Sequence[int]) -> PrefixHit | None:
        """The longest stored chain that opens `prompt_ids` and leaves at least its last token to prefill."""
        if not self.enabled:
            return None
        chain = self._chain(owner, prompt_ids, len(prompt_ids) - 1)
        with self._lock:
            self._counts["lookups"] += 1
            if chain:
                self._counts["hits"] += 1
                self._counts["hit_tokens"] += len(chain) * self.block_tokens
        if not chain:
            return None
        self._touch(chain)
        return PrefixHit(tuple(chain))

    def store(self, owner: Hashable, prompt_ids: Sequence[int], cache: DynamicCache, row: int) -> None:
        """Keep the whole blocks of `prompt_ids` from row `row` of `cache` (whose positions start at the prompt's)."""
        if not self.enabled:
            return
        chain: list[_Block] = []
        parent = 0
        rest = None  # [layers, 2, kv_heads, positions from `first_new`, head_dim], copied once when needed
        whole = len(prompt_ids) // self.block_tokens * self.block_tokens
        for start in range(0, whole, self.block_tokens):
            key = (owner, parent, tuple(prompt_ids[start : start + self.block_tokens]))
            block = self._blocks.get(key)
            if block is None:
                if rest is None:
                    first_new = start
                    rest = _positions(cache, row, start, whole)
                kv = rest[:, :, :, start - first_new : start - first_new + self.block_tokens].clone()
                block = _Block(next(self._ids), key, kv)
                if block.nbytes > self.max_bytes:
                    break
                self._blocks[key] = block
                self._bytes += block.nbytes
                with self._lock:
                    self._counts["stored_blocks"] += 1
            chain.append(block)
            parent = block.id
        self._touch(chain)
        self._evict()

    def stats(self) -> dict[str, int]:
        """Lookups, hits, prompt tokens served from the cache, blocks stored, evicted and held, bytes held."""
        with self._lock:
            return {**self._counts, "blocks": len(self._blocks), "bytes": self._bytes}

    def _chain(self, owner: Hashable, prompt_ids: Sequence[int], limit: int) -> list[_Block]:
        """The stored blocks, in order, that match `prompt_ids` within its first `limit` positions."""
        chain: list[_Block] = []
        parent = 0
        for start in range(0, limit - self.block_tokens + 1, self.block_tokens):
            block = self._blocks.get((owner, parent, tuple(prompt_ids[start : start + self.block_tokens])))
            if block is None:
                break
            chain.append(block)
            parent = block.id
        return chain

    def _touch(self, chain: list[_Block]) -> None:
        for block in reversed(chain):  # the first block ends most recent: see the module's docstring
            self._blocks.move_to_end(block.key)

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            self._bytes -= block.nbytes
            with self._lock:
                self._counts["evicted_blocks"] += 1


def _positions(cache: DynamicCache, row: int, start: int, end: int) -> torch.Tensor:
    """Positions [start, end) of one row's keys and values: [layers, 2, kv_heads, end - start, head_dim]."""
    return torch.stack([torch.stack((layer.keys[row, :, start:end], layer.values[row, :, start:end]))
                        for layer in cache.layers])
