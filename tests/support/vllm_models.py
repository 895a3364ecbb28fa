"""A tiny random Llama that vLLM's CPU backend serves, with logits peaked enough to compare engines.

`tests.support.tiny_model.build_tiny_llama` has heads of 16 dimensions (vLLM's CPU attention refuses
them) and nearly flat logits: its greedy choice is often a near-tie that two correct engines may break
differently. This one has heads of 64 dimensions and a large initializer range, so the best token leads
the next by far more than the rounding differences of two fp32 implementations.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_model import build_tiny_llama

HEAD_DIM = 64
INITIALIZER_RANGE = 0.25


def build_vllm_tiny_llama(dest: Path, cache_dir: Path | None = None) -> Path:
    """Save a random 2-layer Llama (hidden 128, 2 heads of 64, fp32) with SmolLM2's tokenizer into `dest`."""
    return build_tiny_llama(dest, cache_dir, hidden_size=2 * HEAD_DIM, intermediate_size=256, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=HEAD_DIM, initializer_range=INITIALIZER_RANGE)
