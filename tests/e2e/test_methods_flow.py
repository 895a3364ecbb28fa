"""Every PEFT method and technique through the API, the queue, the worker and the inference server.

For each spec: the job succeeds and its loss falls; the published artifact, rebuilt from its files in a
fresh process, reproduces the probe logits the worker took from the trained model in memory; and a chat
completion through the API is served with that adapter (the server's greedy reply equals the rebuilt
model's greedy reply).
"""

from __future__ import annotations

import json

import pytest

from tests.support.artifact_check import reload_in_fresh_process
from tests.support.flows import upload_with_curl, write_dataset
from tests.support.services import free_port, make_stack, wait_for_status

pytestmark = pytest.mark.slow
QUESTION = "What colour is item 5?"
TOKENS = 8
FAST = {"max_seq_length": 128, "checkpoint_every_steps": 100, "warmup_ratio": 0.0}

SPECS: dict[str, dict] = {
    "qlora": {"method": "qlora", "r": 8, "learning_rate": 3e-3},
    "lora": {"method": "lora", "r": 8, "learning_rate": 3e-3},
    "dora": {"method": "dora", "r": 8, "learning_rate": 3e-3},
    "adalora": {"method": "adalora", "r": 4, "learning_rate": 5e-3},
    "loha": {"method": "loha", "r": 4, "learning_rate": 3e-3},
    "lokr": {"method": "lokr", "r": 4, "learning_rate": 3e-3},
    "hra": {"method": "hra", "r": 4, "learning_rate": 3e-3},
    "ia3-nf4": {"method": "ia3", "quantization": "nf4-dq", "learning_rate": 3e-2},
    "prefix_tuning": {"method": "prefix_tuning", "prompt": {"num_virtual_tokens": 4}, "learning_rate": 3e-2},
    "prompt_tuning": {"method": "prompt_tuning", "prompt": {"num_virtual_tokens": 4}, "learning_rate": 1e-1},
    "p_tuning": {"method": "p_tuning", "prompt": {"num_virtual_tokens": 4}, "learning_rate": 1e-2},
    "bottleneck-nf4": {"method": "bottleneck_adapter", "quantization": "nf4-dq", "bottleneck": {"size": 16},
                       "learning_rate": 1e-2},
    "lora+bitfit": {"method": "lora", "r": 4, "learning_rate": 3e-3, "sparse": {"kind": "bitfit"}},
    "ia3+modules": {"method": "ia3", "learning_rate": 1e-2, "sparse": {"kind": "modules", "modules": ["layers.1.mlp"]}},
    "lora+top_k": {"method": "lora", "r": 4, "learning_rate": 3e-3,
                   "sparse": {"kind": "top_k", "density": 0.02, "warmup_steps": 2}},
    "lora+layer_drop+llrd": {"method": "lora", "r": 8, "learning_rate": 3e-3, "layer_drop": 0.3,
                             "layerwise_lr_decay": 0.7},
}


class MethodsStack:
    """A running stack with one finished job per spec, and the fresh-process check of every artifact."""

    def __init__(self, stack, model_dir) -> None:
        self.stack, self.model_dir = stack, model_dir
        self.jobs: dict[str, dict] = {}
        self.checks: dict[str, dict] = {}

    def adapter(self, name: str) -> dict:
        with self.stack.client() as client:
            return client.get(f"/v1/adapters/{self.jobs[name]['fine_tuned_model']}").json()

    def folder(self, name: str):
        return self.stack.data_dir / "storage" / "adapters" / self.adapter(name)["id"]


def _training_quantization(spec: dict) -> str:
    return spec.get("quantization") or ("nf4-dq" if spec["method"] == "qlora" else "none")


def _prompt_ids(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, postgres_url, redis_url, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("methods")
    port = free_port()
    stack = make_stack(tmp, postgres_url, redis_url, tiny_model_dir, PATCHBAY_INFERENCE_BASE_MODEL="tiny-llama",
                       PATCHBAY_INFERENCE_QUANTIZATION="none", PATCHBAY_MAX_LOADED_ADAPTERS="4",
                       PATCHBAY_INFERENCE_URL=f"http://127.0.0.1:{port}")
    try:
        stack.start_api()
        stack.start_worker()
        stack.start_inference(port)
        result = MethodsStack(stack, tiny_model_dir)
        file_id = upload_with_curl(stack, write_dataset(tmp, n=16, seed=3))["id"]
        with stack.client() as client:
            for name, spec in SPECS.items():
                response = client.post("/v1/fine_tuning/jobs", json={
                    "model": "tiny-llama", "training_file": file_id, "suffix": name.replace("+", "-"), "seed": 7,
                    "hyperparameters": {"n_epochs": 3, "batch_size": 4}, "peft": {**FAST, **spec}})
                assert response.status_code == 200, response.text
                result.jobs[name] = response.json()
            for name, job in result.jobs.items():
                result.jobs[name] = wait_for_status(client, job["id"], ("succeeded", "failed", "cancelled"),
                                                    timeout=600, stack=stack)
        cases = [{"name": name, "dir": str(result.folder(name)), "quantization": _training_quantization(SPECS[name])}
                 for name, job in result.jobs.items() if job["status"] == "succeeded"]
        result.checks = reload_in_fresh_process(tiny_model_dir, cases, tmp, prompt_ids=_prompt_ids(tiny_model_dir),
                                                max_new_tokens=TOKENS, serving_quantization="none")
        yield result
    finally:
        stack.stop()


@pytest.mark.parametrize("name", list(SPECS))
def test_method_trains_publishes_reloads_and_serves(trained, name):
    stack = trained.stack
    job = trained.jobs[name]
    assert job["status"] == "succeeded", (job, stack.logs())
    with stack.client() as client:
        events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    metrics = [e["data"] for e in reversed(events) if e["type"] == "metrics"]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"], metrics

    adapter = trained.adapter(name)
    spec = SPECS[name]
    assert adapter["method"] == spec["method"]
    assert 0 < adapter["trainable_params"] and 0 < adapter["trainable_share"] < 1 and adapter["bytes"] > 0
    assert adapter["base_params"] > adapter["trainable_params"]
    for technique in ("sparse", "layer_drop", "layerwise_lr_decay"):
        assert (technique in adapter["techniques"]) == (technique in spec), adapter["techniques"]

    check = trained.checks[name]
    tolerance = 5e-4 if _training_quantization(spec) != "none" else 1e-4
    assert check["reload_diff"] < tolerance, check
    assert check["adapter_effect"] > 10 * tolerance, check
    probe = json.loads((trained.folder(name) / "patchbay.json").read_text())["probe"]
    assert check["argmax"] == probe["argmax"]

    with stack.client() as client:
        response = client.post("/v1/chat/completions", json={
            "model": job["fine_tuned_model"], "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": TOKENS, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == job["fine_tuned_model"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained.model_dir)
    expected = tokenizer.decode(check["greedy_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert response.json()["choices"][0]["message"]["content"] == expected
