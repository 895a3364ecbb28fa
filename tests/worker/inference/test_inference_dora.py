"""DoRA adapters serve in the slotted engine, batched with LoRA rows, exactly as plain peft computes them."""

from __future__ import annotations

import pytest
import torch

from tests.support.adapters import save_peft_lora
from tests.worker.inference.conftest import MAX_LORA_RANK, load_peft_reference, peft_greedy
from worker.inference.engine import GenerationRequest, InferenceEngine
from worker.inference.merge import load_merged_model

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def dora_dirs(tiny_model_dir, lora_dirs, tmp_path_factory):
    dora = save_peft_lora(tiny_model_dir, tmp_path_factory.mktemp("dora") / "E", r=8, seed=11, scale=20.0,
                          targets=["q_proj", "v_proj", "down_proj"], use_dora=True)
    return {**lora_dirs, "E": dora}


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_dora_greedy_equals_peft_alone_and_in_a_mixed_batch(quantization, tiny_model_dir, dora_dirs, prompts):
    reference = load_peft_reference(tiny_model_dir, dora_dirs, quantization, names=("E", "A"))
    with InferenceEngine(tiny_model_dir, quantization=quantization, max_loaded_adapters=2,
                         max_lora_rank=MAX_LORA_RANK) as engine:
        for name in ("E", "A"):
            engine.adapters.ensure(name, lambda name=name: dora_dirs[name])
        jobs = [("E", prompts[0]), ("A", prompts[1]), (None, prompts[2]), ("E", prompts[3])]
        expected = [peft_greedy(reference, adapter, prompt, NEW_TOKENS, engine.eos_token_ids)
                    for adapter, prompt in jobs]
        alone = [engine.generate(GenerationRequest(p, a, max_new_tokens=NEW_TOKENS, temperature=0.0)).token_ids
                 for a, p in jobs]
        handles = [engine.submit(GenerationRequest(p, a, max_new_tokens=NEW_TOKENS, temperature=0.0)) for a, p in jobs]
        together = [h.result().token_ids for h in handles]
        base_only = peft_greedy(reference, None, prompts[0], NEW_TOKENS, engine.eos_token_ids)
    assert alone == expected
    assert together == expected
    assert expected[0] != base_only  # the DoRA adapter really changes the output


def test_merged_dora_matches_peft(tiny_model_dir, dora_dirs, prompts):
    reference = load_peft_reference(tiny_model_dir, dora_dirs, "none", names=("E",))
    merged, _ = load_merged_model(tiny_model_dir, dora_dirs["E"])
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        actual = merged(input_ids=ids).logits
    assert torch.allclose(actual, expected, atol=1e-4)
