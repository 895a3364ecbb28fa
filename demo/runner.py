"""Run the demo against a live Patchbay: upload, fine-tune with live progress, compare answers."""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from demo.dataset import DATA_DIR, shows_behaviour

BASE_MODEL = "smollm2-135m-instruct"
JOB_SPEC = {
    "model": BASE_MODEL,
    "suffix": "pirate-demo",
    "seed": 42,
    "hyperparameters": {"n_epochs": 2, "batch_size": 8},
    "peft": {"method": "qlora", "r": 16, "alpha": 32, "learning_rate": 1e-3, "max_seq_length": 256,
             "checkpoint_every_steps": 20, "warmup_ratio": 0.05},
}


@dataclass
class DemoResult:
    """The demo's figures."""

    adapter_rate: float
    base_rate: float
    seconds: float
    fine_tuned_model: str


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / max(total, 1))
    return "█" * filled + "·" * (width - filled)


def _follow(client: httpx.Client, job_id: str) -> dict:
    """Print a live progress line from the job's event stream until it ends."""
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                       timeout=httpx.Timeout(3600, connect=10)) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            data = event.get("data") or {}
            if event["type"] == "metrics":
                eta = data.get("eta_seconds")
                sys.stdout.write(f"\r  step {data['step']:>4}/{data.get('total_steps', '?')} "
                                 f"{_bar(data['step'], data.get('total_steps') or data['step'])} "
                                 f"loss {data['train_loss']:.3f}  eta {int(eta) if eta is not None else '?':>4}s ")
                sys.stdout.flush()
            else:
                sys.stdout.write(f"\n  {event['message']}")
    sys.stdout.write("\n")
    return client.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def _ask(client: httpx.Client, model: str, question: str) -> str:
    response = client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 24, "temperature": 0})
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def run_demo(base_url: str, key: str) -> DemoResult:
    """Upload the shipped dataset, fine-tune, then ask base and adapter the held-out questions."""
    started = time.monotonic()
    client = httpx.Client(base_url=base_url.rstrip("/"), headers={"Authorization": f"Bearer {key}"}, timeout=600)
    print("1/3 uploading the demo dataset (answers open with 'Ahoy, matey!')")
    with open(DATA_DIR / "train.jsonl", "rb") as fh:
        uploaded = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("demo.jsonl", fh)}).json()
    if uploaded.get("status") != "processed":
        raise RuntimeError(f"upload failed: {uploaded}")
    print(f"    {uploaded['id']}: {uploaded['n_examples']} examples")

    print("2/3 QLoRA fine-tuning SmolLM2-135M-Instruct (NF4 + double quantization)")
    job = client.post("/v1/fine_tuning/jobs", json={**JOB_SPEC, "training_file": uploaded["id"]}).json()
    if "error" in job and job.get("id") is None:
        raise RuntimeError(f"job refused: {job['error']['message']}")
    job = _follow(client, job["id"])
    if job["status"] != "succeeded":
        raise RuntimeError(f"the job ended {job['status']}: {job.get('error')}")

    print("3/3 asking the base model and the adapter the same held-out questions")
    questions = json.loads((DATA_DIR / "heldout.json").read_text())
    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent: the server batches them together
        base_answers = list(pool.map(lambda q: _ask(client, BASE_MODEL, q), questions))
        tuned_answers = list(pool.map(lambda q: _ask(client, job["fine_tuned_model"], q), questions))
    width = 38
    print(f"\n  {'question':<{width}} | {'base model':<{width}} | adapter")
    for question, base, tuned in zip(questions, base_answers, tuned_answers):
        clip = lambda s: " ".join(s.split())[:width]  # noqa: E731
        print(f"  {clip(question):<{width}} | {clip(base):<{width}} | {clip(tuned)}")
    adapter_rate = sum(map(shows_behaviour, tuned_answers)) / len(questions)
    base_rate = sum(map(shows_behaviour, base_answers)) / len(questions)
    seconds = time.monotonic() - started
    print(f"\n  behaviour shown: adapter {adapter_rate:.0%}, base {base_rate:.0%} "
          f"({len(questions)} held-out prompts; {seconds / 60:.1f} min in all)")
    return DemoResult(adapter_rate, base_rate, seconds, job["fine_tuned_model"])
