"""Greedy outputs of the slotted engine equal plain peft, token for token, on fp32 and 4-bit NF4 bases."""

from __future__ import annotations

import pytest
import torch

from tests.worker.inference.conftest import (
    MAX_LORA_RANK,
    load_peft_reference,
    peft_greedy,
)
from worker.inference.engine import GenerationRequest, InferenceEngine
from worker.inference.lora_slots import SlottedLoraLinear

NEW_TOKENS = 24


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_greedy_matches_plain_peft(quantization, tiny_model_dir, lora_dirs, prompts):
    reference = load_peft_reference(tiny_model_dir, lora_dirs, quantization, names=("A", "B"))
    with InferenceEngine(
        tiny_model_dir, quantization=quantization, max_loaded_adapters=2, max_lora_rank=MAX_LORA_RANK
    ) as engine:
        if quantization == "nf4-dq":
            import bitsandbytes as bnb

            wrapped = [m.base_layer for m in engine.model.modules() if isinstance(m, SlottedLoraLinear)]
            assert wrapped and all(isinstance(m, bnb.nn.Linear4bit) for m in wrapped)
        for name in ("A", "B"):
            engine.adapters.ensure(name, lambda name=name: lora_dirs[name])
        outputs = {}
        for adapter in ("A", "B", None):
            for prompt in prompts[:2]:
                expected = peft_greedy(reference, adapter, prompt, NEW_TOKENS, engine.eos_token_ids)
                request = GenerationRequest(prompt, adapter, max_new_tokens=NEW_TOKENS, temperature=0.0)
                result = engine.generate(request)
                assert result.token_ids == expected, f"adapter {adapter} differs from peft"
                outputs[adapter, tuple(prompt)] = result.token_ids
        # The adapters really change the output, so the comparison above means something.
        first = tuple(prompts[0])
        assert len({tuple(outputs[a, first]) for a in ("A", "B", None)}) == 3
        assert len(set(outputs["A", first])) > 5


def test_logprobs_match_peft_forward_in_a_mixed_batch(fp32_engine, tiny_model_dir, lora_dirs, prompts):
    """Each row's per-step log-probabilities in a mixed, padded batch equal a full peft forward pass."""
    reference = load_peft_reference(tiny_model_dir, lora_dirs, "none", names=("A", "B", "C"))
    jobs = [("A", prompts[0]), ("B", prompts[1]), (None, prompts[2]), ("C", prompts[3]), ("A", prompts[2])]
    handles = [
        fp32_engine.submit(
            GenerationRequest(prompt, adapter, max_new_tokens=12, temperature=1.0, seed=i, logprobs=True)
        )
        for i, (adapter, prompt) in enumerate(jobs)
    ]
    for (adapter, prompt), handle in zip(jobs, handles):
        result = handle.result()
        full = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            if adapter is None:
                with reference.disable_adapter():
                    logits = reference(input_ids=full).logits[0]
            else:
                reference.set_adapter(adapter)
                logits = reference(input_ids=full).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        expected = [float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(result.token_ids)]
        assert result.logprobs == pytest.approx(expected, abs=1e-4)
