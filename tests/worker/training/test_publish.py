"""worker/training/publish.py: a job's artifact gets the shared `patchbay.json` and a `published` registry version."""

from __future__ import annotations

import json

from core.adapter_metadata import read_adapter_metadata
from core.db import session_scope
from core.ids import new_id, now
from core.models import Adapter, BaseModelRecord, File, Job
from core.storage import get_storage
from tests.support.registry_rows import BASE, add_version, feed, fresh_registry
from worker.training.publish import publish_adapter, write_metadata


def test_a_job_publishes_its_metadata_and_a_new_version(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    with fresh_registry(tmp_path / "data") as teams:
        with session_scope() as session:
            job = Job(id=new_id("ftjob"), team_id=teams.acme, model=BASE, training_file="file-t", status="running",
                      spec={}, seed=0, created_at=now(), deadline_at=now() + 60, attempts=1, suffix="bot",
                      resolved={"peft": {"method": "lora"}, "seed": 0})
            session.add(job)
            training = File(id="file-t", team_id=teams.acme, purpose="fine-tune", filename="t.jsonl", bytes=1,
                            storage_key="files/t", sha256="d" * 64, status="processed")
            metadata = write_metadata(
                folder, job=job, base=session.get(BaseModelRecord, BASE),
                files={"training_file": training, "validation_file": None}, result_metrics={"train_loss": 1.5},
                quantization={"bits": 4}, trainable_params=12, total_params=112, base_params=100, probe={"x": [1]})
            adapter = publish_adapter(session, get_storage(), job=job, adapter_dir=folder, metadata=metadata)
        written = read_adapter_metadata(folder)
        assert (written.source, written.job_id, written.method, written.rank, written.alpha) == (
            "job", job.id, "lora", 4, 8)
        assert written.datasets["training_file"].sha256 == "d" * 64 and written.datasets["validation_file"] is None
        assert set(written.files) == {"adapter_config.json", "adapter_model.safetensors"}
        with session_scope() as session:
            row = session.get(Adapter, adapter.id)
            assert (row.name, row.version, row.rank, row.target_modules, row.base_params, row.metrics) == (
                "bot", 1, 4, ["q_proj", "v_proj"], 100, {"train_loss": 1.5})
        assert get_storage().exists(row.storage_key)
        assert [(c["kind"], c["adapter_id"]) for c in feed()] == [("published", adapter.id)]


def test_a_job_that_continued_an_adapter_records_it_as_the_parent(tmp_path):
    folder = tmp_path / "artifact"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    with fresh_registry(tmp_path / "data") as teams:
        parent = add_version(teams.acme, "sft", fine_tuned_model="ft:tiny-base:acme:sft:1")
        start = {"id": parent.id, "fine_tuned_model": parent.fine_tuned_model, "name": "sft", "version": 1,
                 "storage_key": parent.storage_key, "sha256": parent.sha256, "method": "lora"}
        with session_scope() as session:
            job = Job(id=new_id("ftjob"), team_id=teams.acme, model=BASE, training_file="file-t", status="running",
                      spec={"model": parent.fine_tuned_model}, seed=0, created_at=now(), deadline_at=now() + 60,
                      attempts=1, suffix="dpo", resolved={"peft": {"method": "lora"}, "start_adapter": start})
            session.add(job)
            metadata = write_metadata(
                folder, job=job, base=session.get(BaseModelRecord, BASE), files={"training_file": None},
                result_metrics={}, quantization={}, trainable_params=1, total_params=2, base_params=1, probe={})
            child = publish_adapter(session, get_storage(), job=job, adapter_dir=folder, metadata=metadata)
        with session_scope() as session:
            row = session.get(Adapter, child.id)
            assert (row.parent_id, row.base_model, row.name) == (parent.id, BASE, "dpo")
        assert read_adapter_metadata(folder).training_config["start_adapter"]["id"] == parent.id
