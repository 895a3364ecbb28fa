"""Serving through the API: adapters trained by jobs and imported, batched together, hot-swapped."""

from __future__ import annotations

import io
import json
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.flows import FAST_QLORA, upload_with_curl, write_dataset
from tests.support.reference import peft_greedy_chat
from tests.support.services import free_port, make_stack, wait_for_status

pytestmark = pytest.mark.slow
QUESTION = "What colour is item 7?"
TOKENS = 12


class Served:
    """The running stack, with the adapters it serves and their local folders."""

    def __init__(self, stack, inference_port: int, model_dir: Path, scratch: Path) -> None:
        self.stack, self.inference_port, self.model_dir, self.scratch = stack, inference_port, model_dir, scratch
        self.folders: dict[str, Path] = {}

    def chat(self, model: str, question: str = QUESTION, tokens: int = TOKENS, key: str | None = None):
        with self.stack.client(key) as client:
            return client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": tokens,
                "temperature": 0})

    def text(self, model: str, question: str = QUESTION, tokens: int = TOKENS) -> str:
        response = self.chat(model, question, tokens)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    def status(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.inference_port}/internal/status", timeout=10).json()

    def download(self, ref: str) -> Path:
        """The adapter's folder as the registry hands it out."""
        with self.stack.client() as client:
            data = client.get(f"/v1/adapters/{ref}/download").content
        target = self.scratch / ref.replace(":", "_").replace("@", "_")
        with tarfile.open(fileobj=io.BytesIO(data)) as tf:
            tf.extractall(target, filter="data")
        return next(target.iterdir())

    def import_adapter(self, folder: Path, name: str) -> dict:
        with self.stack.client() as client:
            response = client.post("/v1/adapters/import", data={"name": name, "base_model": "tiny-llama"},
                                   files={"file": ("a.tar.gz", tar_gz(folder))})
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def served(tmp_path_factory, postgres_url, redis_url, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("inference")
    port = free_port()
    stack = make_stack(tmp, postgres_url, redis_url, tiny_model_dir, PATCHBAY_INFERENCE_BASE_MODEL="tiny-llama",
                       PATCHBAY_MAX_LOADED_ADAPTERS="2", PATCHBAY_INFERENCE_URL=f"http://127.0.0.1:{port}")
    try:
        stack.start_api()
        stack.start_worker()
        stack.start_inference(port)
        result = Served(stack, port, tiny_model_dir, tmp)
        for name, seed in (("alpha", 1), ("beta", 2)):
            file_id = upload_with_curl(stack, write_dataset(tmp, n=16, seed=seed))["id"]
            with stack.client() as client:
                job = client.post("/v1/fine_tuning/jobs", json={
                    "model": "tiny-llama", "training_file": file_id, "suffix": name, "seed": seed,
                    "hyperparameters": {"n_epochs": 2, "batch_size": 4},
                    "peft": {**FAST_QLORA, "method": "lora", "learning_rate": 5e-2}}).json()
                done = wait_for_status(client, job["id"], ("succeeded", "failed"), stack=stack)
            assert done["status"] == "succeeded", done
            result.folders[name] = result.download(f"{name}@1")
        for name, seed in (("gamma", 3), ("delta", 4)):
            folder = save_peft_lora(tiny_model_dir, tmp / name, r=8, targets=("q_proj", "v_proj", "down_proj"),
                                    seed=seed, scale=30.0)
            result.import_adapter(folder, name)
            result.folders[name] = folder
        yield result
    finally:
        stack.stop()


def reference(served: Served, name: str | None, question: str = QUESTION, tokens: int = TOKENS) -> str:
    return peft_greedy_chat(served.model_dir, served.folders[name] if name else None, question, tokens)


def test_greedy_answers_equal_plain_peft(served):
    assert served.text("tiny-llama") == reference(served, None)
    for name in ("alpha", "beta", "gamma"):
        assert served.text(name) == reference(served, name), name
    with served.stack.client() as client:
        job_model = client.get("/v1/adapters/alpha@1").json()["fine_tuned_model"]
    assert served.text(job_model) == reference(served, "alpha")
    assert served.text("gamma") != served.text("tiny-llama")


def test_concurrent_mixed_requests_equal_solo_answers_and_share_batches(served):
    models = ["alpha", "beta", "tiny-llama"] * 2
    questions = [f"What colour is item {i}?" for i in range(len(models))]
    solo = [served.text(m, q) for m, q in zip(models, questions)]
    before = served.status()["stats"]
    barrier = threading.Barrier(len(models))

    def ask(pair):
        barrier.wait()
        return served.text(*pair)

    with ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(ask, zip(models, questions)))
    after = served.status()["stats"]
    assert together == solo
    assert after["mixed_adapter_steps"] > before["mixed_adapter_steps"]
    assert after["max_distinct_adapters"] >= 2


def test_alias_moves_without_restart_and_in_flight_stream_stays_on_its_version(served):
    with served.stack.client() as client:
        client.post("/v1/adapters/gamma/aliases", json={"alias": "prod", "version": 1}).raise_for_status()
        v2 = served.import_adapter(served.folders["delta"], "gamma")
        served.folders["gamma-v2"] = served.folders["delta"]
        assert served.text("gamma:prod") == reference(served, "gamma")
        long_v1 = reference(served, "gamma", tokens=40)
        text = []
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "gamma:prod", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 40,
                "temperature": 0, "stream": True}) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    text.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
                    break
            moved = client.post("/v1/adapters/gamma/aliases", json={"alias": "prod", "version": 2})
            assert moved.status_code == 200 and moved.json()["id"] == v2["id"]
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    text.append(chunk["choices"][0]["delta"].get("content") or "")
    assert "".join(text) == long_v1
    assert served.text("gamma:prod") == reference(served, "delta")


def test_official_openai_package(served):
    client = openai.OpenAI(base_url=f"{served.stack.base_url}/v1", api_key=served.stack.key, max_retries=0)
    reply = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=TOKENS, temperature=0)
    assert reply.choices[0].message.content == reference(served, "beta")
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens > reply.usage.prompt_tokens
    stream = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": QUESTION}],
                                            max_tokens=TOKENS, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference(served, "beta")
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    completion = client.completions.create(model="tiny-llama", prompt="The capital of France is", max_tokens=5,
                                           temperature=0)
    assert completion.choices[0].finish_reason in ("stop", "length") and completion.usage.prompt_tokens > 0
    ids = {m.id for m in client.models.list()}
    with served.stack.client() as http:
        alpha_model = http.get("/v1/adapters/alpha@1").json()["fine_tuned_model"]
    assert {"tiny-llama", alpha_model, "gamma@1", "gamma:prod"} <= ids
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-adapter", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert bad.value.body["param"] == "temperature"


def test_residency_cap_holds_and_evicted_adapters_reload(served):
    for _ in range(2):
        for name in ("alpha", "beta", "gamma@1", "delta"):
            folder_name = name.split("@")[0]
            assert served.text(name) == reference(served, folder_name), name
            ready = [a for a in served.status()["adapters"].values() if a["state"] == "ready"]
            assert len(ready) <= 2


def test_other_team_cannot_generate_with_our_adapters(served):
    other = served.stack.cli("team", "create", "globex").splitlines()[-1]
    for model in ("alpha", "alpha@1", "gamma:prod"):
        response = served.chat(model, key=other)
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"
    assert served.chat("tiny-llama", key=other).status_code == 200


def test_merged_deployment_matches_the_unmerged_adapter(served):
    with served.stack.client() as client:
        gamma = client.get("/v1/adapters/gamma@1").json()
    port = free_port()
    proc = served.stack.start_inference(port, PATCHBAY_MERGED_ADAPTER=gamma["id"])
    try:
        header = json.dumps({"id": gamma["id"], "storage_key": f"adapters/{gamma['id']}", "sha256": gamma["sha256"],
                             "base_model": "tiny-llama"})
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"X-Patchbay-Adapter": header},
                              json={"model": "gamma@1", "messages": [{"role": "user", "content": QUESTION}],
                                    "max_tokens": TOKENS, "temperature": 0}, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == reference(served, "gamma")
        status = httpx.get(f"http://127.0.0.1:{port}/internal/status", timeout=10).json()
        assert status["adapters"] == {}  # merged into the weights: no LoRA slot in use
        other_header = header.replace(gamma["id"], "adapter-other")
        other = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers={"X-Patchbay-Adapter": other_header},
                           json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
        assert other.status_code == 400
    finally:
        served.stack.kill(proc)


def test_a_dora_job_serves_like_plain_peft(served):
    file_id = upload_with_curl(served.stack, write_dataset(served.scratch, n=16, seed=5))["id"]
    with served.stack.client() as client:
        job = client.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": file_id, "suffix": "dora", "seed": 5,
            "hyperparameters": {"n_epochs": 2, "batch_size": 4},
            "peft": {**FAST_QLORA, "method": "dora", "learning_rate": 5e-2}}).json()
        done = wait_for_status(client, job["id"], ("succeeded", "failed"), stack=served.stack)
    assert done["status"] == "succeeded", done
    served.folders["dora"] = served.download("dora@1")
    assert json.loads((served.folders["dora"] / "adapter_config.json").read_text())["use_dora"] is True
    assert served.text(done["fine_tuned_model"]) == reference(served, "dora")


def test_generated_tokens_per_minute_are_limited_per_team_streamed_or_not(served):
    stack = served.stack
    port = free_port()
    stack._start_server("api", port, 60, PATCHBAY_TEAM_TOKENS_PER_MINUTE="20")
    other = stack.cli("team", "create", "tokens-other").splitlines()[-1]
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": TOKENS,
            "temperature": 0}

    def chat(key: str, stream: bool = False) -> httpx.Response:
        return httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={**body, "stream": stream},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60)

    first, second, third = chat(stack.key), chat(stack.key), chat(stack.key)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    assert first.json()["usage"]["completion_tokens"] == TOKENS  # 24 tokens > 20: the third waits
    assert third.status_code == 429 and third.headers["x-ratelimit-limit-tokens"] == "20", third.text
    assert 1 <= int(third.headers["retry-after"]) <= 60
    streamed = chat(other, stream=True)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert '"usage"' not in streamed.text  # counted through the usage chunk, which the client did not ask for
    assert chat(other, stream=True).status_code == 200
    assert chat(other, stream=True).status_code == 429  # the other team's own count
