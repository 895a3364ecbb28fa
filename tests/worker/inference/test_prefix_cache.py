"""Stored prompt prefixes: the block chain and its budget, and the engine's greedy parity with plain peft on hits."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from tests.support.peft_artifacts import token_logprobs
from tests.worker.inference.conftest import MAX_LORA_RANK, load_peft_reference, peft_greedy
from worker.inference.engine import GenerationRequest, InferenceEngine
from worker.inference.prefix_cache import DEFAULT_BLOCK_TOKENS, PrefixCache

LAYERS, HEADS, DIM, BLOCK = 2, 3, 4, 4
BLOCK_BYTES = LAYERS * 2 * HEADS * BLOCK * DIM * 4


def _prefilled(length: int, seed: int = 0) -> DynamicCache:
    """A one-row cache of `length` positions with distinct values."""
    generator = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(LAYERS):
        cache.update(torch.randn(1, HEADS, length, DIM, generator=generator),
                     torch.randn(1, HEADS, length, DIM, generator=generator), layer)
    return cache


def _seeded(hit, rows: int = 1) -> DynamicCache:
    cache = DynamicCache()
    hit.seed(cache, rows)
    return cache


def test_a_prompt_takes_the_longest_stored_chain_short_of_its_last_token():
    store = PrefixCache(max_bytes=100 * BLOCK_BYTES, block_tokens=BLOCK)
    prompt = list(range(100, 111))  # 11 tokens: two whole blocks
    cache = _prefilled(len(prompt))
    store.store(None, prompt, cache, 0)

    hit = store.lookup(None, prompt + [7, 8])
    assert hit.length == 8
    seeded = _seeded(hit, rows=2)
    for layer, stored in zip(seeded.layers, cache.layers):
        assert torch.equal(layer.keys, stored.keys[:, :, :8].expand(2, -1, -1, -1))
        assert torch.equal(layer.values, stored.values[:, :, :8].expand(2, -1, -1, -1))

    assert store.lookup(None, prompt[:8]).length == 4  # the last token is always prefilled
    assert store.lookup(None, prompt[:4]) is None
    assert store.lookup(None, prompt[:5] + [0] * 6).length == 4  # diverges in the second block
    assert store.lookup(None, [0] + prompt[1:]) is None  # diverges in the first
    assert store.lookup(("slot", 1), prompt) is None  # another owner's keys are never used
    assert store.stats()["hit_tokens"] == 8 + 4 + 4


def test_blocks_after_a_shared_prefix_are_found_only_after_that_prefix():
    store = PrefixCache(max_bytes=100 * BLOCK_BYTES, block_tokens=BLOCK)
    store.store(None, [1, 2, 3, 4, 5, 6, 7, 8, 0], _prefilled(9), 0)
    assert store.lookup(None, [9, 9, 9, 9, 5, 6, 7, 8, 0]) is None
    store.store(None, [1, 2, 3, 4, 9, 9, 9, 9, 0], _prefilled(9, seed=1), 0)
    assert store.stats()["blocks"] == 3  # the shared first block is stored once


def test_the_budget_evicts_the_ends_of_chains_first():
    store = PrefixCache(max_bytes=3 * BLOCK_BYTES, block_tokens=BLOCK)
    first = list(range(13))  # three blocks
    store.store(None, first, _prefilled(13), 0)
    second = first[:4] + [50, 51, 52, 53, 54]  # shares the first block, adds one
    store.store(None, second, _prefilled(9, seed=1), 0)
    stats = store.stats()
    assert stats["bytes"] <= 3 * BLOCK_BYTES and stats["evicted_blocks"] == 1
    assert store.lookup(None, second).length == 8
    assert store.lookup(None, first).length == 8  # its third block went, its first two stay reachable


def test_a_budget_of_zero_stores_nothing():
    store = PrefixCache(max_bytes=0, block_tokens=BLOCK)
    store.store(None, list(range(9)), _prefilled(9), 0)
    assert not store.enabled and store.lookup(None, list(range(9))) is None and store.stats()["blocks"] == 0


# ---- the engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caching_engine(tiny_model_dir, lora_dirs):
    with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=2, max_lora_rank=MAX_LORA_RANK,
                         max_batch_size=8, prefill_chunk_tokens=24) as engine:
        yield engine


@pytest.fixture(scope="module")
def reference(tiny_model_dir, lora_dirs):
    return load_peft_reference(tiny_model_dir, lora_dirs, "none", names=("A", "B", "C"))


def _sampled_logprobs_equal_peft(engine, reference, jobs) -> None:
    """Sampled tokens' log-probabilities (the whole logits row, not just its argmax) equal one peft forward."""
    handles = [engine.submit(GenerationRequest(p, a, 6, temperature=1.0, seed=i, logprobs=True))
               for i, (a, p) in enumerate(jobs)]
    for (adapter, prompt), handle in zip(jobs, handles):
        result = handle.result()
        if adapter is None:
            with reference.disable_adapter():
                expected = token_logprobs(reference, prompt, result.token_ids)
        else:
            reference.set_adapter(adapter)
            expected = token_logprobs(reference, prompt, result.token_ids)
        assert result.logprobs == pytest.approx(expected, abs=2e-4), f"adapter {adapter}"


def _whole_blocks(tokens: int) -> int:
    return tokens // DEFAULT_BLOCK_TOKENS * DEFAULT_BLOCK_TOKENS


def _greedy(engine, jobs, new_tokens=10):
    handles = [engine.submit(GenerationRequest(p, a, new_tokens, temperature=0.0)) for a, p in jobs]
    return [h.result().token_ids for h in handles]


def test_prompts_that_share_an_opening_prefill_the_rest_and_equal_peft(caching_engine, lora_dirs, reference, prompts):
    engine = caching_engine
    for name in ("A", "B"):
        engine.adapters.ensure(name, lambda name=name: lora_dirs[name])
    opening = prompts[3][:-5]  # the template's system turn and most of a long question
    variants = [opening + prompts[i][-5:] for i in range(3)] + [prompts[3]]
    jobs = [(adapter, prompt) for adapter in (None, "A", "B") for prompt in variants]
    expected = [peft_greedy(reference, a, p, 10, engine.eos_token_ids) for a, p in jobs]

    before = engine.stats()["prefix_cache_hit_tokens"]
    assert _greedy(engine, jobs[:1] + jobs[4:5] + jobs[8:9]) == [expected[0], expected[4], expected[8]]
    assert _greedy(engine, jobs) == expected  # mixed adapters, most rows starting from stored prefixes
    assert [engine.generate(GenerationRequest(p, a, 10, temperature=0.0)).token_ids for a, p in jobs] == expected
    _sampled_logprobs_equal_peft(engine, reference, jobs)
    assert engine.stats()["prefix_cache_hit_tokens"] - before >= 2 * len(jobs) * _whole_blocks(len(opening))


def test_an_adapter_written_into_a_slot_never_sees_the_previous_ones_prefixes(caching_engine, lora_dirs, reference,
                                                                               prompts):
    engine = caching_engine
    prompt = prompts[3]
    for name in ("A", "B"):
        engine.adapters.unload(name)
    engine.adapters.ensure("A", lambda: lora_dirs["A"])
    assert _greedy(engine, [("A", prompt)]) == [peft_greedy(reference, "A", prompt, 10, engine.eos_token_ids)]
    slot = engine.adapters.status("A").slot
    engine.adapters.unload("A")
    engine.adapters.ensure("C", lambda: lora_dirs["C"])
    assert engine.adapters.status("C").slot == slot
    assert _greedy(engine, [("C", prompt)]) == [peft_greedy(reference, "C", prompt, 10, engine.eos_token_ids)]
    _sampled_logprobs_equal_peft(engine, reference, [("C", prompt)])


def test_a_long_prompt_after_a_stored_prefix_chunks_only_the_rest(caching_engine, reference, prompts):
    engine = caching_engine
    long_prompt = [token for _ in range(3) for token in prompts[0]] + prompts[1]
    longer = long_prompt + [long_prompt[-1]] * 30
    for prompt, stored in ((long_prompt, None), (longer, _whole_blocks(len(long_prompt)))):
        before = engine.stats()
        assert _greedy(engine, [(None, prompt)]) == [peft_greedy(reference, None, prompt, 10, engine.eos_token_ids)]
        after = engine.stats()
        hit = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
        assert stored is None or hit == stored
        assert after["prefill_chunks"] - before["prefill_chunks"] == -(-(len(prompt) - hit) // 24)
        _sampled_logprobs_equal_peft(engine, reference, [(None, prompt)])


def test_a_prefix_that_cannot_be_stored_costs_the_request_nothing(caching_engine, reference, prompts, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for the prefix")

    monkeypatch.setattr(caching_engine._scheduler._prefix_cache, "store", out_of_memory)
    prompt = prompts[1] + prompts[0][-6:]  # not stored before
    expected = [peft_greedy(reference, None, prompt, 10, caching_engine.eos_token_ids)]
    assert _greedy(caching_engine, [(None, prompt)]) == expected
    assert _greedy(caching_engine, [(None, prompt), (None, prompts[2])]) == expected + [
        peft_greedy(reference, None, prompts[2], 10, caching_engine.eos_token_ids)]
