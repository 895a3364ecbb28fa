"""`patchbay serve`, the README's run command: embedded stores, the default model, clean Ctrl-C, data kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.datasets import chat_lines, to_jsonl
from tests.support.services import REPO_ROOT, free_port

pytestmark = pytest.mark.slow


def _serve(data_dir, port: int, inference_port: int, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    env.update(PATCHBAY_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "patchbay_cli", "serve", "--port", str(port),
                             "--inference-port", str(inference_port)], env=env, cwd=REPO_ROOT, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_ready(port: int, inference_port: int, proc: subprocess.Popen, log_path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if all(httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=2).status_code == 200
                   for p in (port, inference_port)):
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError(log_path.read_text())


def _ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"child processes still running: {leftover}"


def test_serve_runs_embedded_stops_cleanly_and_keeps_data(tmp_path, smollm2_dir):
    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    # The first start converts the bundled GGUF here; reuse this machine's conversion to save a minute.
    (data_dir / "models" / "smollm2-135m-instruct").symlink_to(smollm2_dir, target_is_directory=True)
    port, inference_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "ab") as log:
        proc = _serve(data_dir, port, inference_port, log)
        try:
            _wait_ready(port, inference_port, proc, log_path)
            key = (data_dir / "default_api_key").read_text().strip()
            assert key in log_path.read_text() and f"http://127.0.0.1:{port}/v1" in log_path.read_text()
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
            assert "smollm2-135m-instruct" in [m["id"] for m in client.get("/v1/models").json()["data"]]
            file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                                  files={"file": ("d.jsonl", to_jsonl(chat_lines(3)))}).json()["id"]
            reply = client.post("/v1/chat/completions", json={
                "model": "smollm2-135m-instruct", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "What is the capital of France?"}]})
            assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["message"]["content"]
        finally:
            _ctrl_c(proc)

        proc = _serve(data_dir, port, inference_port, log)
        try:
            _wait_ready(port, inference_port, proc, log_path)
            assert (data_dir / "default_api_key").read_text().strip() == key
            files = client.get("/v1/files").json()["data"]
            assert [f["id"] for f in files] == [file_id]
        finally:
            _ctrl_c(proc)
