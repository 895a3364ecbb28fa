"""`patchbay serve`, the README's run command: embedded stores, the default model, `ready` only once a chat
would succeed, clean Ctrl-C, data kept."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.datasets import chat_lines, to_jsonl
from tests.support.live_serve import run_cli, serve_env
from tests.support.services import REPO_ROOT, free_port

pytestmark = pytest.mark.slow


BASES = "smollm2-135m-instruct,tiny-llama"


def _cli(data_dir, *args: str) -> None:
    run_cli(data_dir, *args, bases=BASES)


def _serve(data_dir, port: int, inference_port: int, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "patchbay_cli", "serve", "--port", str(port),
                             "--inference-port", str(inference_port)], env=serve_env(data_dir, BASES), cwd=REPO_ROOT,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _replica_ports(log_path) -> dict[str, int]:
    """The port of each base's replica, as `patchbay serve` announced them."""
    return {base: int(port) for base, port in re.findall(r"inference replica of (\S+) on port (\d+)",
                                                          log_path.read_text())}


def _wait_ready(port: int, proc: subprocess.Popen, log_path, since: int = 0) -> None:
    """Until `patchbay serve` prints that it is ready (in the log after byte `since`); not a moment longer."""
    ready_line = f"Patchbay is ready at http://127.0.0.1:{port}/v1".encode()
    deadline = time.monotonic() + 240
    while ready_line not in log_path.read_bytes()[since:]:
        assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def _chat(port: int, key: str, model: str = "smollm2-135m-instruct") -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "max_tokens": 8, "temperature": 0,
                            "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                      timeout=60)


def _ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground process group."""
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"child processes still running: {leftover}"


def test_serve_runs_embedded_stops_cleanly_and_keeps_data(tmp_path, smollm2_dir, tiny_model_dir):
    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    # The first start converts the bundled GGUF here; reuse this machine's conversion to save a minute.
    (data_dir / "models" / "smollm2-135m-instruct").symlink_to(smollm2_dir, target_is_directory=True)
    _cli(data_dir, "migrate")
    _cli(data_dir, "models", "add", "tiny-llama", str(tiny_model_dir))  # a second base: a replica of its own
    port, inference_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "ab") as log:
        proc = _serve(data_dir, port, inference_port, log)
        try:
            _wait_ready(port, proc, log_path)
            key = (data_dir / "default_api_key").read_text().strip()
            reply = _chat(port, key)  # right when `ready` appears
            assert reply.status_code == 200, reply.text
            assert "Paris" in reply.json()["choices"][0]["message"]["content"]
            assert _chat(port, key, "tiny-llama").status_code == 200
            assert key in log_path.read_text() and f"http://127.0.0.1:{port}/v1" in log_path.read_text()
            assert f"Console: http://127.0.0.1:{port}/" in log_path.read_text()
            assert httpx.get(f"http://127.0.0.1:{port}/").headers["content-type"].startswith("text/html")
            replica_ports = _replica_ports(log_path)
            assert replica_ports["smollm2-135m-instruct"] == inference_port
            assert replica_ports["tiny-llama"] > inference_port
            for replica_port in replica_ports.values():
                assert httpx.get(f"http://127.0.0.1:{replica_port}/readyz").status_code == 200
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"})
            assert "smollm2-135m-instruct" in [m["id"] for m in client.get("/v1/models").json()["data"]]
            file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                                  files={"file": ("d.jsonl", to_jsonl(chat_lines(3)))}).json()["id"]
        finally:
            _ctrl_c(proc)

        since = log_path.stat().st_size  # the second start's `ready` line, not the first's
        proc = _serve(data_dir, port, inference_port, log)
        try:
            _wait_ready(port, proc, log_path, since)
            assert _chat(port, key).status_code == 200
            assert (data_dir / "default_api_key").read_text().strip() == key
            files = client.get("/v1/files").json()["data"]
            assert [f["id"] for f in files] == [file_id]
        finally:
            _ctrl_c(proc)
