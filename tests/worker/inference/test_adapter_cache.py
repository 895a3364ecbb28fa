"""The replicas' adapter cache: fetched from S3 (a real SeaweedFS) once, sha256-checked, bounded with LRU."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from core.schemas.inference import AdapterRef
from core.settings import get_settings
from core.storage import folder_sha256, get_storage
from worker.inference.adapter_cache import AdapterFetchError, fetch_adapter


@pytest.fixture
def on_s3(s3_env, monkeypatch, tmp_path):
    """Storage settings pointing at a fresh prefix of the test bucket."""
    monkeypatch.setenv("PATCHBAY_DATA_DIR", str(tmp_path / "data"))
    for name, value in s3_env.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    yield get_storage()
    get_settings.cache_clear()


def _stored(storage, tmp_path: Path, name: str, size: int) -> AdapterRef:
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(size))
    (folder / "adapter_config.json").write_text("{}")
    storage.put_dir(f"adapters/{name}", folder)
    return AdapterRef(id=name, storage_key=f"adapters/{name}", sha256=folder_sha256(folder)[0], base_model="b")


def test_fetched_from_s3_checked_and_bounded(on_s3, tmp_path):
    cache = tmp_path / "cache"
    refs = [_stored(on_s3, tmp_path, f"adapter-{i}", 10_000) for i in range(4)]
    for ref in refs[:3]:
        assert (fetch_adapter(ref, cache, 25_000) / "adapter_model.safetensors").stat().st_size == 10_000
        time.sleep(0.02)  # distinct mtimes: the LRU order
    assert sorted(p.name for p in cache.iterdir()) == ["adapter-1", "adapter-2"]  # adapter-0 was the oldest
    fetch_adapter(refs[1], cache, 25_000)  # a hit refreshes it
    time.sleep(0.02)
    fetch_adapter(refs[3], cache, 25_000, keep={"adapter-2"})  # adapter-2 is in use: spared
    assert sorted(p.name for p in cache.iterdir()) == ["adapter-2", "adapter-3"]

    bad = AdapterRef(id="adapter-x", storage_key="adapters/adapter-3", sha256="0" * 64, base_model="b")
    with pytest.raises(AdapterFetchError, match="sha256"):
        fetch_adapter(bad, cache, 25_000)
    with pytest.raises(AdapterFetchError, match="missing"):
        fetch_adapter(AdapterRef(id="gone", storage_key="adapters/gone", sha256="0" * 64, base_model="b"), cache)
