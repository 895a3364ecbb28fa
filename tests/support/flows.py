"""Steps a user takes against a running stack: upload, train, follow, inspect the adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx

from tests.support.datasets import chat_lines, to_jsonl
from tests.support.services import PatchbayStack

FAST_QLORA = {"method": "qlora", "r": 8, "learning_rate": 2e-3, "checkpoint_every_steps": 4, "max_seq_length": 128}


def upload_with_curl(stack: PatchbayStack, path: Path) -> dict:
    """Upload a dataset exactly as the README's curl example does."""
    if shutil.which("curl") is None:  # a machine without curl: the same multipart request from httpx
        with stack.client() as client, open(path, "rb") as fh:
            return client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (path.name, fh)}).json()
    done = subprocess.run(
        ["curl", "-sS", f"{stack.base_url}/v1/files", "-H", f"Authorization: Bearer {stack.key}",
         "-F", "purpose=fine-tune", "-F", f"file=@{path}"],
        capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def write_dataset(tmp_dir: Path, n: int = 24, seed: int = 0) -> Path:
    """A chat JSONL file on disk."""
    path = tmp_dir / f"chat-{seed}.jsonl"
    path.write_bytes(to_jsonl(chat_lines(n, seed)))
    return path


def follow_events(stack: PatchbayStack, job_id: str, timeout: float = 300) -> list[dict]:
    """Read the job's SSE stream from the start until it ends."""
    events = []
    with stack.client() as client, client.stream(
            "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
            timeout=httpx.Timeout(timeout, connect=10)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line == "data: [DONE]":
                break
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def metrics_of(events: list[dict]) -> list[dict]:
    """The metrics payloads, in order."""
    return [e["data"] for e in events if e["type"] == "metrics"]


def published_adapter_dir(stack: PatchbayStack, events: list[dict]) -> Path:
    """The stored PEFT folder of the adapter a job published."""
    published = [e for e in events if e["message"].startswith("New fine-tuned model created")]
    assert len(published) == 1, events
    adapter_id = published[0]["data"]["adapter_id"]
    if stack.env.get("PATCHBAY_STORAGE_URL", "").startswith("s3://"):  # fetched from the bucket
        return stack_s3_storage(stack).get_dir(f"adapters/{adapter_id}", stack.data_dir / "fetched" / adapter_id)
    return stack.data_dir / "storage" / "adapters" / adapter_id


def stack_s3_storage(stack: PatchbayStack):
    """The S3 storage a stack runs on (PATCHBAY_STORAGE_URL=s3://...), as the test process reaches it."""
    from core.storage.cache import DownloadCache
    from core.storage.s3 import S3Storage

    bucket, _, prefix = stack.env["PATCHBAY_STORAGE_URL"].removeprefix("s3://").partition("/")
    return S3Storage(bucket, prefix, stack.env.get("PATCHBAY_S3_ENDPOINT_URL"),
                     DownloadCache(stack.data_dir / "test-cache", 2**30))


def assert_adapter_changes_logits(adapter_dir: Path, model_dir: Path) -> None:
    """Plain `PeftModel.from_pretrained` loads the folder, and it changes the base model's output."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert (adapter_dir / "patchbay.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("What colour is item 3?", return_tensors="pt")
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(**inputs).logits
        tuned = PeftModel.from_pretrained(base, adapter_dir)
        tuned_logits = tuned(**inputs).logits
    assert (tuned_logits - base_logits).abs().max().item() > 1e-4
