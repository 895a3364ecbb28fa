"""The running sequences' KV caches as one left-padded batch (a transformers `DynamicCache`).

New sequences are prefilled together, right-padded (so no query is fully masked and no mask is
needed: causal attention never lets a real token see the padding after it). They then join: each
row's real part and the running batch are left-padded with zeros to a common length and stacked.
A 2D attention mask marks the padding (False) and the caller passes per-row `position_ids`, so
padding changes neither positions nor attention. When sequences leave, their rows are dropped and
columns that are padding for every remaining row are trimmed. Checked against transformers 5.24:
`create_causal_mask` takes a 2D mask of length cache + query, and `DynamicLayer.update` appends
along the sequence axis.
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
        self.cache = DynamicCache(ddp_cache_data=[tuple(m) for m in layers], config=self._config)

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
        self.cache = DynamicCache(ddp_cache_data=layers, config=self._config)

    def clear(self) -> None:
        """Drop every row."""
        self.cache = self.mask = None

    @staticmethod
    def _layer_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in cache.layers]


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad [rows, heads, seq, dim] on the left of the sequence axis up to `length`."""
    missing = length - tensor.shape[-2]
    return functional.pad(tensor, (0, 0, missing, 0)) if missing else tensor
