"""The running sequences' KV caches as one left-padded batch (a transformers `DynamicCache`).

New sequences are prefilled together, right-padded (so no query is fully masked and no mask is
needed: causal attention never lets a real token see the padding after it). They then join: each
row's real part and the running batch are left-padded with zeros to a common length and stacked.
A 2D attention mask marks the padding (False) and the caller passes per-row `position_ids`, so
padding changes neither positions nor attention. When sequences leave, their rows are dropped and
columns that are padding for every remaining row are trimmed. Checked against transformers 5.24:
`create_causal_mask` takes a 2D mask of length cache + query, and `DynamicLayer.update` appends
along the sequence axis.

The batch's layers write each step's keys and values into storage reserved ahead (`ReservedLayer`)
instead of concatenating a new tensor per layer per step, which copied the whole cache every step;
the storage grows by a block when it is full, and is rebuilt only when rows join or leave.
"""

from __future__ import annotations

import torch
from torch.nn import functional
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer


class PaddedKVBatch:
    """Left-padded KV cache and padding mask for the rows of the running batch."""

    def __init__(self, config: PreTrainedConfig) -> None:
        self._config = config
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # bool [rows, length]: True on real tokens

    @property
    def rows(self) -> int:
        """Number of sequences in the batch."""
        return 0 if self.mask is None else self.mask.shape[0]

    def new_prefill_cache(self) -> DynamicCache:
        """An empty cache for prefilling one sequence (only full-attention layers are supported)."""
        cache = DynamicCache(config=self._config)
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotImplementedError("left-padded batching supports full-attention models only (no sliding window)")
        return cache

    def append(self, prefill_cache: DynamicCache, lengths: list[int], rows: list[int]) -> None:
        """Add rows `rows` of a right-padded prefill cache (real lengths `lengths`) at the end of the batch."""
        if not rows:
            return
        old_length = self.mask.shape[1] if self.mask is not None else 0
        length = max([old_length] + [lengths[r] for r in rows])
        device = prefill_cache.layers[0].keys.device
        new_mask = torch.zeros(len(rows), length, dtype=torch.bool, device=device)
        for i, row in enumerate(rows):
            new_mask[i, length - lengths[row] :] = True
        layers = []
        for layer in prefill_cache.layers:
            merged = []
            for tensor in (layer.keys, layer.values):
                block = tensor.new_zeros(len(rows), tensor.shape[1], length, tensor.shape[3])
                for i, row in enumerate(rows):
                    block[i, :, length - lengths[row] :] = tensor[row, :, : lengths[row]]
                merged.append(block)
            layers.append(merged)
        if self.cache is not None:
            for (keys, values), merged in zip(self._layer_tensors(self.cache), layers):
                merged[0] = torch.cat([_pad_left(keys, length), merged[0]], dim=0)
                merged[1] = torch.cat([_pad_left(values, length), merged[1]], dim=0)
            new_mask = torch.cat([functional.pad(self.mask, (length - old_length, 0), value=False), new_mask])
        self.mask = new_mask
        self.cache = self._reserved_cache(layers)

    def mask_with_new_column(self) -> torch.Tensor:
        """The attention mask for one decode step: the current mask plus the new token's column."""
        new_column = torch.ones(self.rows, 1, dtype=torch.bool, device=self.mask.device)
        return torch.cat([self.mask, new_column], dim=1)

    def commit_step(self, step_mask: torch.Tensor) -> None:
        """Record the mask after a decode step appended one column to every row's cache."""
        if self.cache.get_seq_length() != step_mask.shape[1]:
            raise RuntimeError("KV cache and attention mask lengths diverged")
        self.mask = step_mask

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) and trim the columns that are padding for all of them."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        first_real = int(mask.any(dim=0).to(torch.int8).argmax())
        layers = [
            (keys.index_select(0, index)[:, :, first_real:], values.index_select(0, index)[:, :, first_real:])
            for keys, values in self._layer_tensors(self.cache)
        ]
        self.mask = mask[:, first_real:].contiguous()
        self.cache = self._reserved_cache(layers)

    def clear(self) -> None:
        """Drop every row."""
        self.cache = self.mask = None

    def _reserved_cache(self, layers) -> DynamicCache:
        cache = DynamicCache(config=self._config)
        cache.layers = [ReservedLayer(keys, values) for keys, values in layers]
        return cache

    @staticmethod
    def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]


class ReservedLayer(DynamicLayer):
    """A cache layer whose keys and values are views into storage with room for `RESERVE_BLOCK` more positions."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self._length = keys.shape[-2]
        self._keys_store, self._values_store = _with_room(keys, self._length), _with_room(values, self._length)
        self._expose()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new positions after the cached ones and return the keys and values so far (views)."""
        end = self._length + key_states.shape[-2]
        if end > self._keys_store.shape[-2]:
            self._keys_store, self._values_store = _with_room(self.keys, end), _with_room(self.values, end)
        self._keys_store[:, :, self._length : end] = key_states
        self._values_store[:, :, self._length : end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys = self._keys_store[:, :, : self._length]
        self.values = self._values_store[:, :, : self._length]


RESERVE_BLOCK = 64
"""Positions reserved past the current length; each fill costs one copy of the layer's cache."""


def _with_room(tensor: torch.Tensor, needed: int) -> torch.Tensor:
    """A copy of [rows, heads, seq, dim] in storage with room for `needed` + `RESERVE_BLOCK` positions."""
    rows, heads, length, dim = tensor.shape
    store = tensor.new_empty(rows, heads, needed + RESERVE_BLOCK, dim)
    store[:, :, :length] = tensor
    return store


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad [rows, heads, seq, dim] on the left of the sequence axis up to `length`."""
    missing = length - tensor.shape[-2]
    return functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor
