"""A tiny random Llama that vLLM's CPU backend serves, with logits peaked enough to compare engines.

`tests.support.tiny_model.build_tiny_llama` has heads of 16 dimensions (vLLM's CPU attention refuses
them) and nearly flat logits: its greedy choice is often a near-tie that two correct engines may break
differently. This one has heads of 64 dimensions and a large initializer range, so the best token leads
the next by far more than the rounding differences of two fp32 implementations.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.tiny_model import cached_smollm2_tokenizer_dir

HEAD_DIM = 64
INITIALIZER_RANGE = 0.25


def build_vllm_tiny_llama(dest: Path, cache_dir: Path | None = None) -> Path:
    """Save a random 2-layer Llama (hidden 128, 2 heads of 64, fp32) with SmolLM2's tokenizer into `dest`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(cached_smollm2_tokenizer_dir(cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2 * HEAD_DIM,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
