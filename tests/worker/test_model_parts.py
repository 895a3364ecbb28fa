"""Finding a causal LM's parts: under a peft wrapper, its decoder layers, their base linears, 4-bit or not."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.support.tiny_training import load_tiny
from worker.model_parts import decoder_layers, decoder_linears, is_4bit, unwrap_causal_lm


def test_the_parts_are_found_through_a_peft_wrapper(tiny_model_dir):
    base = load_tiny(tiny_model_dir)
    layers = decoder_layers(base)
    names = list(decoder_linears(base))
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    assert unwrap_causal_lm(wrapped) is base and unwrap_causal_lm(base) is base
    assert decoder_layers(wrapped) is layers and len(layers) == 2
    assert list(decoder_linears(wrapped)) == names
    assert len(names) == 14 and names[0] == "model.layers.0.self_attn.q_proj"


def test_a_module_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match="decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_is_4bit_tells_packed_linears_from_full_precision(tiny_model_dir):
    assert not any(is_4bit(linear) for linear in decoder_linears(load_tiny(tiny_model_dir)).values())
    quantized = load_tiny(tiny_model_dir, quantization="nf4-dq")
    assert all(is_4bit(linear) for linear in decoder_linears(quantized).values())
    assert not is_4bit(quantized.get_input_embeddings())
