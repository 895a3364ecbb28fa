"""`method: {"type": "dpo"}` on `/v1/fine_tuning/jobs`: OpenAI's shape, its defaults and its 400s."""

from __future__ import annotations

import pytest

from tests.support.datasets import chat_lines, preference_lines, to_jsonl


def _upload(api, lines) -> str:
    response = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                               files={"file": ("data.jsonl", to_jsonl(lines))})
    assert response.json()["status"] == "processed", response.text
    return response.json()["id"]


@pytest.fixture
def pair_file(api) -> str:
    return _upload(api, preference_lines(24))


def create(api, dry_run: bool = False, **body):
    return api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body,
                           params={"dry_run": "true"} if dry_run else None)


def test_a_dpo_job_shows_openai_method_object_with_beta(api, pair_file):
    response = create(api, model="tiny-llama", training_file=pair_file,
                      method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}})
    assert response.status_code == 200, response.text
    job = response.json()
    hyper = job["method"]["dpo"]["hyperparameters"]
    assert job["method"]["type"] == "dpo" and "supervised" not in job["method"]
    assert hyper["beta"] == 0.25 and hyper["n_epochs"] == 2 and hyper["batch_size"] == 1
    assert job["hyperparameters"]["n_epochs"] == 2


def test_auto_beta_resolves_to_a_tenth_and_the_dry_run_agrees(api, pair_file):
    body = dict(model="tiny-llama", training_file=pair_file, method={"type": "dpo"})
    preview = create(api, dry_run=True, **body).json()
    assert preview["method"]["dpo"]["hyperparameters"]["beta"] == 0.1
    assert preview["training_examples"] == 24
    job = create(api, **body).json()
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.1


@pytest.mark.parametrize("body, param", [
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}}, "method.dpo.hyperparameters.gamma"),
    ({"method": {"type": "dpo"}, "hyperparameters": {"n_epochs": 2}}, "hyperparameters"),
    ({"method": {"type": "supervised", "dpo": {}}}, "method.dpo"),
    ({"method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
    ({"method": {"type": "kto"}}, "method.type"),
])
def test_bad_dpo_specs_are_400_naming_the_field(api, pair_file, body, param):
    response = create(api, model="tiny-llama", training_file=pair_file, **body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_every_bad_dpo_hyperparameter_is_reported_at_once(api, pair_file):
    response = create(api, model="tiny-llama", training_file=pair_file,
                      method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 11, "n_epochs": 0}}})
    assert response.status_code == 400
    params = {problem["param"] for problem in response.json()["error"]["errors"]}
    assert params == {"method.dpo.hyperparameters.beta", "method.dpo.hyperparameters.n_epochs"}


def test_files_and_methods_must_match(api, pair_file):
    chat_file = _upload(api, chat_lines(8))
    refused = create(api, model="tiny-llama", training_file=chat_file, method={"type": "dpo"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "training_file"
    assert "preference" in refused.json()["error"]["message"]
    refused = create(api, model="tiny-llama", training_file=pair_file)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "training_file"
    assert "dpo" in refused.json()["error"]["message"]
    refused = create(api, model="tiny-llama", training_file=pair_file, validation_file=chat_file,
                     method={"type": "dpo"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "validation_file"
