"""The real SmolLM2-135M-Instruct: README examples run verbatim, and QLoRA trains and serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from demo.dataset import DATA_DIR
from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.datasets import preference_lines, to_jsonl
from tests.support.services import REPO_ROOT, free_port, make_stack, serving, wait_for_status

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_stack(tmp_path_factory, postgres_url, redis_url, tiny_model_dir, smollm2_dir):
    tmp = tmp_path_factory.mktemp("real")
    port = free_port()
    stack = make_stack(tmp, postgres_url, redis_url, tiny_model_dir, PATCHBAY_INFERENCE_URL=f"http://127.0.0.1:{port}")
    stack.cli("models", "add", "smollm2-135m-instruct", str(smollm2_dir))
    stack.key = stack.cli("team", "create", "acme", "--admin").splitlines()[-1]  # as `make run`'s key is
    stack.cli("team", "create", "default")  # the team `make run` creates, which the README's admin example names
    with serving(stack, port):
        yield stack


def readme_examples() -> dict[str, list[str]]:
    """The README's example blocks, each as a list of shell commands (continuations joined)."""
    text = (REPO_ROOT / "README.md").read_text()
    blocks = {}
    for name, body in re.findall(r"<!-- readme-example: (\w+) -->\n```bash\n(.*?)```", text, re.S):
        commands, current = [], ""
        for line in body.splitlines():
            current = f"{current}\n{line}" if current else line
            if not line.endswith("\\") and current.count("'") % 2 == 0:  # bash joins the rest itself
                commands.append(current)
                current = ""
        blocks[name] = commands
    return blocks


def run_example(command: str, env: dict[str, str], cwd: Path) -> str:
    """Run one README command as written, but with curl failing on HTTP errors."""
    checked = command.replace("curl -sS", "curl --fail-with-body -sS", 1)
    done = subprocess.run(["bash", "-c", checked], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_every_readme_curl_example_works(real_stack, smollm2_dir, tmp_path):
    shutil.copy(DATA_DIR / "train.jsonl", tmp_path / "train.jsonl")
    adapter = save_peft_lora(smollm2_dir, tmp_path / "adapter", r=8, targets=("q_proj", "v_proj"))
    (tmp_path / "my-peft-adapter.tar.gz").write_bytes(tar_gz(adapter))
    env = {**os.environ, "PB": real_stack.base_url, "KEY": real_stack.key}
    blocks = readme_examples()
    (tmp_path / "pairs.jsonl").write_bytes(to_jsonl(preference_lines(16)))
    assert set(blocks) == {"files", "jobs", "dpo", "adapters", "health", "admin"}
    ran = 0
    for name in ("health", "files", "jobs", "adapters", "dpo", "admin"):
        if name == "jobs":  # the files block ended by deleting its upload
            env["FILE_ID"] = json.loads(run_example(blocks["files"][0], env, tmp_path))["id"]
        for index, command in enumerate(blocks[name]):
            output = run_example(command, env, tmp_path)
            ran += 1
            if index == 0 and name in ("files", "jobs"):  # each block opens by creating what it uses
                env["FILE_ID" if name == "files" else "JOB_ID"] = json.loads(output)["id"]
            if name == "dpo" and index < 2:  # its upload, then its job
                env["FILE_ID" if index == 0 else "JOB_ID"] = json.loads(output)["id"]
            if "stream=true" in command:
                assert output.rstrip().endswith("data: [DONE]")
            if "/chat/completions" in command:
                assert json.loads(output)["choices"][0]["message"]["content"]
    assert ran == sum(len(b) for b in blocks.values())
    assert (tmp_path / "support-v1.tar.gz").stat().st_size > 0


def test_qlora_on_real_smollm2_trains_and_serves(real_stack, tmp_path):
    lines = (DATA_DIR / "train.jsonl").read_text().splitlines()[:24]
    (tmp_path / "small.jsonl").write_text("\n".join(lines) + "\n")
    with real_stack.client() as client, open(tmp_path / "small.jsonl", "rb") as fh:
        file_id = client.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": fh}).json()["id"]
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "smollm2-135m-instruct", "training_file": file_id, "suffix": "real",
            "hyperparameters": {"batch_size": 4}, "peft": {"max_steps": 3, "learning_rate": 1e-3}}).json()
        done = wait_for_status(client, job["id"], ("succeeded", "failed", "cancelled"), timeout=600,
                               stack=real_stack)
        assert done["status"] == "succeeded", done
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
        report = next(e["data"] for e in events if e["data"].get("decoder_linears"))
        assert report["linear4bit"] == report["decoder_linears"] == 30 * 7 and report["all_nested"]
        reply = client.post("/v1/chat/completions", json={
            "model": done["fine_tuned_model"], "messages": [{"role": "user", "content": "What is 2 plus 2?"}],
            "max_tokens": 16, "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"].strip()
        assert reply.json()["model"] == done["fine_tuned_model"]
