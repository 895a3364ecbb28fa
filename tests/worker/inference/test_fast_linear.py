"""oneDNN linears on CPU: taken where measured faster, the same results as `nn.Linear` up to rounding, only where
they apply."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.worker.inference.conftest import MAX_LORA_RANK, load_peft_reference, peft_greedy
from worker.inference.engine import GenerationRequest, InferenceEngine
from worker.inference.fast_linear import ROW_BUCKETS, LinearKernels, onednn_available, use_onednn_linears

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


def test_calibration_keeps_the_faster_kernel_for_each_row_count():
    kernels = LinearKernels()
    calls = []

    def run(rows):  # oneDNN slower below 16 rows, faster from there
        calls.append((rows, kernels.forced))
        slow = kernels.forced if rows < 16 else not kernels.forced
        time.sleep(0.004 if slow else 0.0)

    kernels.calibrate(run, repeats=2)
    assert kernels.forced is None
    assert {rows for rows, _ in calls} == set(ROW_BUCKETS)
    assert sum(1 for rows, onednn in calls if rows == 16 and onednn) == 3  # warm-up + 2 timed, each kernel
    assert kernels.describe() == {1: "default", 4: "default", 16: "onednn", 64: "onednn", 256: "onednn"}
    assert [kernels.use_onednn(rows) for rows in (1, 3, 4, 7, 9, 16, 64, 4096)] == [
        False, False, False, False, True, True, True, True]
    assert set(kernels.timings_ms[1]) == {"onednn", "default"}


def test_each_call_takes_the_kernel_chosen_for_its_rows():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    kernels = LinearKernels()
    use_onednn_linears(layer, kernels)
    kernels.onednn_by_bucket = {bucket: bucket >= 16 for bucket in ROW_BUCKETS}
    small, large = torch.randn(2, 3, 64), torch.randn(4, 12, 64)  # 6 rows (bucket 4) and 48 rows (bucket 64)
    with torch.inference_mode():
        for inputs, onednn in ((small, False), (large, True)):
            with _OpNames() as ops:
                got = layer(inputs)
            assert ("mkldnn._linear_pointwise" in " ".join(ops.names)) is onednn, ops.names
            assert torch.allclose(got, nn.functional.linear(inputs, layer.weight, layer.bias), atol=1e-5)


class _OpNames(TorchDispatchMode):
    """The names of the ATen ops that run inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


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
            assert set(engine.linear_kernels.timings_ms) == (set(ROW_BUCKETS) if onednn else set())
            for name in ("A", "B"):
                engine.adapters.ensure(name, lambda name=name: lora_dirs[name])
            jobs = [(a, p) for a in ("A", "B", None) for p in prompts[:2]]
            handles = [engine.submit(GenerationRequest(p, a, 16, temperature=0.0)) for a, p in jobs]
            outputs[onednn] = [h.result().token_ids for h in handles]
            for (adapter, prompt), tokens in zip(jobs, outputs[onednn]):
                assert tokens == peft_greedy(reference, adapter, prompt, 16, engine.eos_token_ids)
    assert outputs[True] == outputs[False]
