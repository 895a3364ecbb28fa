"""Safe archive handling for adapter import and download."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO


class ArchiveError(ValueError):
    """An archive that is unreadable or unsafe to unpack."""


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or "\\" in name:
        raise ArchiveError(f"archive path '{name}' escapes the adapter folder")
    return path


@dataclass
class _Member:
    """One archive entry, whichever the archive format."""

    name: str
    size: int
    is_link: bool
    is_dir: bool
    is_file: bool
    open: Callable[[], IO[bytes]]


def _members(archive: Path, stack: ExitStack) -> list[_Member]:
    if zipfile.is_zipfile(archive):
        zf = stack.enter_context(zipfile.ZipFile(archive))
        return [_Member(info.filename, info.file_size, (info.external_attr >> 16) & 0o170000 == 0o120000,
                        info.is_dir(), not info.is_dir(), lambda info=info: zf.open(info))
                for info in zf.infolist()]
    try:
        tf = stack.enter_context(tarfile.open(archive, mode="r:*"))
    except tarfile.TarError:
        raise ArchiveError("the upload is neither a tar.gz nor a zip archive") from None
    return [_Member(m.name, m.size, m.issym() or m.islnk(), m.isdir(), m.isfile(),
                    lambda m=m: tf.extractfile(m)) for m in tf.getmembers()]


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack a .tar.gz/.tar or .zip into `dest`, refusing links, escaping paths and oversize content.

    Returns the folder that holds adapter_config.json (the root or a single top folder).
    """
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    with ExitStack() as stack:
        for member in _members(archive, stack):
            path = _safe_member_path(member.name)
            if member.is_link:
                raise ArchiveError(f"archive entry '{member.name}' is a link")
            if member.is_dir:
                continue
            if not member.is_file:
                raise ArchiveError(f"archive entry '{member.name}' is not a regular file")
            total += member.size
            if total > max_bytes:
                raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
            target = dest.joinpath(*path.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with member.open() as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    configs = sorted(dest.rglob("adapter_config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise ArchiveError("the archive holds no adapter_config.json")
    return configs[0].parent


def write_tar_gz(folder: Path, target: Path, arcname: str) -> Path:
    """Pack a folder's files into `target` as tar.gz under `arcname/`."""
    with tarfile.open(target, "w:gz") as tf:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tf.add(path, arcname=f"{arcname}/{path.name}")
    return target
