"""The fused LoRA forward: the same values and gradients as peft's, a fair dropout, peft's path where it must."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
from worker.device import choose_device
from worker.training.fused_lora import LoraDelta, keep_mask, lora_delta, use_fused_lora
from worker.training.model import load_model_for_training


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _pair(dropout=0.0, **config):
    """A peft model and an identical copy with the fused forward."""
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = get_peft_model(TwoLinears(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                        target_modules=["up", "down"], **config))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.1)  # B starts at zero; make the adapter matter
        models.append(model)
    assert use_fused_lora(models[1]) == 2
    return models


def _output_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, expected):
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(got[2][name], expected[2][name], atol=1e-6, rtol=1e-5, msg=name)


def test_without_dropout_values_and_gradients_equal_peft():
    peft_model, fused = _pair()
    x = torch.randn(3, 7, 24)
    _assert_same(_output_and_grads(fused, x), _output_and_grads(peft_model, x))


def test_with_dropout_it_is_the_same_function_of_the_mask():
    """Output and gradients equal the dropout formula computed by hand from the same mask."""
    torch.manual_seed(1)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    dropout = nn.Dropout(0.3).train()
    torch.manual_seed(7)
    keep, scale = keep_mask(x.shape, 0.3, x.device)
    lora_a, lora_b = nn.Linear(16, 4, bias=False).double(), nn.Linear(4, 6, bias=False).double()
    with torch.no_grad():
        lora_a.weight.copy_(a)
        lora_b.weight.copy_(b)
    torch.manual_seed(7)
    got = lora_delta(x, lora_a, lora_b, dropout, 2.0)
    expected = ((x * keep * scale) @ lora_a.weight.T) @ lora_b.weight.T * 2.0
    torch.testing.assert_close(got, expected)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraDelta.apply(x, a, b, keep, 2.0 * scale), (x, a, b))


def test_keep_mask_drops_p_of_the_elements_and_scales_the_rest_back():
    torch.manual_seed(0)
    keep, scale = keep_mask(torch.Size([1000, 1000]), 0.05, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (1000, 1000)
    dropped = 1 - keep.double().mean().item()
    assert dropped == pytest.approx(0.05, abs=0.002)  # 1e6 draws: the std is 0.0002
    assert scale == pytest.approx(1 / (1 - 0.05), rel=1e-5)
    columns = keep.double().mean(dim=0)  # each position is dropped alike (no pattern in the 16-bit cut)
    assert columns.min() > 0.88 and columns.max() < 1.0


def test_dropout_follows_the_seed_and_is_off_in_eval_mode():
    _, fused = _pair(dropout=0.5)
    x = torch.randn(2, 9, 24)
    fused.train()
    torch.manual_seed(3)
    first = fused(x)
    torch.manual_seed(3)
    assert torch.equal(fused(x), first)
    assert not torch.equal(fused(x), first)
    fused.eval()
    peft_model, _ = _pair(dropout=0.5)
    peft_model.eval()
    torch.testing.assert_close(fused(x), peft_model(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["dora", "disabled", "merged"])
def test_layers_that_are_not_plain_lora_keep_peft_forward(case):
    peft_model, fused = _pair(use_dora=case == "dora")
    x = torch.randn(2, 5, 24)
    if case == "disabled":
        with fused.disable_adapter(), peft_model.disable_adapter():
            torch.testing.assert_close(fused(x), peft_model(x))
            torch.testing.assert_close(fused(x), peft_model.get_base_model()(x))
        return
    if case == "merged":
        fused.merge_adapter()
        peft_model.merge_adapter()
    _assert_same(_output_and_grads(fused, x), _output_and_grads(peft_model, x))


def test_only_peft_lora_linears_are_routed():
    peft_model = get_peft_model(TwoLinears(), LoraConfig(r=2, target_modules=["up"]))
    assert use_fused_lora(peft_model) == 1
    routed = [m for m in peft_model.modules() if "forward" in vars(m)]
    assert len(routed) == 1 and isinstance(routed[0], LoraLinear)


def _training_model(tiny_model_dir, **peft):
    config = resolve_training(Hyperparameters(), PeftConfigSpec(**peft), n_examples=100, seed=0)
    torch.manual_seed(0)
    return load_model_for_training(str(tiny_model_dir), config, choose_device()).model


def _lora_grads(model, input_ids, seed):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_4bit_training_model_is_fused_and_matches_peft(tiny_model_dir):
    """QLoRA as the recipe loads it: every 4-bit LoRA linear routed, and the gradients peft's own forward gives."""
    model = _training_model(tiny_model_dir, dropout=0.0)
    routed = [m for m in model.modules() if "forward" in vars(m)]
    assert len(routed) == 14  # 2 layers x 7 linears
    input_ids = torch.randint(10, 40_000, (1, 20), generator=torch.Generator().manual_seed(0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.02)
    fused = _lora_grads(model, input_ids, seed=0)
    for module in routed:
        del module.forward  # back to peft's
    reference = _lora_grads(model, input_ids, seed=0)
    for name, grad in reference.items():
        torch.testing.assert_close(fused[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_recomputes_the_same_dropout_mask(tiny_model_dir):
    """Checkpointing replays the RNG, so its gradients equal those of a run that keeps its activations."""
    input_ids = torch.randint(10, 40_000, (1, 20), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        model = _training_model(tiny_model_dir, dropout=0.2, gradient_checkpointing=checkpointing)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        grads.append(_lora_grads(model, input_ids, seed=5))
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)
