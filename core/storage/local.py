"""Storage in a local (or shared, mounted) directory: the embedded default."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from core.storage.base import CHUNK_BYTES, StorageError, StorageUnavailable, newest_mtime


class LocalStorage:
    """Storage in a local (or shared, mounted) directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

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
        """Stream the object in chunks (opened at once)."""
        return _chunks(self.open_read(key))

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
        shutil.copytree(self.local_dir(key, dest.parent), dest, dirs_exist_ok=True)
        return dest

    def local_dir(self, key: str, scratch: Path) -> Path:
        """The folder itself (`scratch` is not needed)."""
        source = self.path(key)
        if not source.is_dir():
            raise StorageError(f"no folder at {key!r}")
        return source

    def local_copy(self, key: str, sha256: str | None = None) -> Path:
        """The file itself."""
        target = self.path(key)
        if not target.is_file():
            raise StorageError(f"no object at {key!r}")
        return target

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

    def check(self) -> None:
        """The root must be a folder we can write to."""
        try:
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise StorageUnavailable(f"Storage folder {self.root} is not writable: {exc.strerror or exc}") from exc
        if not os.access(self.root, os.R_OK):
            raise StorageUnavailable(f"Storage folder {self.root} is not readable")


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk
