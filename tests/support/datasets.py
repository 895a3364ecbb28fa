"""Small deterministic datasets in every supported format."""

from __future__ import annotations

import json
import random

COLORS = ["red", "green", "blue", "amber", "violet", "teal", "olive", "coral"]


def chat_lines(n: int = 24, seed: int = 0) -> list[dict]:
    """Chat examples with a fixed, learnable answer pattern."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        color = rng.choice(COLORS)
        lines.append({"messages": [
            {"role": "system", "content": "You answer in one short sentence."},
            {"role": "user", "content": f"What colour is item {i}?"},
            {"role": "assistant", "content": f"Item {i} is {color}, captain."},
        ]})
    return lines


def to_jsonl(lines: list[dict]) -> bytes:
    """Encode examples as JSONL bytes."""
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def preference_lines(n: int = 24, seed: int = 0) -> list[dict]:
    """OpenAI preference pairs: the sentence pattern of `chat_lines` is preferred to a terse answer."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        color, other = rng.sample(COLORS, 2)
        lines.append({
            "input": {"messages": [{"role": "system", "content": "You answer in one short sentence."},
                                   {"role": "user", "content": f"What colour is item {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"Item {i} is {color}, captain."}],
            "non_preferred_output": [{"role": "assistant", "content": f"{other}."}],
        })
    return lines
