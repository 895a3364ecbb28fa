"""PEFT prompt learning: written and reloaded by peft (see `peft_artifact`); read for serving here as
virtual-token embeddings, or per-layer prefix keys and values.

peft saves a single `prompt_embeddings` tensor: the prompt encoder's output (`get_prompt_embedding_to_save`),
so a P_TUNING artifact already holds what its MLP/LSTM encoder computes and needs no encoder here.
- PROMPT_TUNING, P_TUNING: [num_virtual_tokens, hidden], prepended to the prompt's embeddings.
- PREFIX_TUNING: [num_virtual_tokens, num_layers * 2 * token_dim] with token_dim = kv_heads * head_dim;
  peft's `get_prompt` views it as [nv, layers * 2, kv_heads, head_dim] and layer l takes rows 2l (keys)
  and 2l + 1 (values), placed in the KV cache before the prompt (no rotary embedding applied).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from worker.formats.files import AdapterLoadError, check_finite

PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")


@dataclass(frozen=True)
class AttentionShape:
    """What the base's attention caches: layers, key/value heads and head width."""

    hidden_size: int
    num_layers: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class VirtualTokens:
    """Learned input embeddings placed before every prompt."""

    embeddings: torch.Tensor  # [num_virtual_tokens, hidden]

    @property
    def count(self) -> int:
        """How many positions they take."""
        return self.embeddings.shape[0]


@dataclass(frozen=True)
class PrefixKV:
    """Learned keys and values placed in every layer's cache before the prompt."""

    keys: torch.Tensor  # [layers, kv_heads, num_virtual_tokens, head_dim]
    values: torch.Tensor

    @property
    def count(self) -> int:
        """How many positions they take."""
        return self.keys.shape[2]


def read_prompt_learning(
    peft_type: str, config: dict, tensors: Mapping[str, torch.Tensor], shape: AttentionShape
) -> VirtualTokens | PrefixKV:
    """The virtual tokens (prompt/p-tuning) or prefix keys/values (prefix tuning) of a prompt-learning folder."""
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterLoadError(
            f"a {peft_type} adapter holds one tensor, 'prompt_embeddings'; found {sorted(tensors)[:5]}"
        )
    if config.get("num_transformer_submodules", 1) != 1:
        raise AdapterLoadError("encoder-decoder prompt learning (num_transformer_submodules=2) is not served")
    embeddings = tensors["prompt_embeddings"]
    count = config.get("num_virtual_tokens")
    if not isinstance(count, int) or count < 1 or embeddings.ndim != 2 or embeddings.shape[0] != count:
        raise AdapterLoadError(
            f"prompt_embeddings {tuple(embeddings.shape)} does not hold num_virtual_tokens={count} rows"
        )
    check_finite("prompt_embeddings", embeddings)
    embeddings = embeddings.float()
    if peft_type != "PREFIX_TUNING":
        if embeddings.shape[1] != shape.hidden_size:
            raise AdapterLoadError(
                f"virtual tokens have width {embeddings.shape[1]}, but the base's embeddings are {shape.hidden_size}"
            )
        return VirtualTokens(embeddings)
    width = shape.num_layers * 2 * shape.kv_heads * shape.head_dim
    if config.get("num_layers") != shape.num_layers or embeddings.shape[1] != width:
        raise AdapterLoadError(
            f"prefix of width {embeddings.shape[1]} for {config.get('num_layers')} layers does not fit this base "
            f"({shape.num_layers} layers x 2 x {shape.kv_heads} kv heads x {shape.head_dim}) = {width}"
        )
    per_layer = embeddings.view(count, shape.num_layers * 2, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 3)
    return PrefixKV(keys=per_layer[0::2].contiguous(), values=per_layer[1::2].contiguous())
