"""vLLM's OpenAI server as a child process: its command line, its start, its health, its stop.

It listens on a free port of 127.0.0.1 only (the replica in front of it is what the fleet reaches), in a
process group of its own so that stopping it reaches its engine and workers too. It dies with us: a
short launcher asks the kernel for SIGTERM when its parent goes (PR_SET_PDEATHSIG, kept across exec),
then replaces itself with the server. The launcher is started from the event loop's thread, which
lives as long as the replica (the signal follows the thread that started the child).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from core.settings import Settings

log = logging.getLogger("patchbay.vllm")
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
MAX_NUM_SEQS = 128
"""Sequences vLLM schedules at once (its own CPU default), unless PATCHBAY_VLLM_EXTRA_ARGS says otherwise."""
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for --max-lora-rank."""
STOP_SECONDS = 20.0
LOG_TAIL_LINES = 60

# argv: [launcher, parent pid, server args...]. PR_SET_PDEATHSIG is 1.
LAUNCHER = """\
import ctypes, os, signal, sys
parent = int(sys.argv[1])
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)
except (OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit(0)
os.execv(sys.executable, [sys.executable, "-m", "%s", *sys.argv[2:]])
""" % SERVER_MODULE


class VllmStartError(RuntimeError):
    """vLLM's server exited or never became healthy; the message ends with its last output."""


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lora_rank_limit(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that admits adapters of `rank`."""
    return next((allowed for allowed in LORA_RANKS if allowed >= rank), LORA_RANKS[-1])


def server_arguments(settings: Settings, model_dir: Path, served_name: str, port: int, device: str) -> list[str]:
    """vLLM's server options: our base under its id, runtime LoRA slots, then PATCHBAY_VLLM_EXTRA_ARGS (last wins)."""
    loras = str(max(1, settings.vllm_max_loras))
    return [
        "--model", str(model_dir), "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-loras", loras, "--max-cpu-loras", loras,
        "--max-lora-rank", str(lora_rank_limit(settings.max_lora_rank)),
        "--dtype", "bfloat16" if device == "cuda" else "float32", "--max-num-seqs", str(MAX_NUM_SEQS),
        *shlex.split(settings.vllm_extra_args),
    ]


def option_value(arguments: list[str], option: str) -> str | None:
    """The last value given to `option` (`--opt V` or `--opt=V`), as argparse reads it."""
    value = None
    for index, word in enumerate(arguments):
        if word == option and index + 1 < len(arguments):
            value = arguments[index + 1]
        elif word.startswith(option + "="):
            value = word.split("=", 1)[1]
    return value


class VllmProcess:
    """One vLLM server; its output goes to our stderr, and its last lines are kept for error messages."""

    def __init__(self, python: Path, arguments: list[str], env: dict[str, str]) -> None:
        self.python, self.arguments, self.env = python, arguments, env
        port = option_value(arguments, "--port")
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)

    def start(self) -> None:
        """Launch the server (returns at once); call it from a thread that outlives the server."""
        command = [str(self.python), "-c", LAUNCHER, str(os.getpid()), *self.arguments]
        log.info("starting vLLM: %s -m %s %s", self.python, SERVER_MODULE, shlex.join(self.arguments))
        self.proc = subprocess.Popen(command, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        threading.Thread(target=self._pump, args=(self.proc.stdout,), name="vllm-output", daemon=True).start()

    def _pump(self, stream) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            self._tail.append(line.rstrip("\n"))
            try:
                sys.stderr.write(line)
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        stream.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        """Whether the server process is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def tail(self) -> str:
        """Its last lines of output."""
        return "\n".join(self._tail)

    async def wait_healthy(self, timeout: float) -> None:
        """Return once GET /health answers 200; VllmStartError when it exits or `timeout` passes first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as client:
            while loop.time() < deadline:
                if not self.running():
                    code = self.proc.returncode if self.proc is not None else None
                    raise VllmStartError(f"vLLM's server exited with status {code} while starting:\n{self.tail()}")
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        raise VllmStartError(f"vLLM's server did not become healthy within {timeout:.0f} s:\n{self.tail()}")

    def stop(self, grace: float = STOP_SECONDS) -> None:
        """SIGTERM to its process group, SIGKILL to what is left after `grace` seconds (idempotent)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("vLLM did not stop within %.0f s; killing it", grace)
        _signal_group(proc.pid, signal.SIGKILL)  # its engine and workers, if any lingered
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
