"""Attention for padding-free packed rows: each example attends only to itself, computed per example.

A packed row holds several examples back to back. transformers 5.24 would isolate them with a
block-diagonal (L x L) mask derived from `position_ids` (only when `attention_mask` is None *and*
no cache is in use), but sdpa then still computes the full L x L scores. Running sdpa once per
example with `is_causal=True` gives the same result without the cross-example work, so it is
both isolated by construction and cheaper. Rows without `packed_segment_lengths` (padded
micro-batches, evaluation of a single sequence) fall through to the standard sdpa path.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "patchbay_packed_sdpa"
SEGMENT_LENGTHS_KWARG = "packed_segment_lengths"


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa run separately on each example of a packed row; plain sdpa when the row is not packed.

    query/key/value are (batch, heads, length, head_dim); the output is (batch, length, heads, head_dim).
    """
    lengths = kwargs.pop(SEGMENT_LENGTHS_KWARG, None)
    if lengths is None or len(lengths) <= 1:
        if lengths is not None:
            attention_mask = None  # one example: plain causal attention
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"segment lengths sum to {sum(lengths)}, but the row has {query.shape[2]} tokens")
    outputs = []
    start = 0
    for length in lengths:
        end = start + length
        out, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
        )
        outputs.append(out)
        start = end
    return torch.cat(outputs, dim=1), None


def use_packed_attention(model: torch.nn.Module) -> None:
    """Switch a transformers model (and its sub-configs) to the per-example packed attention."""
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    model.set_attn_implementation(PACKED_SDPA)
