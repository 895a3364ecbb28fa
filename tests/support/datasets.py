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
