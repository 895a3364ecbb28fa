"""`POST /v1/fine_tuning/jobs?dry_run=true` resolves a spec without creating a job, and a 400 lists every
bad field in `error.errors` (the console shows each beside its field)."""

from __future__ import annotations

from tests.api.test_files import upload
from tests.api.test_jobs import create
from tests.support.datasets import chat_lines, to_jsonl


def dry_run(api, **body):
    return api.client.post("/v1/fine_tuning/jobs", params={"dry_run": "true"}, headers=api.headers(), json=body)


def test_dry_run_resolves_like_a_real_create_and_creates_nothing(api):
    training = upload(api, to_jsonl(chat_lines(40))).json()["id"]
    body = {"model": "tiny-llama", "training_file": training, "seed": 3, "peft": {"method": "lora", "r": 4}}
    preview = dry_run(api, **body)
    assert preview.status_code == 200, preview.text
    shown = preview.json()
    assert shown["object"] == "fine_tuning.job.preview" and shown["training_examples"] == 40
    assert api.client.get("/v1/fine_tuning/jobs", headers=api.headers()).json()["data"] == []
    job = create(api, **body).json()
    for name in ("hyperparameters", "method", "peft"):
        assert shown[name] == job[name], name
    assert shown["peft"]["alpha"] == 8 and shown["peft"]["quantization"] == "none"
    assert shown["expected_steps"] == 20 * 3  # 40 examples in batches of 2, 3 epochs, as "auto" resolves


def test_every_bad_field_is_listed_at_once_schema_problems_first(api):
    training = upload(api, to_jsonl(chat_lines(4))).json()["id"]
    response = dry_run(api, model="tiny-llama", training_file=training, suffix="no spaces",
                       hyperparameters={"n_epochs": 0}, peft={"r": 0, "dropout": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    params = {p["param"] for p in error["errors"]}
    assert {"suffix", "hyperparameters.n_epochs", "peft.r", "peft.dropout"} <= params, error
    assert error["param"] == error["errors"][0]["param"] and all(p["message"] for p in error["errors"])


def test_unusable_files_are_reported_together(api):
    bad_file = upload(api, b"{oops\n").json()["id"]
    response = create(api, model="tiny-llama", training_file=bad_file, validation_file="file-missing")
    assert response.status_code == 400
    error = response.json()["error"]
    assert [(p["param"], p["code"]) for p in error["errors"]] == [
        ("training_file", "file_not_processed"), ("validation_file", "file_not_found")]
    assert error["param"] == "training_file" and "2 problem(s)" in error["message"]


def test_an_unknown_model_is_404_before_the_files_are_looked_at(api):
    bad_file = upload(api, b"{oops\n").json()["id"]
    for answer in (create(api, model="no-such-model", training_file=bad_file),
                   dry_run(api, model="no-such-model", training_file=bad_file)):
        error = answer.json()["error"]
        assert answer.status_code == 404 and error["param"] == "model" and error["code"] == "model_not_found"


def test_a_single_problem_keeps_the_plain_error_shape(api):
    response = create(api, model="tiny-llama", training_file="file-missing")
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "training_file" and error["code"] == "file_not_found"
    assert "errors" not in error


def test_hyperparameter_problems_name_their_field_in_either_form(api):
    training = upload(api, to_jsonl(chat_lines(4))).json()["id"]
    plain = dry_run(api, model="tiny-llama", training_file=training,
                    hyperparameters={"n_epochs": 99, "batch_size": 0}).json()["error"]
    assert [p["param"] for p in plain["errors"]] == ["hyperparameters.n_epochs", "hyperparameters.batch_size"]
    nested = dry_run(api, model="tiny-llama", training_file=training, method={
        "type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 500}}}).json()["error"]
    assert nested["param"] == "method.supervised.hyperparameters.learning_rate_multiplier"
