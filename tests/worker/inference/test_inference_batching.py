"""Continuous batching: mixed adapters in one batch, late joiners, seeds, stop strings, streaming, cancel."""

from __future__ import annotations

import asyncio

import pytest

from worker.inference.engine import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    TokenEvent,
)
from worker.inference.generation import GenerationError


def greedy(prompt, adapter, n, **kwargs) -> GenerationRequest:
    return GenerationRequest(prompt, adapter, max_new_tokens=n, temperature=0.0, **kwargs)


def test_mixed_adapters_batched_together_equal_each_alone(fp32_engine, prompts):
    jobs = [("A", 0, 20), ("B", 1, 16), (None, 2, 12), ("C", 3, 20), ("B", 0, 8), (None, 3, 20)]
    alone = [fp32_engine.generate(greedy(prompts[p], a, n)).token_ids for a, p, n in jobs]
    before = fp32_engine.stats()
    handles = [fp32_engine.submit(greedy(prompts[p], a, n)) for a, p, n in jobs]
    together = [h.result().token_ids for h in handles]
    assert together == alone
    stats = fp32_engine.stats()
    assert stats["mixed_adapter_steps"] > before["mixed_adapter_steps"]
    assert stats["max_distinct_adapters"] >= 3
    assert stats["max_batch_size"] >= 4


def test_a_late_request_joins_the_running_batch(fp32_engine, prompts):
    long_jobs = [("A", 0), ("C", 1), (None, 3)]
    late_job = ("B", 2)
    long_alone = [fp32_engine.generate(greedy(prompts[p], a, 150)) for a, p in long_jobs]
    assert all(r.finish_reason == "length" for r in long_alone)
    late_alone = fp32_engine.generate(greedy(prompts[late_job[1]], late_job[0], 10)).token_ids
    joins_before = fp32_engine.stats()["joined_running_batch"]

    long_handles = [fp32_engine.submit(greedy(prompts[p], a, 150)) for a, p in long_jobs]
    for handle in long_handles:  # every long request is decoding
        assert isinstance(next(iter(handle)), TokenEvent)
    late = fp32_engine.submit(greedy(prompts[late_job[1]], late_job[0], 10))
    late_result = late.result()
    # The late request finished while the long ones were still running: it did not wait for them.
    assert not any(handle.done for handle in long_handles)
    assert late_result.token_ids == late_alone
    assert [h.result().token_ids for h in long_handles] == [r.token_ids for r in long_alone]
    assert fp32_engine.stats()["joined_running_batch"] > joins_before


def test_same_seed_same_tokens_alone_and_batched(fp32_engine, prompts):
    request = GenerationRequest(prompts[1], "A", max_new_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = fp32_engine.generate(request).token_ids
    others = [
        fp32_engine.submit(GenerationRequest(prompts[i % 4], a, max_new_tokens=20, temperature=1.0, seed=i))
        for i, a in enumerate(["B", None, "C", "A"])
    ]
    batched = fp32_engine.submit(request)
    assert batched.result().token_ids == alone
    for handle in others:
        handle.result()
    reseeded = GenerationRequest(prompts[1], "A", max_new_tokens=16, temperature=0.9, top_p=0.95, seed=99)
    assert fp32_engine.generate(reseeded).token_ids != alone


def test_stop_string_cuts_the_output(fp32_engine, prompts):
    full = fp32_engine.generate(greedy(prompts[0], "A", 24))
    assert full.finish_reason == "length" and full.completion_tokens == 24
    assert len(full.text) > 12
    stop = full.text[8:11]
    cut = full.text[: full.text.find(stop)]
    stopped = fp32_engine.generate(greedy(prompts[0], "A", 24, stop=["zzzz-never", stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == cut
    assert stopped.completion_tokens < 24


def test_text_deltas_concatenate_to_the_decode(fp32_engine, prompts):
    for seed in range(3):
        handle = fp32_engine.submit(
            GenerationRequest(prompts[3], "B", max_new_tokens=40, temperature=1.5, seed=seed)
        )
        events = list(handle)
        tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
        finish = events[-1]
        assert isinstance(finish, FinishEvent)
        text = "".join(e.text for e in events if isinstance(e, TokenEvent))
        assert text == fp32_engine.decode(tokens)
        assert finish.prompt_tokens == len(prompts[3])


def test_async_iteration_sees_the_same_events(fp32_engine, prompts):
    handle = fp32_engine.submit(greedy(prompts[0], "C", 10))

    async def consume():
        return [event async for event in handle.aiter()]

    events = asyncio.run(consume())
    assert events == list(handle)
    assert isinstance(events[-1], FinishEvent) and events[-1].finish_reason == "length"


def test_cancel_drops_the_request_and_releases_its_adapter(fp32_engine, prompts):
    handle = fp32_engine.submit(greedy(prompts[0], "B", 1500))
    assert fp32_engine.adapters.status("B").in_use == 1
    next(iter(handle))
    handle.cancel()
    events = list(handle)
    assert isinstance(events[-1], ErrorEvent) and "cancelled" in events[-1].message
    assert len(events) < 1500
    with pytest.raises(GenerationError):
        handle.result()
    assert fp32_engine.adapters.status("B").in_use == 0


def test_invalid_requests_are_refused(fp32_engine, prompts):
    from worker.inference.adapters import AdapterNotReadyError

    with pytest.raises(ValueError):
        fp32_engine.submit(greedy([], None, 4))
    with pytest.raises(ValueError):
        fp32_engine.submit(greedy(prompts[0], None, 0))
    with pytest.raises(ValueError):
        fp32_engine.submit(greedy([10**9], None, 4))
    with pytest.raises(AdapterNotReadyError):
        fp32_engine.submit(greedy(prompts[0], "never-loaded", 4))


def test_one_padded_prefill_of_mixed_lengths_and_adapters(fp32_engine, prompts):
    """Driven step by step: four prompts of different lengths and adapters prefill in one forward."""
    import torch

    from worker.inference.generation import GenerationHandle
    from worker.inference.scheduler import ActiveSequence, BatchScheduler

    jobs = [("A", 0), (None, 1), ("B", 2), ("C", 3)]
    alone = [fp32_engine.generate(greedy(prompts[p], a, 10)).token_ids for a, p in jobs]
    scheduler = BatchScheduler(  # not started: this test runs its loop
        fp32_engine.model, fp32_engine.slots, fp32_engine.decode, fp32_engine.eos_token_ids, 8, fp32_engine.device
    )
    handles = []
    for adapter, p in jobs:
        request = greedy(prompts[p], adapter, 10)
        handles.append(GenerationHandle(request))
        slot = fp32_engine.adapters.status(adapter).slot if adapter else None
        scheduler.submit(ActiveSequence(request, handles[-1], slot, scheduler.new_text_stream([]), lambda: None))
    with torch.inference_mode():
        while scheduler.stats()["running"] or scheduler.stats()["waiting"]:
            scheduler._step()
    stats = scheduler.stats()
    assert stats["max_prefill_batch"] == 4 and stats["decode_steps"] == 9
    assert [h.result().token_ids for h in handles] == alone


def test_closing_the_engine_ends_unfinished_requests(tiny_model_dir, lora_dirs, prompts):
    from worker.inference.engine import InferenceEngine

    engine = InferenceEngine(tiny_model_dir, quantization="none", max_loaded_adapters=1, max_lora_rank=8)
    engine.adapters.ensure("A", lambda: lora_dirs["A"])
    handle = engine.submit(greedy(prompts[0], "A", 1900))
    next(iter(handle))
    engine.close()
    events = list(handle)
    assert isinstance(events[-1], ErrorEvent) and "stopped" in events[-1].message
    assert engine.adapters.status("A").in_use == 0
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(greedy(prompts[0], None, 4))


def test_text_held_back_at_the_end_of_sequence_is_released(fp32_engine, tokenizer):
    """A possible stop-string start followed by end-of-sequence still reaches the token texts."""
    import torch

    from worker.inference.generation import GenerationHandle
    from worker.inference.scheduler import ActiveSequence, BatchScheduler

    scheduler = BatchScheduler(  # not started: the test feeds it chosen logits
        fp32_engine.model, fp32_engine.slots, fp32_engine.decode, fp32_engine.eos_token_ids, 8, fp32_engine.device
    )
    request = greedy([1, 2, 3], None, 20, stop=["abc"])
    handle = GenerationHandle(request)
    sequence = ActiveSequence(request, handle, None, scheduler.new_text_stream(request.stop), lambda: None)
    vocab = fp32_engine.model.config.vocab_size
    for token in tokenizer("hello ab", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]:
        logits = torch.zeros(vocab)
        logits[token] = 10.0
        scheduler._accept(sequence, logits)
    events = list(handle)
    assert [e.text for e in events[:-1]][-1] == "ab" and events[-2].token_id == tokenizer.eos_token_id
    assert "".join(e.text for e in events[:-1]) == "hello ab"
    assert events[-1] == FinishEvent("stop", 3, len(events) - 1)


def test_encoding_helpers(fp32_engine, tokenizer, prompts):
    assert fp32_engine.encode_chat([{"role": "user", "content": "hi"}]) == prompts[2]
    assert fp32_engine.encode_text("hello world") == tokenizer("hello world")["input_ids"]
    assert fp32_engine.max_context() == 2048
