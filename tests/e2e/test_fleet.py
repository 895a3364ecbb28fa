"""The inference fleet: replicas of several bases behind one API, failover, adapter affinity, no replica.

Real Postgres, Redis and `patchbay api` / `worker` / `inference` processes. Replicas register in the
database (no PATCHBAY_INFERENCE_URL) and renew their rows every 0.5 s with a TTL of 3 s. The base
`tiny-llama` and a tiny Qwen2 with its own tokenizer each get a replica for the whole module; tests
that need replicas of their own serve the tiny Llama's folder under another base id, so their traffic
and counters stay apart.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.flows import FAST_QLORA, upload_with_curl, write_dataset
from tests.support.services import PatchbayStack, free_port, make_stack, wait_for_status

pytestmark = pytest.mark.slow
TTL_SECONDS = 3.0
QUESTION = "What colour is item 7?"
TOKENS = 8


class Fleet:
    """The running stack, its module-wide replicas by base, and an admin key for `GET /v1/replicas`."""

    def __init__(self, stack: PatchbayStack, admin_key: str, ports: dict[str, int], model_dir: Path,
                 scratch: Path) -> None:
        self.stack, self.admin_key, self.ports = stack, admin_key, ports
        self.model_dir, self.scratch = model_dir, scratch
        self.adapters: dict[str, str] = {}  # fine-tuned model name -> adapter version id

    def chat(self, model: str, question: str = QUESTION, tokens: int = TOKENS) -> httpx.Response:
        with self.stack.client() as client:
            return client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
                "temperature": 0})

    def text(self, model: str, question: str = QUESTION, tokens: int = TOKENS) -> str:
        response = self.chat(model, question, tokens)
        assert response.status_code == 200, f"{model}: {response.text}\n{self.stack.logs()}"
        return response.json()["choices"][0]["message"]["content"]

    def replicas(self) -> list[dict]:
        with self.stack.client(self.admin_key) as client:
            response = client.get("/v1/replicas")
        assert response.status_code == 200, response.text
        return response.json()["data"]

    def wait_for_replicas(self, base_model: str, count: int, state: str = "ready", timeout: float = 30) -> list[dict]:
        """Until the API lists `count` replicas of the base in `state`."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.replicas() if r["base_model"] == base_model and r["state"] == state]
            if len(found) == count:
                return found
            assert time.monotonic() < deadline, f"replicas of {base_model}: {self.replicas()}"
            time.sleep(0.1)

    def import_adapter(self, folder: Path, name: str, base_model: str) -> str:
        with self.stack.client() as client:
            response = client.post("/v1/adapters/import", data={"name": name, "base_model": base_model},
                                   files={"file": ("a.tar.gz", tar_gz(folder))})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def add_base(self, model_id: str) -> None:
        """Register the tiny Llama's folder under another base id (replicas of their own, counters apart)."""
        self.stack.cli("models", "add", model_id, str(self.model_dir))


def status(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> Path:
    from tests.support.tiny_model import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url, redis_url, tiny_model_dir, qwen2_dir):
    """API, worker, one replica of each base, and an adapter trained by a job on each."""
    tmp = tmp_path_factory.mktemp("fleet")
    stack = make_stack(tmp, postgres_url, redis_url, tiny_model_dir, PATCHBAY_REPLICA_TTL_SECONDS=str(TTL_SECONDS),
                       PATCHBAY_REPLICA_HEARTBEAT_SECONDS="0.5", PATCHBAY_REPLICA_WAIT_SECONDS="60")
    stack.cli("models", "add", "tiny-qwen2", str(qwen2_dir))
    admin_key = stack.cli("team", "create", "fleet-ops", "--admin").splitlines()[-1]
    ports = {"tiny-llama": free_port(), "tiny-qwen2": free_port()}
    try:
        stack.start_api()
        stack.start_worker()
        replicas = {base: stack.spawn_inference(port, base) for base, port in ports.items()}
        result = Fleet(stack, admin_key, ports, tiny_model_dir, tmp)
        jobs = {}
        with stack.client() as client:
            for seed, base in enumerate(ports, start=1):  # both jobs queue while the replicas load
                file_id = upload_with_curl(stack, write_dataset(tmp, n=8, seed=seed))["id"]
                jobs[base] = client.post("/v1/fine_tuning/jobs", json={
                    "model": base, "training_file": file_id, "suffix": base.replace("tiny-", ""), "seed": seed,
                    "hyperparameters": {"n_epochs": 1, "batch_size": 4},
                    "peft": {**FAST_QLORA, "method": "lora", "learning_rate": 5e-2}}).json()["id"]
            for base, port in ports.items():
                stack.wait_until_answers(replicas[base], port, "/readyz")
            for base, job_id in jobs.items():
                done = wait_for_status(client, job_id, ("succeeded", "failed"), stack=stack)
                assert done["status"] == "succeeded", done
                result.adapters[done["fine_tuned_model"]] = client.get(
                    f"/v1/adapters/{base.replace('tiny-', '')}@1").json()["id"]
        yield result
    finally:
        stack.stop()


def test_two_bases_answer_mixed_concurrent_requests_each_on_its_own_replica(fleet):
    llama_tuned, qwen_tuned = fleet.adapters  # in job order: tiny-llama's, then tiny-qwen2's
    models = ["tiny-llama", "tiny-qwen2", llama_tuned, qwen_tuned]
    requests = [(models[i % 4], f"What colour is item {i}?") for i in range(20)]
    solo = {pair: fleet.text(*pair) for pair in requests}
    barrier = threading.Barrier(len(requests))

    def ask(pair):
        barrier.wait()
        return fleet.text(*pair)

    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests))
    assert together == [solo[pair] for pair in requests]

    sent = Counter(model for model, _ in requests) + Counter(model for model, _ in solo)
    served = {base: status(port)["stats"]["requests_by_model"] for base, port in fleet.ports.items()}
    assert served["tiny-llama"] == {"tiny-llama": sent["tiny-llama"], fleet.adapters[llama_tuned]: sent[llama_tuned]}
    assert served["tiny-qwen2"] == {"tiny-qwen2": sent["tiny-qwen2"], fleet.adapters[qwen_tuned]: sent[qwen_tuned]}
    listed = {r["base_model"]: r for r in fleet.replicas()}
    assert {base: listed[base]["url"] for base in fleet.ports} == {
        base: f"http://127.0.0.1:{port}" for base, port in fleet.ports.items()}
    assert listed["tiny-llama"]["resident_adapters"] == [fleet.adapters[llama_tuned]]


def test_requests_fail_over_when_a_replica_is_killed_and_it_leaves_the_fleet_within_the_ttl(fleet):
    port = free_port()
    doomed = fleet.stack.start_inference(port, "tiny-llama")
    fleet.wait_for_replicas("tiny-llama", 2)
    llama_tuned = next(iter(fleet.adapters))
    stop, answers = threading.Event(), []

    def keep_asking(i: int) -> None:
        while not stop.is_set():
            response = fleet.chat(["tiny-llama", llama_tuned][i % 2], f"What colour is item {i}?", tokens=24)
            answers.append((time.monotonic(), response.status_code, response.text))

    with ThreadPoolExecutor(4) as pool:
        askers = [pool.submit(keep_asking, i) for i in range(4)]
        try:
            deadline = time.monotonic() + 60
            while status(port)["load"] == 0:  # the doomed replica has generations in flight
                assert time.monotonic() < deadline
                time.sleep(0.02)
            fleet.stack.kill(doomed)
            killed_at = time.monotonic()
            while sum(1 for at, _, _ in answers if at > killed_at + 0.5) < 8:
                assert time.monotonic() < killed_at + 60
                time.sleep(0.05)
        finally:
            stop.set()
        for asker in askers:
            asker.result()
    failed = [(code, text) for _, code, text in answers if code != 200]
    assert not failed, failed
    while any(r["url"] == f"http://127.0.0.1:{port}" for r in fleet.replicas()):
        assert time.monotonic() - killed_at < TTL_SECONDS + 2, "the dead replica stayed listed past its TTL"
        time.sleep(0.1)
    assert [r["url"] for r in fleet.replicas() if r["base_model"] == "tiny-llama"] == [
        f"http://127.0.0.1:{fleet.ports['tiny-llama']}"]


def test_affinity_loads_each_adapter_once_across_two_replicas(fleet):
    fleet.add_base("tiny-affinity")
    ports = [free_port(), free_port()]
    procs = [fleet.stack.spawn_inference(p, "tiny-affinity", PATCHBAY_MAX_LOADED_ADAPTERS="2") for p in ports]
    names = ["one", "two", "three", "four"]
    ids = {}
    for seed, name in enumerate(names, start=1):  # while the replicas load
        folder = save_peft_lora(fleet.model_dir, fleet.scratch / f"affinity-{name}", seed=seed, scale=30.0)
        ids[name] = fleet.import_adapter(folder, name, "tiny-affinity")
    try:
        for proc, port in zip(procs, ports):
            fleet.stack.wait_until_answers(proc, port, "/readyz")
        fleet.wait_for_replicas("tiny-affinity", 2)
        first = {name: fleet.text(name) for name in names}
        for _ in range(2):
            assert {name: fleet.text(name) for name in names} == first
        stats = [status(port)["stats"] for port in ports]
        loads = Counter()
        for replica_stats in stats:
            loads.update(replica_stats["loads_by_adapter"])
        assert loads == {ids[name]: 1 for name in names}, stats
        assert sum(s["requests"] for s in stats) == 3 * len(names)
        assert all(s["adapter_loads"] == 2 for s in stats), stats  # two each: nobody evicted anybody
    finally:
        for proc in procs:
            fleet.stack.kill(proc, signal.SIGTERM)


def test_no_replica_answers_503_naming_the_base_and_a_starting_one_holds_the_request(fleet):
    fleet.add_base("tiny-late")
    refused = fleet.chat("tiny-late")
    assert refused.status_code == 503, refused.text
    error = refused.json()["error"]
    assert "tiny-late" in error["message"] and refused.headers["retry-after"]

    port = free_port()
    proc = fleet.stack.spawn_inference(port, "tiny-late")
    try:
        fleet.wait_for_replicas("tiny-late", 1, state="loading")
        started = time.monotonic()
        held = fleet.chat("tiny-late")
        assert held.status_code == 200, held.text
        assert status(port)["stats"]["requests_by_model"] == {"tiny-late": 1}  # no 503 from it: it was held
        assert time.monotonic() - started < 60
    finally:
        fleet.stack.kill(proc, signal.SIGTERM)
