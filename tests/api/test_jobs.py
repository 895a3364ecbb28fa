"""`/v1/fine_tuning/jobs`: spec validation, resolution of "auto", listing, cancel and events."""

from __future__ import annotations

import json

import pytest

from tests.support.datasets import chat_lines, to_jsonl


@pytest.fixture
def training_file(api) -> str:
    response = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                               files={"file": ("train.jsonl", to_jsonl(chat_lines(40)))})
    return response.json()["id"]


def create(api, **body):
    return api.client.post("/v1/fine_tuning/jobs", headers=api.headers(), json=body)


def test_create_resolves_auto_and_answers_at_once(api, training_file):
    response = create(api, model="tiny-llama", training_file=training_file, suffix="bot", seed=7,
                      metadata={"team": "search"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
    assert job["status"] == "validating_files"
    assert job["hyperparameters"] == {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0}
    assert job["method"] == {"type": "supervised", "supervised": {"hyperparameters": job["hyperparameters"]}}
    assert job["peft"]["method"] == "qlora" and job["peft"]["quantization"] == "nf4-dq"
    assert job["peft"]["alpha"] == 32 and job["peft"]["learning_rate"] == pytest.approx(2e-4)
    assert job["seed"] == 7 and job["suffix"] == "bot" and job["metadata"] == {"team": "search"}
    assert job["fine_tuned_model"] is None and job["error"] is None and job["result_files"] == []
    events = api.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=api.headers()).json()
    assert events["data"][0]["message"].startswith("Created fine-tuning job")


def test_method_form_and_peft_extension(api, training_file):
    job = create(api, model="tiny-llama", training_file=training_file,
                 method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4,
                                                                                  "learning_rate_multiplier": 0.5}}},
                 peft={"method": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}).json()
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    assert job["peft"]["quantization"] == "none" and job["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert job["peft"]["learning_rate"] == pytest.approx(1e-4)


def test_invalid_spec_names_first_field_and_lists_all(api, training_file):
    response = create(api, model="tiny-llama", training_file=training_file,
                      hyperparameters={"n_epochs": 0}, peft={"r": 0, "dropout": 2, "bogus": True})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "hyperparameters.n_epochs"
    for field in ("hyperparameters.n_epochs", "peft.r", "peft.dropout", "peft.bogus"):
        assert field in error["message"], error["message"]


@pytest.mark.parametrize("method, quantization", [
    ("loha", "nf4-dq"), ("lokr", "nf4"), ("hra", "nf4-dq"),
])
def test_methods_without_a_4bit_layer_are_refused_on_a_4bit_base_saying_why(api, training_file, method,
                                                                              quantization):
    response = create(api, model="tiny-llama", training_file=training_file,
                      peft={"method": method, "quantization": quantization})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "peft.quantization"
    assert "4-bit" in error["message"] and "'none'" in error["message"], error["message"]


def test_every_problem_of_a_spec_is_listed_under_its_own_field(api, training_file):
    response = create(api, model="tiny-llama", training_file=training_file,
                      peft={"method": "prompt_tuning", "r": 8, "packing": True, "prompt": {"encoder": "lstm"}})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    for field in ("peft.r", "peft.packing", "peft.prompt.encoder"):
        assert f"{field}:" in message, message


@pytest.mark.parametrize("peft, filled", [
    ({"method": "adalora", "r": 4}, {"adalora": {"init_r": 6, "tinit": 6, "tfinal": 12}}),
    ({"method": "prompt_tuning"}, {"prompt": {"num_virtual_tokens": 20}, "packing": False}),
    ({"method": "p_tuning", "prompt": {"encoder": "lstm"}}, {"prompt": {"encoder": "lstm"}, "packing": False}),
    ({"method": "bottleneck_adapter", "quantization": "nf4-dq"},
     {"bottleneck": {"size": 64}, "quantization": "nf4-dq"}),
    ({"method": "ia3"}, {"ia3": {"target_modules": None}, "packing": True}),
    ({"method": "hra", "quantization": "none"}, {"quantization": "none"}),
    ({"method": "lora", "sparse": {"kind": "top_k"}, "layer_drop": 0.1, "layerwise_lr_decay": 0.8},
     {"sparse": {"kind": "top_k", "density": 0.01}, "layer_drop": 0.1, "layerwise_lr_decay": 0.8}),
])
def test_each_method_gets_its_defaults_filled(api, training_file, peft, filled):
    response = create(api, model="tiny-llama", training_file=training_file, peft=peft,
                      hyperparameters={"n_epochs": 3, "batch_size": 2})
    assert response.status_code == 200, response.text
    shown = response.json()["peft"]
    for key, value in filled.items():
        if isinstance(value, dict):
            assert {k: shown[key][k] for k in value} == value
        else:
            assert shown[key] == value


def test_an_unknown_model_is_404_naming_model(api, training_file):
    response = create(api, model="nope", training_file=training_file)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found") and "tiny-llama" in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"training_file": "file-missing"}, "training_file"),
    ({"validation_file": "file-missing"}, "validation_file"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ({"peft": {"method": "qlora", "quantization": "none"}}, "peft.quantization"),
    ({"peft": {"method": "loha", "quantization": "nf4-dq"}}, "peft.quantization"),
    ({"peft": {"method": "vera"}}, "peft.method"),
    ({"peft": {"method": "prompt_tuning", "packing": True}}, "peft.packing"),
    ({"peft": {"method": "lora", "bottleneck": {"size": 8}}}, "peft.bottleneck"),
    ({"peft": {"method": "bottleneck_adapter", "bottleneck": {"size": 0}}}, "peft.bottleneck.size"),
    ({"peft": {"method": "qlora", "sparse": {"kind": "top_k"}}}, "peft.sparse.modules"),
    ({"peft": {"method": "lora", "sparse": {"kind": "bitfit", "density": 0.5}}}, "peft.sparse.density"),
    ({"peft": {"method": "lora", "layer_drop": 1.0}}, "peft.layer_drop"),
    ({"peft": {"method": "prefix_tuning", "gradient_checkpointing": True}}, "peft.gradient_checkpointing"),
    ({"method": {"type": "dpo"}}, "training_file"),  # a chat file: dpo needs preference examples
    ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
])
def test_bad_specs_are_400_naming_the_field(api, training_file, body, param):
    response = create(api, **{"model": "tiny-llama", "training_file": training_file, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_file_in_error_or_of_another_team_is_400(api):
    bad = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                          files={"file": ("bad.jsonl", b"{nope")}).json()["id"]
    response = create(api, model="tiny-llama", training_file=bad)
    assert response.status_code == 400 and response.json()["error"]["code"] == "file_not_processed"
    theirs = api.client.post("/v1/files", headers=api.headers(api.other_key), data={"purpose": "fine-tune"},
                             files={"file": ("t.jsonl", to_jsonl(chat_lines(3)))}).json()["id"]
    response = create(api, model="tiny-llama", training_file=theirs)
    assert response.status_code == 400 and response.json()["error"]["param"] == "training_file"


def test_body_that_is_not_json_is_400(api):
    response = api.client.post("/v1/fine_tuning/jobs", headers={**api.headers(), "Content-Type": "application/json"},
                               content=b"{not json")
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]


def test_list_filters_by_metadata_and_pages(api, training_file):
    ids = [create(api, model="tiny-llama", training_file=training_file, metadata={"n": str(i % 2)}).json()["id"]
           for i in range(3)]
    page = api.client.get("/v1/fine_tuning/jobs", headers=api.headers(), params={"limit": 2}).json()
    assert page["has_more"] is True and page["first_id"] == ids[2] and page["last_id"] == ids[1]
    only = api.client.get("/v1/fine_tuning/jobs?metadata[n]=0", headers=api.headers()).json()
    assert sorted(j["id"] for j in only["data"]) == sorted([ids[0], ids[2]])


def test_cancel_is_final_and_idempotent(api, training_file):
    job_id = create(api, model="tiny-llama", training_file=training_file).json()["id"]
    first = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers())
    assert first.json()["status"] == "cancelled" and first.json()["finished_at"]
    again = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers())
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_event_stream_replays_and_ends_when_the_job_has_ended(api, training_file):
    job_id = create(api, model="tiny-llama", training_file=training_file).json()["id"]
    api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers())
    with api.client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true", headers=api.headers()) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert "Created fine-tuning job" in lines[0] and "cancelled" in lines[-2]


def test_checkpoints_list_is_empty_before_training(api, training_file):
    job_id = create(api, model="tiny-llama", training_file=training_file).json()["id"]
    page = api.client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=api.headers()).json()
    assert page == {"object": "list", "data": [], "has_more": False}


def test_pause_and_resume(api, training_file):
    job_id = create(api, model="tiny-llama", training_file=training_file).json()["id"]
    paused = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=api.headers())
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert api.client.delete(f"/v1/files/{training_file}", headers=api.headers()).status_code == 409
    resumed = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=api.headers())
    assert resumed.status_code == 200 and resumed.json()["status"] == "queued"
    again = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/resume", headers=api.headers())
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_paused"
    api.client.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=api.headers())
    finished = api.client.post(f"/v1/fine_tuning/jobs/{job_id}/pause", headers=api.headers())
    assert finished.status_code == 409
    messages = [e["message"] for e in api.client.get(f"/v1/fine_tuning/jobs/{job_id}/events",
                                                     headers=api.headers()).json()["data"]]
    assert any("paused" in m for m in messages) and any("resumed" in m for m in messages)


def test_chat_data_on_a_base_without_chat_template_is_400(api, training_file, tiny_model_dir, tmp_path):
    import shutil

    from core.base_models import register_base_model
    from core.db import session_scope

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with session_scope() as session:
        register_base_model(session, "bare-llama", bare)
    response = create(api, model="bare-llama", training_file=training_file)
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_chat_template"
    text_file = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                                files={"file": ("t.jsonl", b'{"text": "plain words"}\n')}).json()["id"]
    assert create(api, model="bare-llama", training_file=text_file).status_code == 200


def test_the_job_is_committed_before_its_response_is_sent(api, training_file):
    """A client that acts on a fresh id at once (as the openai SDK does) must find the row."""
    import asyncio

    from sqlalchemy import func, select

    from core.db import session_scope
    from core.models import Job

    body = json.dumps({"model": "tiny-llama", "training_file": training_file}).encode()
    rows_seen_at_response_start = []
    headers = [(b"content-type", b"application/json"), (b"authorization", f"Bearer {api.key}".encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/fine_tuning/jobs", "raw_path": b"/v1/fine_tuning/jobs", "query_string": b"",
             "headers": headers, "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            assert message["status"] == 200
            with session_scope() as session:
                rows_seen_at_response_start.append(session.scalar(select(func.count()).select_from(Job)))

    asyncio.run(api.client.app(scope, receive, send))
    assert rows_seen_at_response_start == [1]
