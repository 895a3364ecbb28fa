"""oneDNN linears on CPU: the same results as `nn.Linear` up to rounding, and only where they apply."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.worker.inference.conftest import MAX_LORA_RANK, load_peft_reference, peft_greedy
from worker.inference.engine import GenerationRequest, InferenceEngine
from worker.inference.fast_linear import onednn_available, use_onednn_linears

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


class _Subclass(nn.Linear):
    """Stands for quantized linears (bitsandbytes' Linear4bit is an nn.Linear subclass)."""


def test_switches_plain_linears_only_and_keeps_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32, bias=False), _Subclass(32, 8),
                          nn.Linear(8, 8).to(torch.float16))
    inputs = torch.randn(5, 3, 64)
    with torch.inference_mode():
        expected = [model[0](inputs)]
        assert use_onednn_linears(model) == 2
        assert "forward" in vars(model[0]) and "forward" in vars(model[2])
        assert "forward" not in vars(model[3]) and "forward" not in vars(model[4])
        got = model[0](inputs)
        assert got.shape == expected[0].shape
        assert torch.allclose(got, expected[0], atol=1e-5, rtol=1e-5)
        hidden = torch.relu(got)
        assert torch.allclose(model[2](hidden), nn.functional.linear(hidden, model[2].weight), atol=1e-5)


def test_falls_back_where_gradients_are_needed():
    layer = nn.Linear(16, 4)
    use_onednn_linears(layer)
    inputs = torch.randn(2, 16, requires_grad=True)
    layer(inputs).sum().backward()
    assert inputs.grad is not None and layer.weight.grad is not None


def test_engine_greedy_equals_peft_with_and_without_onednn(tiny_model_dir, lora_dirs, prompts):
    reference = load_peft_reference(tiny_model_dir, lora_dirs, "none", names=("A", "B"))
    outputs = {}
    for onednn in (True, False):
        with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=2,
                             max_lora_rank=MAX_LORA_RANK, onednn_linears=onednn) as engine:
            switched = [m for m in engine.model.modules() if "forward" in vars(m)]
            assert bool(switched) is onednn
            for name in ("A", "B"):
                engine.adapters.ensure(name, lambda name=name: lora_dirs[name])
            jobs = [(a, p) for a in ("A", "B", None) for p in prompts[:2]]
            handles = [engine.submit(GenerationRequest(p, a, 16, temperature=0.0)) for a, p in jobs]
            outputs[onednn] = [h.result().token_ids for h in handles]
            for (adapter, prompt), tokens in zip(jobs, outputs[onednn]):
                assert tokens == peft_greedy(reference, adapter, prompt, 16, engine.eos_token_ids)
    assert outputs[True] == outputs[False]
