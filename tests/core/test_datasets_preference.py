"""OpenAI's preference (DPO) JSONL format: detection, every refusal with its line number, and reading back."""

from __future__ import annotations

import json

import pytest

from core.datasets import Example, Message, iter_examples, validate_jsonl
from tests.support.datasets import chat_lines


def pair(*, messages=None, chosen="Paris.", rejected="Lyon, I think.", **extra) -> dict:
    """One preference line; `extra` adds or overrides top-level keys."""
    messages = messages or [{"role": "user", "content": "Capital of France?"}]
    return {"input": {"messages": messages}, "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}], **extra}


MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi", "name": "ann"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Capital of France?"},
]


def lines(*objs) -> list[bytes]:
    return [o if isinstance(o, bytes) else json.dumps(o).encode() for o in objs]


def test_valid_pairs_with_a_system_message_and_several_turns_are_accepted():
    report = validate_jsonl(lines(pair(), pair(messages=MULTI_TURN), pair(chosen="  Paris  ", rejected="Rome")))
    assert report.ok and report.errors == []
    assert report.format == "preference" and report.n_examples == 3


def test_iter_examples_gives_the_input_messages_and_both_answers():
    (example,) = iter_examples(lines(pair(messages=MULTI_TURN)))
    assert example == Example(
        format="preference",
        messages=[Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."),
                  Message("user", "Capital of France?")],
        chosen="Paris.", rejected="Lyon, I think.",
    )


def output(content="x", role="assistant") -> list[dict]:
    return [{"role": role, "content": content}]


def refused(value_of, key: str) -> dict:
    line = pair()
    line[key] = value_of
    return line


REFUSED = [
    (refused("Capital?", "input"), "field 'input' must be an object"),
    (refused({"messages": [{"role": "user", "content": "q"}], "tools": []}, "input"),
     "input.tools is not supported"),
    (refused({"messages": [{"role": "user", "content": "q"}], "parallel_tool_calls": True}, "input"),
     "input.parallel_tool_calls is not supported"),
    (refused({"messages": [{"role": "user", "content": "q"}], "extra": 1}, "input"),
     "input has unexpected field(s): 'extra'"),
    (refused({}, "input"), "missing field 'input.messages'"),
    (refused({"messages": []}, "input"), "input.messages must be a non-empty list"),
    (pair(messages=[{"role": "user", "content": "q"}, {"role": "robot", "content": "q"}]),
     "input.messages[1].role must be one of system, user, assistant, got 'robot'"),
    (pair(messages=[{"role": "user", "content": " "}]), "input.messages[0].content is empty"),
    (pair(messages=[{"role": "user", "content": 3}]), "input.messages[0].content must be a string"),
    (pair(messages=[{"role": "user", "content": "q", "weight": 1}]),
     "input.messages[0] has unexpected field(s): 'weight'"),
    (pair(messages=["q"]), "input.messages[0] must be an object"),
    (pair(messages=MULTI_TURN[:3]),
     "input.messages[2].role must be user: the last input message is the one the outputs answer"),
    (refused([], "preferred_output"), "preferred_output must hold exactly one assistant message"),
    (refused(output() * 2, "non_preferred_output"), "non_preferred_output must hold exactly one assistant message"),
    (refused({"role": "assistant", "content": "x"}, "preferred_output"),
     "preferred_output must hold exactly one assistant message"),
    (refused(output(role="user"), "preferred_output"), "preferred_output[0].role must be assistant, got 'user'"),
    (refused(output("  "), "non_preferred_output"), "non_preferred_output[0].content is empty"),
    (refused([{"role": "assistant", "content": "x", "weight": 0}], "preferred_output"),
     "preferred_output[0] has unexpected field(s): 'weight'"),
    (pair(rejected="Paris."), "preferred_output and non_preferred_output are identical"),
    (pair(rejected=" Paris.\n"), "preferred_output and non_preferred_output are identical"),
    (pair(extra=1), "unexpected field(s): 'extra'"),
    ({"input": {"messages": MULTI_TURN}, "preferred_output": output()}, "missing field 'non_preferred_output'"),
    ({"preferred_output": output(), "non_preferred_output": output("y")}, "missing field 'input'"),
]


@pytest.mark.parametrize("line, reason", REFUSED)
def test_each_refusal_names_its_line_and_field(line, reason):
    good = pair()
    report = validate_jsonl(lines(good, good, line, good))
    assert report.n_errors == 1 and report.n_examples == 3 and not report.ok
    assert report.errors[0].startswith(f"line 3: {reason}"), report.errors


def test_a_lone_input_key_is_a_preference_line_but_instruction_keeps_alpaca():
    assert validate_jsonl(lines({"input": {"messages": MULTI_TURN}})).errors == [
        "line 1: missing field 'preferred_output'"]
    alpaca = validate_jsonl(lines({"instruction": "Add.", "input": "2 and 2", "output": "4"}, {"input": "x",
                                                                                              "output": "y"}))
    assert alpaca.format == "alpaca" and alpaca.errors == ["line 2: missing field 'instruction'"]


@pytest.mark.parametrize("first, second, started, found", [
    (pair(), chat_lines(1)[0], "preference", "chat"),
    (chat_lines(1)[0], pair(), "chat", "preference"),
    ({"instruction": "Add.", "output": "4"}, pair(), "alpaca", "preference"),
    (pair(), {"text": "plain"}, "preference", "text"),
])
def test_mixing_preference_with_another_format_is_refused_both_ways(first, second, started, found):
    report = validate_jsonl(lines(first, second))
    assert report.format == started and report.n_examples == 1
    assert report.errors == [f"line 2: line is in {found} format, but the file started in {started} format"]


def test_the_unknown_format_message_names_the_preference_keys():
    (error,) = validate_jsonl(lines({"colour": "red"})).errors
    assert error.startswith("line 1: unknown example format") and "'preferred_output'" in error


def test_supervised_tokenization_refuses_preference_examples(tiny_model_dir):
    from transformers import AutoTokenizer

    from worker.training.data import tokenize_example

    (example,) = iter_examples(lines(pair()))
    with pytest.raises(ValueError, match="preference"):
        tokenize_example(example, AutoTokenizer.from_pretrained(tiny_model_dir), max_seq_length=64,
                         train_on_inputs=False)
