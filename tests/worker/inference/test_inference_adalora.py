"""AdaLoRA adapters (pruned by peft's own rank allocation) join the LoRA slots and match plain peft."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.peft_artifacts import greedy_tokens, reference_model, save_trained_adalora
from tests.worker.inference.conftest import check_against_references
from worker.inference.engine import InferenceEngine

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def adalora_dir(tiny_model_dir, tmp_path_factory):
    folder = save_trained_adalora(tiny_model_dir, tmp_path_factory.mktemp("adalora") / "S", seed=31)
    pattern = json.loads((folder / "adapter_config.json").read_text())["rank_pattern"]
    kept = [sum(mask) for mask in pattern.values()]
    assert min(kept) < 6  # the allocation really pruned, so rank_pattern matters
    return folder


def test_adalora_converts_to_the_factors_peft_computes(adalora_dir, tiny_model_dir, prompts):
    from transformers import AutoModelForCausalLM

    from worker.inference.adapter_slots import install_adapter_slots

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    slots = install_adapter_slots(model, 1, 16, torch.float32, "none")
    adapter = slots.load_slot(0, adalora_dir)
    assert adapter.kind == "adalora" and 0 < adapter.rank <= 6
    reference = reference_model(tiny_model_dir, adalora_dir)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad(), slots.route([0]):
        logits = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_adalora_greedy_equals_peft_mixed_with_lora(quantization, adalora_dir, lora_dirs, tiny_model_dir, prompts):
    references = {
        "S": reference_model(tiny_model_dir, adalora_dir, quantization=quantization),
        "B": reference_model(tiny_model_dir, lora_dirs["B"], quantization=quantization),
        None: reference_model(tiny_model_dir, None, quantization=quantization),
    }
    with InferenceEngine(tiny_model_dir, quantization=quantization, max_loaded_adapters=2, max_lora_rank=16) as engine:
        engine.adapters.ensure("S", lambda: adalora_dir)
        engine.adapters.ensure("B", lambda: lora_dirs["B"])
        jobs = [("S", prompts[0]), ("B", prompts[1]), (None, prompts[0]), ("S", prompts[3])]
        expected = check_against_references(engine, references, jobs, NEW_TOKENS)
    assert expected[0] != greedy_tokens(references[None], prompts[0], NEW_TOKENS, engine.eos_token_ids)
