"""Incremental detokenization: multi-byte characters and stop strings, with SmolLM2's real tokenizer."""

from __future__ import annotations

import pytest

from worker.inference.text_stream import TextStream

TEXT = "Grüße, 世界! 🙂🚀 naïve café — done."


@pytest.fixture(scope="module")
def decode(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream_all(stream: TextStream, ids: list[int]) -> list[str]:
    deltas = []
    for token in ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            return deltas
    deltas.append(stream.finish())
    return deltas


def test_multibyte_characters_are_never_split(tokenizer, decode):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split())  # some characters span several byte-level tokens
    assert any("\ufffd" in decode(ids[:i]) for i in range(1, len(ids)))
    deltas = stream_all(TextStream(decode), ids)
    assert "".join(deltas) == decode(ids) == TEXT
    assert not any("\ufffd" in delta for delta in deltas)


def test_stop_string_cuts_before_its_first_occurrence(tokenizer, decode):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    stream = TextStream(decode, stop=["café", "!"])
    deltas = stream_all(stream, ids)
    assert stream.stopped
    assert "".join(deltas) == "Grüße, 世界"


def test_a_possible_stop_start_is_held_back_then_released(tokenizer, decode):
    ids = tokenizer("a b c d", add_special_tokens=False)["input_ids"]
    stream = TextStream(decode, stop=[" c x"])
    deltas = stream_all(stream, ids)
    assert not stream.stopped
    assert "".join(deltas) == "a b c d"
    assert deltas[1] == " b" and deltas[2] == ""  # " c" could have begun " c x"


def test_stop_string_spanning_tokens(tokenizer, decode):
    ids = tokenizer("The answer is 42. The end", add_special_tokens=False)["input_ids"]
    stream = TextStream(decode, stop=["42. T"])
    assert "".join(stream_all(stream, ids)) == "The answer is "
