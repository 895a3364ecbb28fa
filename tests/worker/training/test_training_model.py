"""Model loading: 4-bit quantization, its report, and evaluation that keeps gradients intact."""

from __future__ import annotations

import json

import pytest
import torch

from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
from worker.device import choose_device
from worker.training.model import (
    evaluation_mode,
    load_model_for_training,
    quantization_report,
)


def _load(tiny_model_dir, **peft):
    config = resolve_training(Hyperparameters(), PeftConfigSpec(**peft), n_examples=100, seed=0)
    torch.manual_seed(0)
    return load_model_for_training(str(tiny_model_dir), config, choose_device())


def test_nf4_with_double_quantization_report(tiny_model_dir):
    report = quantization_report(_load(tiny_model_dir).model)
    assert report["decoder_linears"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert report["linear4bit"] == 14
    assert report["all_nested"] is True
    assert report["quant_type"] == "nf4"
    assert report["blocksize"] == 64
    assert 4.0 < report["bits_per_param"] < 4.2
    assert report["compute_dtype"] == "float32"
    json.dumps(report)


def test_nf4_without_double_quantization_costs_half_a_bit_more(tiny_model_dir):
    report = quantization_report(_load(tiny_model_dir, quantization="nf4").model)
    assert report["linear4bit"] == 14
    assert report["all_nested"] is False
    assert report["bits_per_param"] == pytest.approx(4.5, abs=0.01)


def test_lora_without_quantization_keeps_full_precision(tiny_model_dir):
    loaded = _load(tiny_model_dir, method="dora", quantization="none")
    report = quantization_report(loaded.model)
    assert report["linear4bit"] == 0 and report["bits_per_param"] == 32.0
    trainable, total = loaded.param_counts()
    assert 0 < trainable < total
    assert any("lora_magnitude_vector" in n for n, p in loaded.model.named_parameters() if p.requires_grad)


def _adapter_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_evaluation_mode_does_not_break_later_gradients(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference in eval mode, which drops gradients."""
    model = _load(tiny_model_dir, dropout=0.0).model
    model.train()
    input_ids = torch.randint(10, 40_000, (1, 24), generator=torch.Generator().manual_seed(0))
    before = _adapter_grads(model, input_ids)
    with evaluation_mode(model), torch.no_grad():
        assert not model.training
        model(input_ids=input_ids, use_cache=False)
    assert model.training
    after = _adapter_grads(model, input_ids)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    first_layer = [g for n, g in after.items() if "layers.0." in n and "lora_B" in n]
    assert all(g.abs().max() > 0 for g in first_layer)
