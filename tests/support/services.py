"""Real Postgres, Redis and Patchbay processes for integration tests.

Set PATCHBAY_REQUIRE_SERVICES=1 (as .ci/run does) to fail rather than skip when
Postgres or Redis is unreachable.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

POSTGRES_ADMIN_URL = os.environ.get("PATCHBAY_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PATCHBAY_TEST_REDIS", "redis://127.0.0.1:6379")
REPO_ROOT = Path(__file__).resolve().parents[2]

# Short leases and fast loops, so crash and lost-message recovery happen within seconds.
FAST_LOOPS = {
    "PATCHBAY_LEASE_SECONDS": "4",
    "PATCHBAY_HEARTBEAT_SECONDS": "0.5",
    "PATCHBAY_REDISPATCH_AFTER_SECONDS": "6",
    "PATCHBAY_RECONCILE_INTERVAL_SECONDS": "1",
    "PATCHBAY_DISPATCH_INTERVAL_SECONDS": "0.2",
}


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {exc}"
    if os.environ.get("PATCHBAY_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new, empty Postgres database, dropped afterwards."""
    import sqlalchemy as sa

    name = f"patchbay_test_{secrets.token_hex(4)}"
    try:
        admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        _unavailable("Postgres", exc)
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh Postgres database for one test module, dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture
def fresh_postgres_url() -> Iterator[str]:
    """A fresh Postgres database for one test, dropped afterwards."""
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis database number of its own, flushed before and after."""
    import redis

    db = 1 + secrets.randbelow(14)
    url = f"{REDIS_URL}/{db}"
    try:
        client = redis.Redis.from_url(url)
        client.flushdb()
    except Exception as exc:
        _unavailable("Redis", exc)
    yield url
    client.flushdb()


@dataclass
class PatchbayStack:
    """Patchbay's API and workers as real processes over one set of stores."""

    env: dict[str, str]
    data_dir: Path
    port: int = field(default_factory=free_port)
    processes: list[subprocess.Popen] = field(default_factory=list)
    key: str = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        """Run a `patchbay` command to completion and return its stdout."""
        done = subprocess.run([sys.executable, "-m", "patchbay_cli", *args], env=self.env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def _spawn(self, *args: str, log_name: str, **extra_env: str) -> subprocess.Popen:
        log = open(self.data_dir / f"{log_name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "patchbay_cli", *args], env={**self.env, **extra_env},
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def _start_server(self, role: str, port: int, timeout: float, **extra_env: str) -> subprocess.Popen:
        """Start a `patchbay` server role and wait until its /healthz answers."""
        proc = self._spawn(role, "--port", str(port), log_name=f"{role}-{port}", **extra_env)
        self.wait_until_answers(proc, port, "/healthz", timeout)
        return proc

    def wait_until_answers(self, proc: subprocess.Popen, port: int, path: str, timeout: float = 180) -> None:
        """Wait until the process's server answers 200 at `path` (its log in the failure if it exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert proc.poll() is None, "\n".join(p.read_text() for p in self.data_dir.glob(f"*-{port}.log"))
            try:
                if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the server on port {port} did not answer {path} within {timeout} s")

    def start_api(self) -> subprocess.Popen:
        """Start `patchbay api` and wait for /healthz."""
        return self._start_server("api", self.port, 60)

    def start_inference(self, port: int, base_model: str | None = None, **extra_env: str) -> subprocess.Popen:
        """Start `patchbay inference` of `base_model` (default: PATCHBAY_INFERENCE_BASE_MODEL, else the
        settings' default) and wait until its base model is loaded (/readyz)."""
        proc = self.spawn_inference(port, base_model, **extra_env)
        self.wait_until_answers(proc, port, "/readyz")
        return proc

    def spawn_inference(self, port: int, base_model: str | None = None, **extra_env: str) -> subprocess.Popen:
        """Start `patchbay inference` without waiting: it answers at once, and its base model loads meanwhile."""
        base_model = base_model or extra_env.get("PATCHBAY_INFERENCE_BASE_MODEL") or self.env.get(
            "PATCHBAY_INFERENCE_BASE_MODEL")
        args = ("--base-model", base_model) if base_model else ()
        return self._spawn("inference", "--port", str(port), *args, log_name=f"inference-{port}", **extra_env)

    def start_worker(self) -> subprocess.Popen:
        """Start `patchbay worker` (it needs no wait: jobs queue until it is ready)."""
        return self._spawn("worker", log_name="worker")

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal a process and all its children (its own process group)."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process this stack started."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(proc)

    def logs(self) -> str:
        """Every process log, for failure messages."""
        return "\n".join(f"== {p.name}\n{p.read_text()[-6000:]}" for p in self.data_dir.glob("*.log"))

    def client(self, key: str | None = None) -> httpx.Client:
        """An HTTP client with a team's key."""
        return httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {key or self.key}"},
                            timeout=60)


def make_stack(tmp_path: Path, database_url: str, broker_url: str, model_dir: Path, **extra_env: str) -> PatchbayStack:
    """A migrated stack with one team and the tiny model registered as `tiny-llama`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    env.update(FAST_LOOPS)
    env.update(
        PATCHBAY_DATA_DIR=str(tmp_path / "data"),
        PATCHBAY_DATABASE_URL=database_url,
        PATCHBAY_BROKER_URL=broker_url,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    data_dir = tmp_path / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = PatchbayStack(env=env, data_dir=data_dir)
    stack.cli("migrate")
    stack.key = stack.cli("team", "create", "acme").splitlines()[-1]
    stack.cli("models", "add", "tiny-llama", str(model_dir))
    return stack


@contextmanager
def serving(stack: PatchbayStack, inference_port: int) -> Iterator[PatchbayStack]:
    """The stack with its API, a worker and an inference replica on `inference_port` running; stopped after."""
    try:
        stack.start_api()
        stack.start_worker()
        stack.start_inference(inference_port)
        yield stack
    finally:
        stack.stop()


def wait_for_status(client: httpx.Client, job_id: str, statuses: tuple[str, ...], timeout: float = 240,
                    stack: PatchbayStack | None = None) -> dict:
    """Poll a job until its status is one of `statuses`."""
    deadline = time.monotonic() + timeout
    job = {}
    while time.monotonic() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job stayed {job.get('status')!r}: {job}\n{stack.logs() if stack else ''}")


def all_events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every event of a job, oldest first."""
    events, after = [], None
    while True:
        params = {"limit": 100, **({"after": after} if after else {})}
        page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params=params).json()
        events.extend(page["data"])
        if not page["has_more"]:
            return list(reversed(events))
        after = page["data"][-1]["id"]


def embedded_urls(tmp_path: Path) -> tuple[str, str]:
    """The database and broker URLs `patchbay serve` uses by default (SQLite both), under `tmp_path`."""
    data = tmp_path / "data"
    data.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{data / 'patchbay.sqlite'}", f"sqla+sqlite:///{data / 'broker.sqlite'}"


@dataclass
class LatencyProbe:
    """Polls a URL in a background thread and keeps the slowest answer (or failure) it saw."""

    url: str
    interval: float = 0.1
    worst: float = 0.0
    failures: list[str] = field(default_factory=list)
    samples: int = 0

    def __post_init__(self) -> None:
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    status = client.get(self.url).status_code
                    if status != 200:
                        self.failures.append(f"status {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.worst = max(self.worst, time.monotonic() - started)
                self.samples += 1
                self._stop.wait(self.interval)

    def __enter__(self) -> "LatencyProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)
