"""Packed rows must compute exactly what each example computes alone."""

from __future__ import annotations

import pytest
import torch

from worker.training.packed_attention import SEGMENT_LENGTHS_KWARG, use_packed_attention

LENGTHS = [7, 19, 1, 12]


@pytest.fixture()
def tiny_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # Even random weights make a leak obvious: it moves logits of magnitude ~1 by ~0.8.
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _examples():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(10, 40_000, (n,), generator=generator) for n in LENGTHS]


def _alone(model, examples):
    with torch.no_grad():
        return torch.cat([model(input_ids=ids[None], use_cache=False).logits[0] for ids in examples])


def _packed(model, examples, **kwargs):
    input_ids = torch.cat(examples)[None]
    position_ids = torch.cat([torch.arange(len(ids)) for ids in examples])[None]
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids, **kwargs).logits[0]


def test_packed_attention_matches_each_example_alone(tiny_lm):
    examples = _examples()
    alone = _alone(tiny_lm, examples)
    use_packed_attention(tiny_lm)
    packed = _packed(tiny_lm, examples, use_cache=False, **{SEGMENT_LENGTHS_KWARG: LENGTHS})
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-4)


def test_transformers_isolates_packed_rows_only_without_a_cache(tiny_lm):
    """transformers 5.24 derives a block-diagonal mask from position_ids only when no cache exists.

    This pins the behaviour we checked in `masking_utils._preprocess_mask_arguments`: with the
    config's default `use_cache=True` a DynamicCache is created and examples silently attend
    to each other. The recipe always passes `use_cache=False` (and uses its own attention).
    """
    examples = _examples()
    alone = _alone(tiny_lm, examples)
    torch.testing.assert_close(_packed(tiny_lm, examples, use_cache=False), alone, atol=1e-4, rtol=1e-4)
    leaky = _packed(tiny_lm, examples, use_cache=True)
    assert (leaky - alone).abs().max() > 0.1
