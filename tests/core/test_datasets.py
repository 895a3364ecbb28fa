"""Reading validated datasets back: the worker sees exactly what the API accepted."""

from __future__ import annotations

from core.datasets import read_examples
from tests.support.datasets import chat_lines, to_jsonl


def test_read_examples_handles_bom_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + to_jsonl(chat_lines(2)).replace(b"\n", b"\r\n") + b"\r\n\r\n")
    examples = read_examples(str(path))
    assert [e.format for e in examples] == ["chat", "chat"]
    assert examples[0].messages[-1].role == "assistant" and examples[0].messages[-1].weight == 1
