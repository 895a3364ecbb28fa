"""Tokenization, loss labels, truncation, row building and data order."""

from __future__ import annotations

import pytest
import torch

from core.datasets import Example, Message
from worker.training.data import (
    IGNORE_INDEX,
    build_rows,
    step_batches,
    tokenize_dataset,
    tokenize_example,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def labelled_runs(tokenizer, tokenized) -> list[str]:
    """The decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token_id, label in zip(tokenized.input_ids, tokenized.labels):
        if label != IGNORE_INDEX:
            assert label == token_id
            current.append(token_id)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def tokenize(tokenizer, example, *, max_seq_length=1024, train_on_inputs=False):
    return tokenize_example(example, tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs)


CONVERSATION = Example(
    "chat",
    [
        Message("system", "You are terse."),
        Message("user", "What is 2+2?"),
        Message("assistant", "4."),
        Message("user", "And 3+3?"),
        Message("assistant", "Six, I think.", weight=0),
        Message("user", "Sure?"),
        Message("assistant", "Yes: 6."),
    ],
)


def test_chat_trains_only_weighted_assistant_turns_and_their_end_of_turn(tokenizer):
    tokenized = tokenize(tokenizer, CONVERSATION)
    assert labelled_runs(tokenizer, tokenized) == ["4.<|im_end|>", "Yes: 6.<|im_end|>"]
    # The end-of-turn token is also SmolLM2's EOS and PAD: it must still be learned.
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenized.labels.count(tokenizer.eos_token_id) == 2
    assert not tokenized.truncated


def test_chat_without_system_message_keeps_the_template_default(tokenizer):
    example = Example("chat", [Message("user", "Hi"), Message("assistant", "Hello!")])
    tokenized = tokenize(tokenizer, example)
    assert "You are a helpful AI assistant" in tokenizer.decode(tokenized.input_ids)
    assert labelled_runs(tokenizer, tokenized) == ["Hello!<|im_end|>"]


def test_chat_starting_with_the_assistant_is_found_by_content(tokenizer):
    example = Example("chat", [Message("assistant", "How can I help?"), Message("user", "Tell a joke")])
    assert labelled_runs(tokenizer, tokenize(tokenizer, example)) == ["How can I help?<|im_end|>"]


def test_alpaca_trains_the_output(tokenizer):
    example = Example("alpaca", [Message("user", "Add 1 and 2\n\nquickly"), Message("assistant", "3")])
    assert labelled_runs(tokenizer, tokenize(tokenizer, example)) == ["3<|im_end|>"]


def test_train_on_inputs_trains_every_token(tokenizer):
    tokenized = tokenize(tokenizer, CONVERSATION, train_on_inputs=True)
    assert tokenized.labels == tokenized.input_ids


def test_prompt_completion_trains_completion_and_eos(tokenizer):
    example = Example("prompt_completion", prompt="The sky is", completion=" blue.")
    tokenized = tokenize(tokenizer, example)
    assert labelled_runs(tokenizer, tokenized) == [" blue.<|im_end|>"]
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    with_inputs = tokenize(tokenizer, example, train_on_inputs=True)
    assert with_inputs.labels == with_inputs.input_ids


def test_text_trains_every_token_and_ends_with_eos(tokenizer):
    tokenized = tokenize(tokenizer, Example("text", text="Once upon a time."))
    assert tokenized.labels == tokenized.input_ids
    assert tokenized.input_ids[-1] == tokenizer.eos_token_id
    assert tokenized.n_labelled == tokenized.n_tokens - 1  # the first token has nothing before it


def test_truncation_is_reported_and_examples_with_nothing_left_are_dropped(tokenizer):
    long_answer = Example("chat", [Message("user", "Count."), Message("assistant", " ".join(["one"] * 200))])
    long_question = Example("chat", [Message("user", " ".join(["why"] * 200)), Message("assistant", "Because.")])
    short = Example("chat", [Message("user", "Hi"), Message("assistant", "Hey")])
    data = tokenize_dataset(
        [long_answer, long_question, short], tokenizer, max_seq_length=64, train_on_inputs=False
    )
    assert data.n_truncated == 2
    assert data.n_dropped == 1  # the long question lost its whole answer
    assert [e.n_tokens for e in data.examples][0] == 64
    assert all(e.n_tokens <= 64 for e in data.examples)


def _examples(tokenizer, n):
    return [
        tokenize(tokenizer, Example("chat", [Message("user", f"Question {i}?"), Message("assistant", "A" * (i + 1))]))
        for i in range(n)
    ]


def test_packed_rows_have_no_padding_and_restart_positions(tokenizer):
    examples = _examples(tokenizer, 4)
    (row,) = build_rows(examples, packing=True, row_token_cap=10_000, pad_id=tokenizer.pad_token_id)
    lengths = [e.n_tokens for e in examples]
    assert row.segment_lengths == lengths
    assert row.attention_mask is None
    assert row.input_ids.shape == (1, sum(lengths)) == row.targets.shape
    assert row.n_real_tokens == sum(lengths)
    assert row.n_labelled == sum(e.n_labelled for e in examples) == int((row.targets != IGNORE_INDEX).sum())
    expected_positions = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(row.position_ids[0], expected_positions)
    ends = torch.tensor(lengths).cumsum(0) - 1
    assert (row.targets[0, ends] == IGNORE_INDEX).all()  # no example predicts the next one's first token


def test_packing_respects_the_row_cap(tokenizer):
    examples = _examples(tokenizer, 6)
    cap = max(e.n_tokens for e in examples) * 2
    rows = build_rows(examples, packing=True, row_token_cap=cap, pad_id=tokenizer.pad_token_id)
    assert len(rows) > 1
    assert all(row.n_real_tokens <= cap for row in rows)
    assert sum(len(row.segment_lengths) for row in rows) == 6


def test_padded_micro_batches_mask_padding(tokenizer):
    examples = _examples(tokenizer, 3)
    rows = build_rows(examples, packing=False, row_token_cap=10_000, pad_id=tokenizer.pad_token_id)
    (row,) = rows
    assert row.input_ids.shape[0] == 3
    assert int(row.attention_mask.sum()) == row.n_real_tokens == sum(e.n_tokens for e in examples)
    assert (row.targets[row.attention_mask == 0] == IGNORE_INDEX).all()
    assert row.n_labelled == int((row.targets != IGNORE_INDEX).sum())


def test_data_order_depends_only_on_seed_and_epoch():
    first = step_batches(10, 4, seed=7, epoch=0)
    assert first == step_batches(10, 4, seed=7, epoch=0)
    assert [len(b) for b in first] == [4, 4, 2]
    assert sorted(i for b in first for i in b) == list(range(10))
    assert first != step_batches(10, 4, seed=7, epoch=1)
    assert first != step_batches(10, 4, seed=8, epoch=0)
