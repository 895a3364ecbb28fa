"""The slotted LoRA linears: per-row routing equals peft per adapter, for every kernel strategy."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.adapters import save_peft_lora
from tests.worker.inference.conftest import load_peft_reference
from worker.inference.lora_bank import STRATEGIES
from worker.inference.lora_slots import install_lora_slots, target_linear_names


@pytest.fixture(scope="module")
def slotted(tiny_model_dir, lora_dirs):
    """The fp32 tiny model with 3 slots: A in slot 0, B in slot 2."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    names_before = target_linear_names(model)
    bank = install_lora_slots(model, n_slots=3, max_rank=16)
    assert sorted(bank.layers) == sorted(names_before) and len(names_before) == 14
    bank.load_slot(0, lora_dirs["A"])
    bank.load_slot(2, lora_dirs["B"])
    return model, bank


@pytest.fixture(scope="module")
def reference(tiny_model_dir, lora_dirs):
    """Plain peft with A and B over the fp32 base."""
    return load_peft_reference(tiny_model_dir, lora_dirs, "none", names=("A", "B"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_row_gets_its_own_adapter(strategy, slotted, reference, prompts):
    model, bank = slotted
    input_ids = torch.tensor([prompts[0][:20]] * 4)
    rows = [("A", 0), (None, None), ("B", 2), ("A", 0)]
    bank.strategy = strategy
    try:
        with torch.no_grad(), bank.route([slot for _, slot in rows]):
            logits = model(input_ids=input_ids).logits
    finally:
        bank.strategy = "packed"
    with torch.no_grad():
        for i, (adapter, _) in enumerate(rows):
            if adapter is None:
                with reference.disable_adapter():
                    expected = reference(input_ids=input_ids[i : i + 1]).logits[0]
            else:
                reference.set_adapter(adapter)
                expected = reference(input_ids=input_ids[i : i + 1]).logits[0]
            torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=1e-4)


def test_outside_routing_the_model_is_the_base(slotted, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model, _ = slotted
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits)


def test_load_is_a_copy_into_the_slot_and_clear_zeroes_it(slotted, lora_dirs):
    _, bank = slotted
    adapter = bank.read_adapter(lora_dirs["B"])
    bank.write_slot(1, adapter)
    layer = bank.layers["model.layers.0.mlp.down_proj"]
    weights = adapter.modules["model.layers.0.mlp.down_proj"]
    assert bank.slot_rank(1) == 16 and layer.slot_ranks[1] == 16
    torch.testing.assert_close(layer.lora_A[1, :16], weights.lora_A)
    assert layer.slot_scaling[1] == pytest.approx(2.0)  # lora_alpha 32 / r 16
    assert bank.layers["model.layers.0.self_attn.q_proj"].slot_ranks[1] == 0  # B does not target q_proj
    bank.clear_slot(1)
    assert bank.slot_rank(1) == 0 and not layer.lora_A[1].any() and not layer.lora_B[1].any()


def test_rslora_and_alpha_pattern_scaling(tiny_model_dir, tmp_path, slotted):
    _, bank = slotted
    folder = save_peft_lora(
        tiny_model_dir, tmp_path / "rs", r=4, targets=["q_proj", "v_proj"], seed=7, use_rslora=True,
        alpha_pattern={"v_proj": 2},
    )
    config = json.loads((folder / "adapter_config.json").read_text())
    adapter = bank.read_adapter(folder)
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    v = adapter.modules["model.layers.1.self_attn.v_proj"]
    assert q.scaling == pytest.approx(config["lora_alpha"] / 2.0)  # alpha / sqrt(4)
    assert v.scaling == pytest.approx(2 / 2.0)
