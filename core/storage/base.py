"""The one storage interface every backend implements, its errors, and digest helpers shared by all."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from core.stores import StoreUnavailable

CHUNK_BYTES = 1024 * 1024
DIR_MARKER = ".patchbay-complete"
"""Written last into a stored folder on object storage: readers see the folder only once it is there."""


class StorageError(RuntimeError):
    """A storage key is invalid or missing."""


class StorageUnavailable(StoreUnavailable):
    """The object store cannot be reached, refuses our credentials, or lacks its bucket (clients hear 503)."""


class Storage(Protocol):
    """What callers may do with stored objects (files) and folders (checkpoints, adapters), by key."""

    def open_write(self, key: str) -> BinaryIO:
        """A writable stream to `key`; closing it commits the object, `abort()` (where present) drops it."""

    def open_read(self, key: str) -> BinaryIO:
        """A buffered readable stream of the object (supports `readline(limit)`)."""

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The object in chunks; opened at once, so a missing object raises here, not mid-stream."""

    def exists(self, key: str) -> bool:
        """Whether `key` holds an object or a complete folder."""

    def put_dir(self, key: str, source: Path) -> None:
        """Store a local folder at `key`; readers see the old folder, nothing, or all of the new one."""

    def get_dir(self, key: str, dest: Path) -> Path:
        """Copy the folder at `key` to `dest` and return `dest`."""

    def local_dir(self, key: str, scratch: Path) -> Path:
        """The folder at `key` on local disk: itself where storage is local, else a copy under `scratch`."""

    def local_copy(self, key: str, sha256: str | None = None) -> Path:
        """The object at `key` as a local file: itself where storage is local, else a cached, verified download."""

    def rename(self, source: str, target: str) -> None:
        """Move the object or folder at `source` to `target`: how a temporary is committed."""

    def children(self, prefix: str) -> list[tuple[str, float]]:
        """The keys directly under `prefix`, each with its newest modification time (unix seconds)."""

    def delete(self, key: str) -> None:
        """Remove an object or a folder; missing keys are ignored."""

    def check(self) -> None:
        """Raise `StorageUnavailable` with the reason when the store cannot be used right now."""


def checked_key(key: str) -> str:
    """`key` if it is a relative key of plain segments; refuses '..', empty segments and our folder marker."""
    parts = key.split("/")
    if not key or any(p in ("", ".", "..", DIR_MARKER) for p in parts) or "\\" in key:
        raise StorageError(f"invalid storage key {key!r}")
    return key


def newest_mtime(path: Path) -> float:
    """The latest modification time of a file, or of anything inside a folder."""
    if path.is_file():
        return path.stat().st_mtime
    return max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.rglob("*"))])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(folder: Path, pattern: str = "*") -> tuple[str, int]:
    """A digest over the name and sha256 of every file matching `pattern`, and their byte count."""
    digest = hashlib.sha256()
    size = 0
    for path in sorted(p for p in folder.glob(pattern) if p.is_file()):
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
        size += path.stat().st_size
    return digest.hexdigest(), size
