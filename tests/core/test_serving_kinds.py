"""core/serving_kinds.py: an adapter's kinds, and which engines serve them."""

from __future__ import annotations

import pytest

from core.schemas.peft_methods import PeftMethod
from core.serving_kinds import PATCHBAY_ENGINE_KINDS, adapter_kinds, engines_serving


def test_an_adapter_needs_its_method_and_sparse_when_it_carries_sparse_deltas():
    assert adapter_kinds("qlora", None) == ["qlora"]
    assert adapter_kinds("lora", {"layer_drop": {"rate": 0.1}}) == ["lora"]
    assert adapter_kinds("lora", {"sparse": {"density": 0.01}}) == ["lora", "sparse"]


@pytest.mark.parametrize(("kinds", "engines"), [
    (["lora"], ["patchbay", "vllm"]),
    (["qlora"], ["patchbay", "vllm"]),
    (["dora"], ["patchbay"]),
    (["ia3"], ["patchbay"]),
    (["prefix_tuning"], ["patchbay"]),
    (["bottleneck_adapter"], ["patchbay"]),
    (["loha"], ["patchbay"]),
    (["lora", "sparse"], ["patchbay"]),
    (["unknown"], []),
])
def test_engines_serving(kinds, engines):
    assert engines_serving(kinds) == engines


def test_our_engine_serves_every_method_patchbay_trains():
    assert set(PeftMethod.__args__) <= set(PATCHBAY_ENGINE_KINDS)
