"""`patchbay serve` as a user runs it, on a fresh data dir and one base model, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.services import REPO_ROOT, free_port

READY_SECONDS = 240


@dataclass
class LiveServe:
    """A running `patchbay serve`: its URL, the default team's admin key and its data dir."""

    url: str
    key: str
    data_dir: Path
    log_path: Path

    def cli(self, *args: str) -> str:
        """Run a `patchbay` command against this data dir; its stdout."""
        return run_cli(self.data_dir, *args)


def serve_env(data_dir: Path, bases: str) -> dict[str, str]:
    """The environment of a local `patchbay serve`: no PATCHBAY_* of the caller's, embedded stores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    env.update(PATCHBAY_DATA_DIR=str(data_dir), PATCHBAY_SERVE_BASE_MODELS=bases, HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def run_cli(data_dir: Path, *args: str, bases: str = "") -> str:
    """`python -m patchbay_cli ARGS` on `data_dir`; raises on failure."""
    done = subprocess.run([sys.executable, "-m", "patchbay_cli", *args], env=serve_env(data_dir, bases),
                          cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


@contextmanager
def live_serve(work_dir: Path, base_id: str, base_dir: Path) -> Iterator[LiveServe]:
    """Register `base_dir` as `base_id`, start `patchbay serve` with it alone, and yield once it is ready."""
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True)
    run_cli(data_dir, "migrate")
    run_cli(data_dir, "models", "add", base_id, str(base_dir))
    port, inference_port = free_port(), free_port()
    log_path = work_dir / "serve.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "patchbay_cli", "serve", "--port", str(port), "--inference-port",
             str(inference_port)], env=serve_env(data_dir, base_id), cwd=REPO_ROOT, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ready = f"Patchbay is ready at http://127.0.0.1:{port}/v1".encode()
            deadline = time.monotonic() + READY_SECONDS
            while ready not in log_path.read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            key = (data_dir / "default_api_key").read_text().strip()
            yield LiveServe(url=f"http://127.0.0.1:{port}", key=key, data_dir=data_dir, log_path=log_path)
        finally:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
