"""Long prompts prefill a chunk per decode step: the same greedy tokens as plain peft, and no stalled batch."""

from __future__ import annotations

import pytest

from tests.worker.inference.conftest import MAX_LORA_RANK, load_peft_reference, peft_greedy
from worker.inference.engine import GenerationRequest, InferenceEngine, TokenEvent

CHUNK = 16


@pytest.fixture(scope="module")
def chunking_engine(tiny_model_dir, lora_dirs):
    with InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=3, max_lora_rank=MAX_LORA_RANK,
                         max_batch_size=8, prefill_chunk_tokens=CHUNK, prefix_cache_bytes=0) as engine:
        # no stored prefixes: these tests count the chunks of prompts that repeat (see test_prefix_cache.py)
        for name in ("A", "B"):
            engine.adapters.ensure(name, lambda name=name: lora_dirs[name])
        yield engine


def _long(prompts, repeats: int = 6) -> list[int]:
    return [token for _ in range(repeats) for token in prompts[0]] + prompts[1]


def test_long_prompts_equal_peft_alone_and_beside_short_ones(chunking_engine, tiny_model_dir, lora_dirs, prompts):
    reference = load_peft_reference(tiny_model_dir, lora_dirs, "none", names=("A", "B"))
    long_prompt = _long(prompts)
    assert len(long_prompt) > 3 * CHUNK
    jobs = [("A", long_prompt), (None, prompts[2]), ("B", long_prompt[5:]), ("B", prompts[3]), (None, long_prompt)]
    before = chunking_engine.stats()["prefill_chunks"]
    alone = [chunking_engine.generate(GenerationRequest(p, a, 12, temperature=0.0)).token_ids for a, p in jobs]
    handles = [chunking_engine.submit(GenerationRequest(p, a, 12, temperature=0.0)) for a, p in jobs]
    together = [h.result().token_ids for h in handles]
    expected = [peft_greedy(reference, a, p, 12, chunking_engine.eos_token_ids) for a, p in jobs]
    assert alone == expected and together == expected
    assert chunking_engine.stats()["prefill_chunks"] - before >= 6 * (len(long_prompt) // CHUNK)


def test_the_running_batch_decodes_between_chunks(chunking_engine, prompts):
    running = chunking_engine.submit(GenerationRequest(prompts[2], "A", 200, temperature=0.0))
    next(event for event in running if isinstance(event, TokenEvent))  # it is decoding
    long_prompt = _long(prompts, repeats=10)
    chunks = -(-len(long_prompt) // CHUNK)
    arriving = chunking_engine.submit(GenerationRequest(long_prompt, None, 4, temperature=0.0))
    started = len(list(_events_so_far(running)))
    next(event for event in arriving if isinstance(event, TokenEvent))
    during = len(list(_events_so_far(running))) - started
    assert during >= chunks - 1, f"{during} tokens decoded while {chunks} chunks prefilled"
    running.cancel()
    arriving.result()


def _events_so_far(handle):
    with handle._changed:
        return list(handle._events)
