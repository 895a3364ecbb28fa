"""Store outages: Postgres or Redis down for 5 s under light load gives 503 with Retry-After, never a 500,
and the API recovers by itself. Each test runs a private Postgres or Redis it may stop (never the shared ones).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.datasets import chat_lines, to_jsonl
from tests.support.services import free_port, make_stack

pytestmark = pytest.mark.slow
PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


class PrivatePostgres:
    """A throwaway Postgres cluster on a free port, run as the `postgres` user."""

    def __init__(self) -> None:
        if PG_BIN is None or shutil.which("runuser") is None:
            pytest.fail("Postgres server binaries (and runuser) are needed for the outage test")
        self.root = Path(tempfile.mkdtemp(prefix="patchbay-pg-"))
        shutil.chown(self.root, "postgres")
        self.port = free_port()
        self._as_postgres(PG_BIN / "initdb", "-D", str(self.root / "data"), "-A", "trust", "-U", "postgres")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, *command) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, command)], check=True, capture_output=True,
                       timeout=60)

    def start(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.root / "data", "-w", "-l", self.root / "log", "-o",
                          f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.root / "data", "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


class PrivateRedis:
    """A throwaway redis-server on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout.strip() \
                != b"PONG":
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(10)


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


class LightLoad:
    """A few clients in a thread, calling a mix of routes, recording each status (and Retry-After on 503s)."""

    def __init__(self, base_url: str, key: str, file_id: str) -> None:
        self.base_url, self.key, self.file_id = base_url, key, file_id
        self.seen: list[tuple[float, str, int, str | None]] = []
        self.recovered_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        calls = [("GET", "/v1/files", None), ("GET", "/v1/fine_tuning/jobs", None),
                 ("POST", "/v1/fine_tuning/jobs", {"model": "tiny-llama", "training_file": self.file_id}),
                 ("GET", "/readyz", None)]
        with httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {self.key}"},
                          timeout=30) as client:
            while not self._stop.is_set():
                for method, path, body in calls:
                    response = client.request(method, path, json=body)
                    self.seen.append((time.monotonic(), path, response.status_code,
                                      response.headers.get("retry-after")))
                self._stop.wait(0.1)

    def __enter__(self) -> "LightLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def statuses(self, since: float = 0.0, path: str | None = None) -> Counter:
        return Counter(s for t, p, s, _ in self.seen if t >= since and (path is None or p == path))


def _run_outage(stack, server) -> LightLoad:
    with stack.client() as client:
        file_id = client.post("/v1/files", data={"purpose": "fine-tune"},
                              files={"file": ("t.jsonl", to_jsonl(chat_lines(4)))}).json()["id"]
    with LightLoad(stack.base_url, stack.key, file_id) as load:
        time.sleep(2)
        server.stop()
        time.sleep(5)
        server.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(load.statuses(time.monotonic() - 2)) != {200}:
            time.sleep(0.5)
        load.recovered_at = time.monotonic()
    bad = [(p, s, r) for _, p, s, r in load.seen if s != 200 and not (s == 503 and r)]
    assert bad == [], bad  # anything but success is a 503 that says when to retry
    assert set(load.statuses(load.recovered_at - 2)) == {200}, load.statuses()
    return load


def test_a_postgres_outage_gives_503_with_retry_after_and_the_api_recovers(tmp_path, tiny_model_dir,
                                                                          private_postgres, redis_url):
    stack = make_stack(tmp_path, private_postgres.url, redis_url, tiny_model_dir)
    stack.start_api()
    try:
        load = _run_outage(stack, private_postgres)
        assert load.statuses()[503] > 0 and load.statuses(path="/v1/files")[503] > 0
        assert 500 not in load.statuses()
    finally:
        stack.stop()


def test_a_redis_outage_never_gives_500_and_the_api_recovers(tmp_path, tiny_model_dir, postgres_url,
                                                             private_redis):
    stack = make_stack(tmp_path, postgres_url, private_redis.url, tiny_model_dir)
    stack.start_api()
    try:
        load = _run_outage(stack, private_redis)
        # Rate-limit counters fail open, so team routes go on; readiness tells the outage.
        assert load.statuses(path="/readyz")[503] > 0
        assert set(load.statuses(path="/v1/files")) == {200}
    finally:
        stack.stop()
