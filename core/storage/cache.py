"""A local cache of objects fetched from remote storage: verified by sha256, bounded in bytes, LRU beyond.

Each object is one file named after a digest of its key; a download is staged under a name of its own and
renamed into place, so processes sharing the folder never read half a file. Use refreshes a file's mtime,
and the least recently used files are removed once the folder holds more than `max_bytes`.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from core.storage.base import StorageError, sha256_file


class DownloadCache:
    """Cached downloads in `folder`, at most `max_bytes` in all (the newest entry is always kept)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes

    def entry(self, key: str) -> Path:
        """Where the cached copy of `key` lives."""
        return self.folder / hashlib.sha256(key.encode()).hexdigest()

    def get(self, key: str, download: Callable[[Path], None], sha256: str | None = None) -> Path:
        """The cached copy of `key`, calling `download(path)` to fetch it when missing or failing its sha256."""
        target = self.entry(key)
        if target.is_file() and (sha256 is None or sha256_file(target) == sha256):
            os.utime(target)
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f"{target.name}.partial-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            download(staging)
            if sha256 is not None and (actual := sha256_file(staging)) != sha256:
                raise StorageError(f"object {key!r} failed its sha256 check (expected {sha256[:12]}…, "
                                   f"got {actual[:12]}…)")
            staging.replace(target)
        finally:
            staging.unlink(missing_ok=True)
        self.evict(keep=target)
        return target

    def evict(self, keep: Path | None = None) -> int:
        """Remove least recently used entries until the folder fits `max_bytes`; returns how many went."""
        entries = []
        for path in self.folder.iterdir() if self.folder.is_dir() else []:
            if ".partial-" in path.name or path == keep:
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries) + (keep.stat().st_size if keep and keep.exists() else 0)
        removed = 0
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed
