"""Object storage for datasets, checkpoints and adapters.

Keys are built from our own ids (never from user-supplied names). One interface (`Storage`), two
backends: a local directory (`file://`, the embedded default, works on any shared volume) and an
S3-compatible bucket (`s3://bucket/prefix`). `PATCHBAY_STORAGE_URL` picks one.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlparse

from core.settings import Settings, get_settings
from core.storage.base import (
    CHUNK_BYTES,
    Storage,
    StorageError,
    StorageUnavailable,
    folder_sha256,
    newest_mtime,
    sha256_file,
)
from core.storage.local import LocalStorage

__all__ = ["CHUNK_BYTES", "LocalStorage", "Storage", "StorageError", "StorageUnavailable", "folder_sha256",
           "get_storage", "newest_mtime", "report_storage", "sha256_file", "storage_for"]


def storage_for(settings: Settings) -> Storage:
    """The backend `settings` name: `file:///path`, `s3://bucket/prefix`, or the data dir's `storage/`."""
    url = settings.storage_url
    if not url:
        return LocalStorage(settings.resolved_storage_dir)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3" and parsed.netloc:
        return _s3(parsed.netloc, parsed.path.strip("/"), settings.s3_endpoint_url,
                   str(settings.data_dir.resolve() / "cache" / "storage"), settings.storage_cache_bytes)
    raise ValueError(f"PATCHBAY_STORAGE_URL must be file:///path or s3://bucket/prefix, not {url!r}")


@lru_cache(maxsize=8)
def _s3(bucket: str, prefix: str, endpoint_url: str | None, cache_dir: str, cache_bytes: int) -> Storage:
    from core.storage.cache import DownloadCache
    from core.storage.s3 import S3Storage

    return S3Storage(bucket, prefix, endpoint_url, DownloadCache(Path(cache_dir), cache_bytes))


def get_storage() -> Storage:
    """The configured storage backend."""
    return storage_for(get_settings())


def report_storage() -> bool:
    """Check the configured storage at start; log a clear error when it cannot be used (`/readyz` says why)."""
    import logging

    log = logging.getLogger("patchbay.storage")
    try:
        storage = get_storage()
        storage.check()
    except (StorageUnavailable, ValueError) as exc:
        log.error("storage is not usable: %s", exc)
        return False
    log.info("storage: %r", storage)
    return True
