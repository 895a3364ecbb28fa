"""Safe archive handling for adapter import and download."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path, PurePosixPath


class ArchiveError(ValueError):
    """An archive that is unreadable or unsafe to unpack."""


def _safe_member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")) or "\\" in name:
        raise ArchiveError(f"archive path '{name}' escapes the adapter folder")
    return path


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack a .tar.gz/.tar or .zip into `dest`, refusing links, escaping paths and oversize content.

    Returns the folder that holds adapter_config.json (the root or a single top folder).
    """
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                path = _safe_member_path(info.filename)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise ArchiveError(f"archive entry '{info.filename}' is a link")
                if info.is_dir():
                    continue
                total += info.file_size
                if total > max_bytes:
                    raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
                target = dest.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    out.write(src.read())
    else:
        try:
            tf = tarfile.open(archive, mode="r:*")
        except tarfile.TarError:
            raise ArchiveError("the upload is neither a tar.gz nor a zip archive") from None
        with tf:
            for member in tf.getmembers():
                path = _safe_member_path(member.name)
                if member.issym() or member.islnk():
                    raise ArchiveError(f"archive entry '{member.name}' is a link")
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ArchiveError(f"archive entry '{member.name}' is not a regular file")
                total += member.size
                if total > max_bytes:
                    raise ArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
                target = dest.joinpath(*path.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with tf.extractfile(member) as src, open(target, "wb") as out:
                    out.write(src.read())
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
