"""`/v1/files` with OpenAI's preference (DPO) lines: accepted, refused line by line, and previewed."""

from __future__ import annotations

import json

from tests.api.test_file_preview import preview
from tests.api.test_files import upload
from tests.support.datasets import chat_lines, to_jsonl


def pairs(n: int) -> list[dict]:
    return [{"input": {"messages": [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": f"What is {i} + 1?"}]},
             "preferred_output": [{"role": "assistant", "content": f"{i + 1}."}],
             "non_preferred_output": [{"role": "assistant", "content": "No idea."}]} for i in range(n)]


def test_a_valid_preference_file_is_processed_with_its_count(api):
    body = upload(api, to_jsonl(pairs(4))).json()
    assert body["status"] == "processed" and body["status_details"] is None, body
    assert body["format"] == "preference" and body["n_examples"] == 4


def test_an_invalid_preference_file_names_each_bad_line(api):
    lines = pairs(5)
    lines[1]["preferred_output"] = []
    lines[3]["non_preferred_output"] = lines[3]["preferred_output"]
    body = upload(api, to_jsonl([*lines, chat_lines(1)[0]])).json()
    assert body["status"] == "error" and body["n_examples"] == 3
    details = body["status_details"]
    assert details.startswith("3 invalid line(s)"), details
    assert "line 2: preferred_output must hold exactly one assistant message" in details
    assert "line 4: preferred_output and non_preferred_output are identical" in details
    assert "line 6: line is in chat format, but the file started in preference format" in details


def test_a_preference_file_previews_with_its_bad_lines(api):
    lines = pairs(3)
    lines[2]["input"]["messages"].append({"role": "assistant", "content": "Hmm."})
    uploaded = upload(api, to_jsonl(lines)).json()
    body = preview(api, uploaded["id"], limit=3).json()
    assert body["format"] == "preference" and body["status"] == "error" and body["n_errors"] == 1
    assert json.loads(body["rows"][0]["text"]) == lines[0] and body["rows"][0]["error"] is None
    (bad,) = body["invalid_rows"]
    assert bad["line"] == 3 and bad["error"].startswith("input.messages[2].role must be user")
    assert f"line 3: {bad['error']}" in uploaded["status_details"]
