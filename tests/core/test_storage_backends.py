"""The storage contract, on the local backend and on a real S3-compatible server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from core.storage import LocalStorage, StorageError, get_storage
from core.storage.base import DIR_MARKER
from core.storage.cache import DownloadCache
from core.storage.s3 import S3Storage

PART = 5 * 1024 * 1024  # S3's smallest part


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path):
    """Each backend, empty."""
    if request.param == "local":
        return LocalStorage(tmp_path / "storage")
    env = request.getfixturevalue("s3_env")
    bucket, prefix = env["PATCHBAY_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    return S3Storage(bucket, prefix, env["PATCHBAY_S3_ENDPOINT_URL"], DownloadCache(tmp_path / "cache", 10 * 2**20),
                     part_bytes=PART)


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_streamed_write_of_several_parts_reads_back(storage) -> None:
    data = os.urandom(2 * PART + 12345)
    with storage.open_write("files/big.bin") as out:
        for start in range(0, len(data), 1024 * 1024):
            out.write(data[start:start + 1024 * 1024])
    assert storage.exists("files/big.bin")
    assert b"".join(storage.iter_bytes("files/big.bin")) == data
    with storage.open_read("files/big.bin") as fh:
        assert fh.readline(10) == data[:10] if b"\n" not in data[:10] else True
    copy = storage.local_copy("files/big.bin", hashlib.sha256(data).hexdigest())
    assert copy.read_bytes() == data


def test_a_failed_write_leaves_nothing(storage) -> None:
    with pytest.raises(RuntimeError):
        with storage.open_write("files/half.bin") as out:
            out.write(os.urandom(PART + 10))
            raise RuntimeError("client went away")
    if isinstance(storage, S3Storage):
        assert not storage.exists("files/half.bin")
        uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket).get("Uploads", [])
        assert not [u for u in uploads if u["Key"].endswith("half.bin")]


def test_missing_keys_and_bad_keys(storage) -> None:
    assert not storage.exists("files/nothing")
    with pytest.raises(StorageError):
        storage.open_read("files/nothing")
    with pytest.raises(StorageError):
        storage.iter_bytes("files/nothing")
    with pytest.raises(StorageError):
        storage.get_dir("adapters/nothing", Path("/nonexistent"))
    with pytest.raises(StorageError):
        storage.open_write("../escape")
    storage.delete("files/nothing")  # ignored


def test_children_rename_and_delete_prefix(storage, tmp_path: Path) -> None:
    for name in ("a", "b"):
        with storage.open_write(f"tmp/one/{name}.jsonl") as out:
            out.write(b"{}\n")
    storage.put_dir("checkpoints/job/step-1", _folder(tmp_path / "ck", {"w.bin": b"w", "sub/x": b"x"}))
    assert sorted(k for k, _ in storage.children("tmp/one")) == ["tmp/one/a.jsonl", "tmp/one/b.jsonl"]
    assert [k for k, _ in storage.children("checkpoints")] == ["checkpoints/job"]
    assert [k for k, _ in storage.children("checkpoints/job")] == ["checkpoints/job/step-1"]
    assert all(mtime > 0 for _, mtime in storage.children("tmp"))

    storage.rename("tmp/one/a.jsonl", "files/a.jsonl")
    assert storage.exists("files/a.jsonl") and not storage.exists("tmp/one/a.jsonl")
    storage.rename("checkpoints/job/step-1", "adapters/ad")
    assert not storage.exists("checkpoints/job/step-1")
    got = storage.get_dir("adapters/ad", tmp_path / "got")
    assert (got / "w.bin").read_bytes() == b"w" and (got / "sub" / "x").read_bytes() == b"x"

    storage.delete("tmp")
    assert storage.children("tmp") == [] and not storage.exists("tmp/one/b.jsonl")
    storage.delete("adapters/ad")
    assert not storage.exists("adapters/ad") and storage.children("adapters") == []


def test_local_dir_gives_the_folder(storage, tmp_path: Path) -> None:
    storage.put_dir("adapters/x", _folder(tmp_path / "src", {"adapter_config.json": b"{}"}))
    folder = storage.local_dir("adapters/x", tmp_path / "scratch")
    assert (folder / "adapter_config.json").read_bytes() == b"{}"
    assert not (folder / DIR_MARKER).exists()


def test_put_dir_is_atomic_for_readers(storage, tmp_path: Path) -> None:
    """While a many-file folder uploads, a reader sees no folder or all of it, never part."""
    files = {f"shard-{i:03d}.bin": os.urandom(2048) for i in range(40)}
    source = _folder(tmp_path / "ck", files)
    seen: list[int] = []
    done = threading.Event()

    def read() -> None:
        n, finished = 0, False
        while not finished:
            finished, n = done.is_set(), n + 1  # one more look once the upload is done
            if storage.exists("checkpoints/j/step-2"):
                try:
                    seen.append(len(list(storage.get_dir("checkpoints/j/step-2", tmp_path / f"r{n}").iterdir())))
                except StorageError:  # removed between the two calls: fine, never partial
                    pass

    reader = threading.Thread(target=read)
    reader.start()
    storage.put_dir("checkpoints/j/step-2", source)
    done.set()
    reader.join()
    assert seen and set(seen) == {len(files)}


def test_s3_half_uploaded_folder_is_invisible(s3_env, tmp_path: Path) -> None:
    bucket, prefix = s3_env["PATCHBAY_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    storage = S3Storage(bucket, prefix, s3_env["PATCHBAY_S3_ENDPOINT_URL"], DownloadCache(tmp_path, 2**20))
    storage.client.put_object(Bucket=bucket, Key=f"{prefix}/checkpoints/j/step-3/weights.bin", Body=b"half")
    assert not storage.exists("checkpoints/j/step-3")
    with pytest.raises(StorageError):
        storage.get_dir("checkpoints/j/step-3", tmp_path / "x")
    assert [k for k, _ in storage.children("checkpoints/j")] == ["checkpoints/j/step-3"]  # the sweep sees it


def test_s3_cache_is_lru_bounded_and_checked(s3_env, tmp_path: Path) -> None:
    bucket, prefix = s3_env["PATCHBAY_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    cache = DownloadCache(tmp_path / "cache", 3 * 1000)
    storage = S3Storage(bucket, prefix, s3_env["PATCHBAY_S3_ENDPOINT_URL"], cache)
    blobs = {f"files/{i}": os.urandom(1000) for i in range(5)}
    for key, data in blobs.items():
        with storage.open_write(key) as out:
            out.write(data)
    for key in ["files/0", "files/1", "files/2", "files/0", "files/3"]:  # 1 is least recently used at the end
        assert storage.local_copy(key, hashlib.sha256(blobs[key]).hexdigest()).read_bytes() == blobs[key]
    assert sum(p.stat().st_size for p in cache.folder.iterdir()) <= 3000
    assert not cache.entry(f"{bucket}/{prefix}/files/1").exists()
    assert cache.entry(f"{bucket}/{prefix}/files/0").exists() and cache.entry(f"{bucket}/{prefix}/files/3").exists()

    cache.entry(f"{bucket}/{prefix}/files/3").write_bytes(b"corrupted")  # a damaged copy is fetched again
    assert storage.local_copy("files/3", hashlib.sha256(blobs["files/3"]).hexdigest()).read_bytes() == blobs["files/3"]
    with pytest.raises(StorageError, match="sha256"):
        storage.local_copy("files/4", "0" * 64)
    assert not cache.entry(f"{bucket}/{prefix}/files/4").exists()


def test_storage_url_picks_the_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from core.settings import get_settings

    monkeypatch.setenv("PATCHBAY_DATA_DIR", str(tmp_path))
    for value, kind, where in ((None, LocalStorage, tmp_path / "storage"),
                               (f"file://{tmp_path}/elsewhere", LocalStorage, tmp_path / "elsewhere")):
        if value:
            monkeypatch.setenv("PATCHBAY_STORAGE_URL", value)
        get_settings.cache_clear()
        backend = get_storage()
        assert isinstance(backend, kind) and backend.root == where.resolve()
    monkeypatch.setenv("PATCHBAY_STORAGE_URL", "s3://bucket/some/prefix")
    get_settings.cache_clear()
    backend = get_storage()
    assert isinstance(backend, S3Storage) and (backend.bucket, backend.prefix) == ("bucket", "some/prefix")
    monkeypatch.setenv("PATCHBAY_STORAGE_URL", "ftp://nope")
    get_settings.cache_clear()
    with pytest.raises(ValueError, match="s3://bucket/prefix"):  # refused as the settings load
        get_storage()
    get_settings.cache_clear()


def test_storage_dir_still_works(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from core.settings import get_settings

    monkeypatch.delenv("PATCHBAY_STORAGE_URL", raising=False)
    monkeypatch.setenv("PATCHBAY_STORAGE_DIR", str(tmp_path / "shared"))
    get_settings.cache_clear()
    assert get_storage().root == (tmp_path / "shared").resolve()
    get_settings.cache_clear()
