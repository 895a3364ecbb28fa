"""DPO through the API and the queue: OpenAI's own call, the log-probabilities, continuing from SFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.support.datasets import chat_lines, preference_lines, to_jsonl
from tests.support.flows import published_adapter_dir, upload_with_curl
from tests.support.reference import peft_greedy_chat
from tests.support.services import all_events, free_port, make_stack, serving, wait_for_status
from worker.training.data import step_batches

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, postgres_url, redis_url, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    port = free_port()
    stack = make_stack(tmp, postgres_url, redis_url, tiny_model_dir, PATCHBAY_INFERENCE_BASE_MODEL="tiny-llama",
                       PATCHBAY_INFERENCE_URL=f"http://127.0.0.1:{port}")
    stack.model_dir, stack.tmp = tiny_model_dir, tmp
    with serving(stack, port):
        yield stack


def _write(stack, name: str, lines: list[dict]) -> Path:
    path = stack.tmp / name
    path.write_bytes(to_jsonl(lines))
    return path


def _measure(stack, data: Path, adapter_dir: Path | None) -> dict:
    """Log-probabilities from a fresh process with plain transformers + peft."""
    args = [sys.executable, "-m", "tests.support.preference_logps", str(stack.model_dir), str(data)]
    done = subprocess.run(args + ([str(adapter_dir)] if adapter_dir else []), cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _mean_margin(pairs: list[list[float]]) -> float:
    return sum(chosen - rejected for chosen, rejected in pairs) / len(pairs)


def test_openai_dpo_call_trains_serves_and_moves_the_log_probabilities(stack):
    client = openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=stack.key, max_retries=0)
    data = _write(stack, "pairs.jsonl", preference_lines(16, seed=1))
    with open(data, "rb") as fh:
        uploaded = client.files.create(file=fh, purpose="fine-tune")
    assert uploaded.status == "processed"
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=uploaded.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "learning_rate_multiplier": 40}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    with stack.client() as http:
        done = wait_for_status(http, job.id, ("succeeded", "failed"), timeout=600, stack=stack)
        assert done["status"] == "succeeded", done
        events = all_events(http, job.id)

    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    assert len(metrics) >= 4
    third = max(1, len(metrics) // 3)
    early, late = metrics[:third], metrics[-third:]
    assert metrics[0]["reward_margin"] == 0 and metrics[0]["reward_accuracy"] == 0
    assert sum(m["reward_accuracy"] for m in late) / third > sum(m["reward_accuracy"] for m in early) / third
    assert sum(m["reward_margin"] for m in late) / third > sum(m["reward_margin"] for m in early) / third
    assert all({"dpo_loss", "rewards_chosen", "rewards_rejected", "reward_margin"} <= set(m) for m in metrics)

    finished = client.fine_tuning.jobs.retrieve(job.id)
    adapter_dir = published_adapter_dir(stack, events)
    with stack.client() as http:
        served = http.post("/v1/chat/completions", json={
            "model": finished.fine_tuned_model, "max_tokens": 12, "temperature": 0,
            "messages": [{"role": "user", "content": "What colour is item 3?"}]})
    assert served.status_code == 200, served.text
    expected = peft_greedy_chat(stack.model_dir, adapter_dir, "What colour is item 3?", 12)
    assert served.json()["choices"][0]["message"]["content"] == expected

    measured = _measure(stack, data, adapter_dir)
    assert _mean_margin(measured["adapter"]) > _mean_margin(measured["base"]) + 0.5, measured


def test_dpo_continues_from_a_supervised_adapter_and_records_its_parent(stack):
    lora = {"method": "lora", "r": 8, "learning_rate": 5e-2, "max_seq_length": 128, "checkpoint_every_steps": 50}
    chat_file = upload_with_curl(stack, _write(stack, "chat.jsonl", chat_lines(16, seed=4)))["id"]
    with stack.client() as http:
        sft = http.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": chat_file, "seed": 4,
            "hyperparameters": {"n_epochs": 2, "batch_size": 4}, "peft": lora}).json()
        sft = wait_for_status(http, sft["id"], ("succeeded", "failed"), stack=stack)
        assert sft["status"] == "succeeded", sft
        sft_events = all_events(http, sft["id"])

    pairs = preference_lines(8, seed=6)
    data = _write(stack, "continue.jsonl", pairs)
    pair_file = upload_with_curl(stack, data)["id"]
    with stack.client() as http:
        dpo = http.post("/v1/fine_tuning/jobs", json={
            "model": sft["fine_tuned_model"], "training_file": pair_file, "seed": 11,
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}},
            "peft": {"dropout": 0.0, "learning_rate": 1e-2}})
        assert dpo.status_code == 200, dpo.text
        dpo = wait_for_status(http, dpo.json()["id"], ("succeeded", "failed"), stack=stack)
        assert dpo["status"] == "succeeded", dpo
        events = all_events(http, dpo["id"])
        sft_adapter = http.get(f"/v1/adapters/{sft['fine_tuned_model']}").json()
        child = http.get(f"/v1/adapters/{dpo['fine_tuned_model']}").json()
    assert dpo["fine_tuned_model"].startswith("ft:tiny-llama:")
    assert child["parent"]["id"] == sft_adapter["id"] and child["lineage"][0] == sft_adapter["id"]
    assert any((e.get("data") or {}).get("reference") == "start_adapter" for e in events)

    # The first step runs on the SFT adapter's weights: its loss on the chosen answers is the SFT adapter's.
    first = next(e["data"] for e in events if e["type"] == "metrics")
    batch = step_batches(len(pairs), 4, 11, 0)[0]
    measured = _measure(stack, data, published_adapter_dir(stack, sft_events))

    def chosen_loss(logps):
        return -sum(logps[i][0] for i in batch) / sum(measured["tokens"][i][0] for i in batch)

    assert first["chosen_loss"] == pytest.approx(chosen_loss(measured["adapter"]), abs=2e-3)
    assert abs(chosen_loss(measured["base"]) - chosen_loss(measured["adapter"])) > 0.05
