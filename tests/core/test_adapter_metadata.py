"""core/adapter_metadata.py: one `patchbay.json` shape for trained and imported adapters."""

from __future__ import annotations

import hashlib
import json

from core.adapter_metadata import (
    METADATA_FILE,
    AdapterMetadata,
    DatasetStamp,
    base_model_stamp,
    read_adapter_metadata,
    write_adapter_metadata,
)
from core.models import BaseModelRecord
from core.storage import sha256_file

KEYS = {"format", "source", "job_id", "base_model", "method", "rank", "alpha", "trainable_params", "total_params",
        "base_params", "quantization", "training_config", "metrics", "probe", "datasets", "files"}


def _base(tmp_path, **files: str) -> BaseModelRecord:
    folder = tmp_path / "base"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return BaseModelRecord(id="tiny-base", path=str(folder), sha256="b" * 64)


def _adapter_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_job_and_import_metadata_have_the_same_keys_and_read_back(tmp_path):
    base = _base(tmp_path, **{"tokenizer.json": "{}", "chat_template.jinja": "{{ messages }}"})
    stamp = base_model_stamp(base)
    assert stamp.tokenizer_sha256 == hashlib.sha256(b"{}").hexdigest()
    assert stamp.chat_template_sha256 == hashlib.sha256(b"{{ messages }}").hexdigest()
    job = AdapterMetadata(source="job", job_id="ftjob-1", base_model=stamp, method="lora", rank=8, alpha=16,
                          trainable_params=10, total_params=110, base_params=100, quantization={"bits": 4},
                          training_config={"seed": 1}, metrics={"train_loss": float("nan")}, probe={"logits": [1.0]},
                          datasets={"training_file": DatasetStamp(id="file-1", sha256="c" * 64),
                                    "validation_file": None})
    imported = AdapterMetadata(source="import", base_model=stamp, method="lora", rank=8, alpha=16,
                               trainable_params=10, base_params=100)
    for metadata in (job, imported):
        folder = _adapter_folder(tmp_path / metadata.source)
        (folder / METADATA_FILE).write_text("stale")  # never hashes itself
        written = write_adapter_metadata(folder, metadata)
        on_disk = json.loads((folder / METADATA_FILE).read_text())
        assert set(on_disk) == KEYS
        assert on_disk["files"] == {"adapter_config.json": sha256_file(folder / "adapter_config.json"),
                                    "adapter_model.safetensors": sha256_file(folder / "adapter_model.safetensors")}
        assert on_disk["format"] == "patchbay.adapter/v1" and on_disk["source"] == metadata.source
        back = read_adapter_metadata(folder)
        assert back.model_dump(exclude={"metrics"}) == written.model_dump(exclude={"metrics"})
    assert on_disk["job_id"] is None and on_disk["probe"] is None and on_disk["datasets"] == {}


def test_chat_template_comes_from_tokenizer_config_when_there_is_no_jinja_file(tmp_path):
    base = _base(tmp_path, **{"tokenizer_config.json": json.dumps({"chat_template": "T"})})
    stamp = base_model_stamp(base)
    assert stamp.tokenizer_sha256 is None and stamp.chat_template_sha256 == hashlib.sha256(b"T").hexdigest()
    assert base_model_stamp(_base(tmp_path / "bare")).chat_template_sha256 is None


def test_files_written_by_older_versions_still_read(tmp_path):
    folder = _adapter_folder(tmp_path)
    old_import = {"format": "patchbay.adapter/v1", "source": "import", "base_model": {"id": "b", "sha256": None},
                  "method": "lora", "rank": 8, "alpha": 16, "files": {}, "trainable_params": 3}
    (folder / METADATA_FILE).write_text(json.dumps(old_import))
    assert read_adapter_metadata(folder).rank == 8
    old_job = {"format": "patchbay.adapter/v1", "job_id": "ftjob-1", "base_model": {"id": "b", "sha256": None},
               "trainable_params": 3, "files": {}, "future_key": 1}
    (folder / METADATA_FILE).write_text(json.dumps(old_job))
    back = read_adapter_metadata(folder)
    assert (back.source, back.method, back.model_extra) == ("job", None, {"future_key": 1})
