"""Log-probabilities of preference answers, measured with plain transformers + peft (not our recipe).

Run in a fresh process: `python -m tests.support.preference_logps BASE_DIR DATA.jsonl [ADAPTER_DIR]`
prints JSON `{"base": [[chosen, rejected], ...], "adapter": [...], "tokens": [[chosen, rejected], ...]}`:
each answer's summed log-probability given its prompt (the chat template's rendering of the answer
through its end-of-turn token), with the adapter off and on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def answer_logps(model, tokenizer, messages: list[dict], answer: str) -> tuple[float, int]:
    """(summed log-probability, tokens) of `answer` as the assistant's reply to `messages`."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}],
                                         tokenize=False).rstrip()
    assert full.startswith(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1)
    targets = torch.tensor(ids[1:])
    start = len(prompt_ids) - 1
    picked = logps[start:].gather(1, targets[start:, None])
    return picked.sum().item(), len(ids) - len(prompt_ids)


def measure(base_dir: Path, data: Path, adapter_dir: Path | None) -> dict:
    """The answers' log-probabilities with the base alone and with the adapter (when given)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    pairs = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]

    def run() -> tuple[list[list[float]], list[list[int]]]:
        logps, tokens = [], []
        for pair in pairs:
            measured = [answer_logps(model, tokenizer, pair["input"]["messages"], pair[key][0]["content"])
                        for key in ("preferred_output", "non_preferred_output")]
            logps.append([m[0] for m in measured])
            tokens.append([m[1] for m in measured])
        return logps, tokens

    base, tokens = run()
    result = {"base": base, "tokens": tokens}
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
        result["adapter"] = run()[0]
    return result


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)))
