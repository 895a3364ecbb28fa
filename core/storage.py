"""Object storage for datasets, checkpoints and adapters.

Keys are built from our own ids (never from user-supplied names). One interface;
the local-directory backend is the embedded default and works on any shared volume.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core.settings import get_settings

CHUNK_BYTES = 1024 * 1024


class StorageError(RuntimeError):
    """A storage key is invalid or missing."""


class LocalStorage:
    """Storage in a local (or shared, mounted) directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        """The local path of `key`; refuses keys that escape the root."""
        target = (self.root / key).resolve()
        if target != self.root and self.root not in target.parents:
            raise StorageError(f"invalid storage key {key!r}")
        return target

    def open_write(self, key: str) -> BinaryIO:
        """Open `key` for writing, creating parent folders."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        return open(target, "wb")

    def open_read(self, key: str) -> BinaryIO:
        """Open `key` for reading."""
        target = self.path(key)
        if not target.is_file():
            raise StorageError(f"no object at {key!r}")
        return open(target, "rb")

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """Stream the object in chunks."""
        with self.open_read(key) as fh:
            while chunk := fh.read(CHUNK_BYTES):
                yield chunk

    def exists(self, key: str) -> bool:
        """Whether `key` holds a file or folder."""
        return self.path(key).exists()

    def put_dir(self, key: str, source: Path) -> None:
        """Copy a local folder to `key`, replacing it atomically enough for readers."""
        target = self.path(key)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(source, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)

    def get_dir(self, key: str, dest: Path) -> Path:
        """Copy the folder at `key` to `dest` and return `dest`."""
        source = self.path(key)
        if not source.is_dir():
            raise StorageError(f"no folder at {key!r}")
        shutil.copytree(source, dest, dirs_exist_ok=True)
        return dest

    def rename(self, source: str, target: str) -> None:
        """Move the object at `source` to `target` (atomic on one filesystem): how a temporary is committed."""
        destination = self.path(target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        self.path(source).replace(destination)

    def children(self, prefix: str) -> list[tuple[str, float]]:
        """The keys directly under `prefix`, each with its last modification time (unix seconds)."""
        folder = self.path(prefix)
        if not folder.is_dir():
            return []
        found = []
        for child in folder.iterdir():
            try:
                found.append((f"{prefix.rstrip('/')}/{child.name}", newest_mtime(child)))
            except FileNotFoundError:  # removed while we looked
                continue
        return found

    def delete(self, key: str) -> None:
        """Remove a file or folder; missing keys are ignored."""
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


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


def get_storage() -> LocalStorage:
    """The configured storage backend."""
    return LocalStorage(get_settings().resolved_storage_dir)


def folder_sha256(folder: Path, pattern: str = "*") -> tuple[str, int]:
    """A digest over the name and sha256 of every file matching `pattern`, and their byte count."""
    digest = hashlib.sha256()
    size = 0
    for path in sorted(p for p in folder.glob(pattern) if p.is_file()):
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
        size += path.stat().st_size
    return digest.hexdigest(), size
