"""The running batch's reserved KV storage: views that grow past their reserve, and long greedy parity."""

from __future__ import annotations

import torch

from tests.worker.inference.conftest import load_peft_reference, peft_greedy
from worker.inference.engine import GenerationRequest
from worker.inference.kv_batch import RESERVE_BLOCK, ReservedLayer


def test_reserved_layer_equals_concatenation_past_its_reserve():
    generator = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 5, 4, generator=generator), torch.randn(3, 2, 5, 4, generator=generator)
    layer = ReservedLayer(keys, values)
    expected_keys, expected_values = keys, values
    for step in range(RESERVE_BLOCK * 2 + 3):  # fills the reserve twice
        width = 1 if step % 7 else 3
        new_keys = torch.randn(3, 2, width, 4, generator=generator)
        new_values = torch.randn(3, 2, width, 4, generator=generator)
        got_keys, got_values = layer.update(new_keys, new_values)
        expected_keys = torch.cat([expected_keys, new_keys], dim=-2)
        expected_values = torch.cat([expected_values, new_values], dim=-2)
        assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values)
    assert layer.get_seq_length() == expected_keys.shape[-2]


def test_reserved_layer_copies_its_input():
    keys, values = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    layer = ReservedLayer(keys, values)
    keys.fill_(1.0)
    assert layer.keys.abs().sum() == 0


def test_greedy_parity_past_the_reserve_while_rows_join_and_leave(fp32_engine, tiny_model_dir, lora_dirs, prompts):
    """Rows that outlive several reserve blocks, with shorter rows finishing and joining meanwhile, equal peft."""
    reference = load_peft_reference(tiny_model_dir, lora_dirs, "none", names=("A", "B", "C"))
    long_tokens = RESERVE_BLOCK * 2 + 10
    jobs = [("A", prompts[0], long_tokens), (None, prompts[1], 20), ("B", prompts[2], long_tokens),
            ("C", prompts[3], 45), ("A", prompts[1], 70)]
    handles = [fp32_engine.submit(GenerationRequest(p, a, n, temperature=0.0)) for a, p, n in jobs]
    late = fp32_engine.submit(GenerationRequest(prompts[2], "C", 30, temperature=0.0))
    for (adapter, prompt, n), handle in zip(jobs + [("C", prompts[2], 30)], handles + [late]):
        expected = peft_greedy(reference, adapter, prompt, n, fp32_engine.eos_token_ids)
        assert handle.result().token_ids == expected, f"adapter {adapter}, {n} tokens"
