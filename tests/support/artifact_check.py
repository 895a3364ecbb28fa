"""Rebuild trained artifacts from their files alone, in a fresh interpreter, and report what they compute.

`reload_in_fresh_process` writes a request and runs this module (`python -m tests.support.artifact_check
REQUEST`). For each case {"name", "dir", "quantization", "probe"} (the probe defaults to the one in the
folder's `patchbay.json`, which the worker took from the trained model in memory) it reports:
- `reload_diff`: the largest difference between the rebuilt model's logits and the probe's;
- `adapter_effect`: the largest difference between the plain base's logits and the probe's;
- `argmax`: the rebuilt model's argmax at the probe positions;
- `greedy_ids` (when the request has `prompt_ids`): the greedy continuation on the base quantized as
  `serving_quantization`, i.e. what an inference server holding that base must generate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
END_OF_TURN = "<|im_end|>"


def reload_in_fresh_process(base_dir: Path, cases: list[dict], work: Path, *, prompt_ids: list[int] | None = None,
                            max_new_tokens: int = 0, serving_quantization: str = "none") -> dict[str, dict]:
    """Run every case in one new interpreter; returns the measurements by case name."""
    request = Path(work) / "reload-request.json"
    request.write_text(json.dumps({"base_dir": str(base_dir), "cases": cases, "prompt_ids": prompt_ids,
                                   "max_new_tokens": max_new_tokens, "serving_quantization": serving_quantization}))
    done = subprocess.run([sys.executable, "-m", "tests.support.artifact_check", str(request)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _greedy(model, prompt_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    import torch

    from worker.training.artifacts import probe_logits

    ids, generated = list(prompt_ids), []
    for _ in range(max_new_tokens):
        token = int(probe_logits(model, torch.tensor([ids]))[0, -1].argmax())
        if token in stop_ids:
            break
        generated.append(token)
        ids.append(token)
    return generated


def _measure(request: dict, case: dict, stop_ids: set[int]) -> dict:
    import torch

    from worker.base_loading import load_base_model
    from worker.device import choose_device
    from worker.training.artifacts import load_trained_model, probe_logits

    base_dir, quantization = request["base_dir"], case["quantization"]
    probe = case.get("probe") or json.loads((Path(case["dir"]) / "patchbay.json").read_text())["probe"]
    recorded = torch.tensor(probe["logits"])
    with torch.no_grad():
        model = load_trained_model(base_dir, case["dir"], quantization=quantization, device="cpu")
        logits = probe_logits(model, torch.tensor([probe["input_ids"]]))[0]
        base = load_base_model(base_dir, quantization, choose_device("cpu"), training=True)
        base_logits = probe_logits(base, torch.tensor([probe["input_ids"]]))[0]
        report = {
            "reload_diff": (logits[: len(recorded), probe["vocab_ids"]] - recorded).abs().max().item(),
            "adapter_effect": (base_logits[: len(recorded), probe["vocab_ids"]] - recorded).abs().max().item(),
            "argmax": logits.argmax(-1).tolist(),
        }
        if request.get("prompt_ids"):
            if request["serving_quantization"] != quantization:
                model = load_trained_model(base_dir, case["dir"], quantization=request["serving_quantization"],
                                           device="cpu")
            report["greedy_ids"] = _greedy(model, request["prompt_ids"], request["max_new_tokens"], stop_ids)
    return report


def main() -> None:
    """Entry point of the fresh interpreter."""
    from transformers import AutoTokenizer

    request = json.loads(Path(sys.argv[1]).read_text())
    tokenizer = AutoTokenizer.from_pretrained(request["base_dir"])
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)} - {None}
    print(json.dumps({case["name"]: _measure(request, case, stop_ids) for case in request["cases"]}))


if __name__ == "__main__":
    main()
