"""worker/tasks.py: a job that continues an adapter gets that adapter's stored folder, verified, or a readable error."""

from __future__ import annotations

import pytest

from core.db import session_scope
from core.models import Adapter
from core.registry import retire_version
from core.schemas.training import StartAdapter
from core.storage import folder_sha256, get_storage
from tests.support.registry_rows import add_version, fresh_registry


def _stored_parent(team_id: str, tmp_path) -> StartAdapter:
    folder = tmp_path / "parent"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    row = add_version(team_id, "sft", sha256=folder_sha256(folder)[0], fine_tuned_model="ft:tiny-base:acme:sft:1")
    get_storage().put_dir(row.storage_key, folder)
    return StartAdapter(id=row.id, fine_tuned_model=row.fine_tuned_model, name=row.name, version=row.version,
                        storage_key=row.storage_key, sha256=row.sha256, method=row.method)


def test_the_start_adapter_is_fetched_and_checked_or_the_job_hears_why(tmp_path):
    with fresh_registry(tmp_path / "data") as teams:
        from worker.tasks import _fetch_start_adapter

        start = _stored_parent(teams.acme, tmp_path)
        work = tmp_path / "work"
        work.mkdir()
        fetched = _fetch_start_adapter(start, get_storage(), work)
        assert fetched.parent == work and (fetched / "adapter_model.safetensors").read_bytes() == b"weights"

        with pytest.raises(RuntimeError, match=r"ft:tiny-base:acme:sft:1 .*failed its sha256 check"):
            _fetch_start_adapter(start.model_copy(update={"sha256": "0" * 64}), get_storage(), tmp_path / "w2")
        with pytest.raises(RuntimeError, match="missing from storage"):
            _fetch_start_adapter(start.model_copy(update={"storage_key": "adapters/gone"}), get_storage(), work)
        with session_scope() as session:
            retire_version(session, session.get(Adapter, start.id))
        with pytest.raises(RuntimeError, match=f"{start.id}.*was deleted"):
            _fetch_start_adapter(start, get_storage(), work)
