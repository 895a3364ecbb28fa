"""The one base-model loader: quantized as asked, and shaped for training or for serving."""

from __future__ import annotations

import pytest
import torch

from worker.base_loading import load_base_model, quantization_config
from worker.device import choose_device
from worker.model_parts import decoder_linears, is_4bit

CPU = choose_device("cpu")


def test_serving_loads_a_frozen_model_in_eval_mode(tiny_model_dir):
    model = load_base_model(tiny_model_dir, "nf4-dq", CPU, training=False)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    linears = decoder_linears(model).values()
    assert all(is_4bit(linear) and linear.weight.quant_state.nested for linear in linears)
    assert not is_4bit(model.get_output_embeddings())


def test_training_drops_the_cache_and_freezes_only_a_4bit_base(tiny_model_dir):
    full = load_base_model(tiny_model_dir, "none", CPU, training=True)
    assert full.config.use_cache is False
    assert all(p.requires_grad and p.dtype == torch.float32 for p in full.parameters())
    quantized = load_base_model(tiny_model_dir, "nf4", CPU, training=True, skip_modules=["lm_head", "down_proj"])
    assert not any(p.requires_grad for p in quantized.parameters())
    linears = decoder_linears(quantized)
    kinds = {name.rsplit(".", 1)[-1]: is_4bit(linear) for name, linear in linears.items()}
    assert kinds["q_proj"] and not kinds["down_proj"]
    assert not any(linear.weight.quant_state.nested for linear in linears.values() if is_4bit(linear))


def test_an_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantization_config("int8", torch.float32)
    assert quantization_config("none", torch.float32) is None
