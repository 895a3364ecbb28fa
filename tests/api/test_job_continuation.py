"""Jobs whose `model` names one of the team's fine-tuned models: they continue it (its base, weights and shape),
conflicts and unusable parents are 400s naming their field, other teams' adapters are 404s, and versions with a
parent show it and their lineage."""

from __future__ import annotations

import json
import secrets

import pytest
from sqlalchemy import select

from core.db import session_scope
from core.ids import new_id
from core.models import Adapter, Job, Team
from core.naming import adapter_name, fine_tuned_model_name
from core.registry import MAX_LINEAGE, publish_version
from core.schemas.peft_methods import RANKED_METHODS
from core.schemas.training import techniques_of
from tests.api.test_adapters import import_archive
from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.datasets import chat_lines, preference_lines, to_jsonl
from tests.support.registry_rows import version_fields


def upload(api, lines, key=None) -> str:
    response = api.client.post("/v1/files", headers=api.headers(key), data={"purpose": "fine-tune"},
                               files={"file": ("data.jsonl", to_jsonl(lines))})
    assert response.json()["status"] == "processed", response.text
    return response.json()["id"]


def create(api, *, dry_run=False, key=None, **body):
    return api.client.post("/v1/fine_tuning/jobs", headers=api.headers(key), json=body,
                           params={"dry_run": "true"} if dry_run else None)


def published(job_id: str, **overrides) -> Adapter:
    """Publish the version a finished job would publish (a stand-in artifact; the registry row is real)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        team = session.get(Team, job.team_id)
        peft = job.resolved["peft"]
        fields = version_fields(
            base_model=job.model, job_id=job.id, source="job", method=peft["method"],
            rank=peft["r"] if peft["method"] in RANKED_METHODS else None, techniques=techniques_of(peft),
            target_modules=peft["target_modules"] if isinstance(peft["target_modules"], list) else ["q_proj"],
            fine_tuned_model=fine_tuned_model_name(job.model, team.name, job.suffix, job.id),
            parent_id=(job.resolved.get("start_adapter") or {}).get("id"), **overrides)
        return publish_version(session, team_id=job.team_id, name=adapter_name(job.suffix, job.id), **fields)


@pytest.fixture
def chat_file(api) -> str:
    return upload(api, chat_lines(24))


def trained(api, chat_file, *, key=None, suffix="sft", **peft) -> Adapter:
    """A job submitted with `peft`, and its published version."""
    job = create(api, key=key, model="tiny-llama", training_file=chat_file, suffix=suffix, peft=peft)
    assert job.status_code == 200, job.text
    return published(job.json()["id"])


LORA = {"method": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}


def test_every_reference_form_continues_the_adapter_with_its_base_and_shape(api, chat_file):
    parent = trained(api, chat_file, **LORA)
    moved = api.client.post(f"/v1/adapters/{parent.name}/aliases", headers=api.headers(),
                            json={"alias": "prod", "version": parent.version})
    assert moved.status_code == 200, moved.text
    for ref in (parent.fine_tuned_model, parent.id, parent.name, f"{parent.name}@1", f"{parent.name}:prod"):
        preview = create(api, dry_run=True, model=ref, training_file=chat_file)
        assert preview.status_code == 200, (ref, preview.text)
        shown = preview.json()
        assert shown["model"] == ref and shown["start_adapter"]["id"] == parent.id, ref
        assert {k: shown["peft"][k] for k in ("method", "r", "alpha", "target_modules", "quantization")} == {
            "method": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "quantization": "none"}

    job = create(api, model=parent.fine_tuned_model, training_file=chat_file, suffix="dpo-next").json()
    assert job["model"] == parent.fine_tuned_model and job["peft"]["r"] == 4
    assert job["start_adapter"] == {"id": parent.id, "fine_tuned_model": parent.fine_tuned_model,
                                    "name": parent.name, "version": 1, "method": "lora"}
    assert api.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=api.headers()).json()["model"] == (
        parent.fine_tuned_model)
    with session_scope() as session:
        row = session.get(Job, job["id"])
        assert row.model == "tiny-llama" and row.spec["model"] == parent.fine_tuned_model
        assert row.resolved["start_adapter"] == {
            "id": parent.id, "fine_tuned_model": parent.fine_tuned_model, "name": parent.name, "version": 1,
            "storage_key": parent.storage_key, "sha256": parent.sha256, "method": "lora"}


@pytest.mark.parametrize("peft, inherited", [
    ({"method": "qlora", "r": 8}, {"method": "qlora", "r": 8, "alpha": 16, "target_modules": "all-linear",
                                   "quantization": "nf4-dq"}),
    ({"method": "dora", "r": 2, "alpha": 3}, {"method": "dora", "r": 2, "alpha": 3}),
    ({"method": "ia3", "ia3": {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}},
     {"method": "ia3", "ia3": {"target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"]}}),
    ({"method": "prompt_tuning", "prompt": {"num_virtual_tokens": 7}},
     {"method": "prompt_tuning", "prompt": {"num_virtual_tokens": 7}, "packing": False}),
    ({"method": "bottleneck_adapter", "bottleneck": {"size": 8, "placement": ["mlp"], "activation": "relu"}},
     {"method": "bottleneck_adapter", "bottleneck": {"size": 8, "placement": ["mlp"], "activation": "relu"}}),
])
def test_the_parents_method_and_shape_are_inherited(api, chat_file, peft, inherited):
    parent = trained(api, chat_file, **peft)
    knobs = {"max_seq_length": 512, **({"dropout": 0.1} if "r" in peft else {})}
    shown = create(api, dry_run=True, model=parent.id, training_file=chat_file, peft=knobs).json()["peft"]
    for key, value in inherited.items():
        if isinstance(value, dict):
            assert {k: shown[key][k] for k in value} == value, key
        else:
            assert shown[key] == value, key
    assert {k: shown[k] for k in knobs} == knobs  # the recipe's own knobs stay the request's


def test_restating_the_parents_shape_is_no_conflict_and_qlora_may_continue_lora(api, chat_file):
    parent = trained(api, chat_file, **LORA)
    same = create(api, dry_run=True, model=parent.id, training_file=chat_file,
                  peft={"method": "lora", "r": 4, "alpha": 8, "target_modules": ["v_proj", "q_proj"]})
    assert same.status_code == 200, same.text
    quantized = create(api, dry_run=True, model=parent.id, training_file=chat_file, peft={"method": "qlora"})
    assert quantized.status_code == 200, quantized.text
    assert quantized.json()["peft"]["method"] == "qlora" and quantized.json()["peft"]["quantization"] == "nf4-dq"


def test_conflicting_shape_fields_are_400_each_listed_and_naming_the_parent(api, chat_file):
    parent = trained(api, chat_file, **LORA)
    response = create(api, model=parent.fine_tuned_model, training_file=chat_file,
                      peft={"method": "dora", "r": 16, "alpha": 64, "target_modules": ["k_proj"]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert [p["param"] for p in error["errors"]] == ["peft.method", "peft.r", "peft.alpha", "peft.target_modules"]
    assert {p["code"] for p in error["errors"]} == {"conflicts_with_parent"}
    assert error["param"] == "peft.method" and parent.fine_tuned_model in error["message"]
    assert all(parent.id in p["message"] for p in error["errors"])

    lone = create(api, model=parent.id, training_file=chat_file, peft={"r": 16}).json()["error"]
    assert lone["param"] == "peft.r" and [p["param"] for p in lone["errors"]] == ["peft.r"]
    assert parent.fine_tuned_model in lone["message"] and "4" in lone["message"]

    bottleneck = trained(api, chat_file, suffix="bn", method="bottleneck_adapter", bottleneck={"size": 8})
    error = create(api, model=bottleneck.id, training_file=chat_file,
                   peft={"method": "bottleneck_adapter", "bottleneck": {"size": 16, "scaling": 2.0}}).json()["error"]
    assert [p["param"] for p in error["errors"]] == ["peft.bottleneck.scaling", "peft.bottleneck.size"]
    # A field of another method is refused as usual, naming where the method came from.
    error = create(api, model=bottleneck.id, training_file=chat_file, peft={"dropout": 0.2}).json()["error"]
    assert error["param"] == "peft.dropout" and bottleneck.id in error["message"]


@pytest.mark.parametrize("peft, reason", [
    ({"method": "adalora", "r": 4}, "adalora"),
    ({"method": "lora", "sparse": {"kind": "bitfit"}}, "sparse"),
    ({"method": "p_tuning"}, "prompt encoder"),
    ({"method": "prefix_tuning", "prompt": {"prefix_projection": True}}, "prompt encoder"),
])
def test_parents_that_cannot_be_continued_are_400_on_model_saying_why(api, chat_file, peft, reason):
    parent = trained(api, chat_file, **peft)
    response = create(api, model=parent.fine_tuned_model, training_file=chat_file)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_continuable")
    assert reason in error["message"] and parent.id in error["message"]


def test_sparse_training_cannot_start_from_an_adapter(api, chat_file):
    parent = trained(api, chat_file, **LORA)
    response = create(api, model=parent.id, training_file=chat_file, peft={"sparse": {"kind": "bitfit"}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "peft.sparse"


def test_an_imported_lora_continues_with_the_shape_of_its_config(api, chat_file, tiny_model_dir, tmp_path):
    folder = save_peft_lora(tiny_model_dir, tmp_path / "plain", r=4, targets=("q_proj", "k_proj"))
    imported = import_archive(api, tar_gz(folder), name="outside").json()
    shown = create(api, dry_run=True, model="outside", training_file=chat_file).json()
    assert shown["start_adapter"]["id"] == imported["id"]
    assert {k: shown["peft"][k] for k in ("method", "r", "alpha", "target_modules")} == {
        "method": "lora", "r": 4, "alpha": 8, "target_modules": ["k_proj", "q_proj"]}

    rslora = save_peft_lora(tiny_model_dir, tmp_path / "rslora", r=4, use_rslora=True)
    assert json.loads((rslora / "adapter_config.json").read_text())["use_rslora"] is True
    assert import_archive(api, tar_gz(rslora), name="outside-rs").status_code == 200
    error = create(api, model="outside-rs", training_file=chat_file).json()["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_continuable") and "use_rslora" in error["message"]


def test_another_teams_adapter_and_an_unknown_name_are_404(api, chat_file):
    theirs = trained(api, upload(api, chat_lines(8), key=api.other_key), key=api.other_key, **LORA)
    for ref in (theirs.fine_tuned_model, theirs.id, theirs.name, "no-such-adapter@3", "nope:prod"):
        response = create(api, dry_run=True, model=ref, training_file=chat_file)
        assert response.status_code == 404, (ref, response.text)
        error = response.json()["error"]
        assert (error["param"], error["code"], error["type"]) == ("model", "model_not_found", "not_found_error")
    assert create(api, model=theirs.id, key=api.other_key, training_file=chat_file).status_code == 400  # our file


def test_dpo_jobs_take_preference_files_and_supervised_jobs_refuse_them(api, chat_file):
    parent = trained(api, chat_file, **LORA)
    pairs = upload(api, preference_lines(8))
    dpo = {"type": "dpo"}
    for body, param in (({"training_file": chat_file, "method": dpo}, "training_file"),
                        ({"training_file": pairs, "validation_file": chat_file, "method": dpo}, "validation_file"),
                        ({"training_file": pairs}, "training_file"),
                        ({"training_file": chat_file, "validation_file": pairs}, "validation_file")):
        error = create(api, model=parent.id, **body).json()["error"]
        assert (error["param"], error["code"]) == (param, "invalid_file_format"), body
        assert ("preference" if body.get("method") else "dpo") in error["message"]
    continued = create(api, model=parent.fine_tuned_model, training_file=pairs, validation_file=pairs, method=dpo)
    assert continued.status_code == 200, continued.text
    assert continued.json()["method"]["type"] == "dpo" and continued.json()["start_adapter"]["id"] == parent.id


def _chain(team_id: str, length: int) -> list[Adapter]:
    """`length` versions, each trained from the one before."""
    rows, parent = [], None
    with session_scope() as session:
        for _ in range(length):
            rows.append(publish_version(session, team_id=team_id, name="chain", **version_fields(
                base_model="tiny-llama", parent_id=parent, fine_tuned_model=f"ft:chain:{secrets.token_hex(3)}")))
            parent = rows[-1].id
    return rows


def test_a_version_shows_its_parent_and_lineage_also_after_the_parent_is_deleted(api, chat_file):
    parent = trained(api, chat_file, **LORA)
    job = create(api, model=parent.fine_tuned_model, training_file=chat_file, suffix="next").json()
    child = published(job["id"])
    shown = api.client.get(f"/v1/adapters/{child.id}", headers=api.headers()).json()
    assert shown["parent"] == {"id": parent.id, "fine_tuned_model": parent.fine_tuned_model, "name": parent.name,
                               "version": 1}
    assert shown["lineage"] == [parent.id]
    listed = {a["id"]: a for a in api.client.get("/v1/adapters", headers=api.headers()).json()["data"]}
    assert listed[child.id]["lineage"] == [parent.id] and listed[parent.id]["parent"] is None
    assert listed[parent.id]["lineage"] == []

    assert api.client.delete(f"/v1/adapters/{parent.id}", headers=api.headers()).status_code == 200
    shown = api.client.get(f"/v1/adapters/{child.id}", headers=api.headers()).json()
    assert shown["parent"]["id"] == parent.id and shown["lineage"] == [parent.id]
    assert create(api, model=parent.id, training_file=chat_file).status_code == 404  # gone for new jobs


def test_lineage_is_nearest_first_bounded_and_survives_a_missing_row(api):
    with session_scope() as session:
        team_id = session.scalar(select(Team.id).where(Team.name == "acme"))
    rows = _chain(team_id, MAX_LINEAGE + 3)
    newest = api.client.get(f"/v1/adapters/{rows[-1].id}", headers=api.headers()).json()
    assert newest["lineage"] == [r.id for r in reversed(rows[-MAX_LINEAGE - 1:-1])]
    assert newest["parent"]["version"] == len(rows) - 1

    missing = new_id("adapter")
    with session_scope() as session:
        orphan = publish_version(session, team_id=team_id, name="orphan", **version_fields(
            base_model="tiny-llama", parent_id=missing))
    shown = api.client.get(f"/v1/adapters/{orphan.id}", headers=api.headers()).json()
    assert shown["parent"] == {"id": missing, "fine_tuned_model": None, "name": None, "version": None}
    assert shown["lineage"] == [missing]
