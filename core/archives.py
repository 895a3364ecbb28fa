"""Safe archive handling for adapter import (tar, tar.gz/.bz2/.xz, zip) and download.

Extraction keeps only the adapter files (KEPT_FILES) of the folder holding adapter_config.json, which must be the
archive root or one top folder. Other regular files are skipped without being written, but their declared size
counts against the limit. Links, devices, fifos, unsafe names, duplicates and pickle files are refused.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO

from core.adapter_check import PICKLE_SUFFIXES, AdapterCheckError
from core.safetensors_header import shown

CONFIG_FILE = "adapter_config.json"
KEPT_FILES = (CONFIG_FILE, "adapter_model.safetensors", "README.md")
MAX_MEMBERS = 64
MAX_NAME_BYTES = 1024
MAX_COMPONENT_BYTES = 255
MAX_EXTENDED_HEADER_BYTES = 64 * 1024  # one pax or GNU long-name record
# Tar headers, extended records and padding a stream may hold on top of its member data.
TAR_OVERHEAD_BYTES = MAX_MEMBERS * (2 * (MAX_EXTENDED_HEADER_BYTES + 512) + 1024) + 2 * tarfile.RECORDSIZE
MAX_ZIP_DIRECTORY_BYTES = MAX_MEMBERS * (46 + MAX_NAME_BYTES + 1024)
ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
COPY_CHUNK_BYTES = 256 * 1024

_COMPRESSIONS = {
    b"\x1f\x8b": ("gz", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),
    b"BZh": ("bz2", bz2.BZ2File),
    b"\xfd7zXZ\x00": ("xz", lzma.LZMAFile),
}
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")
_EXTENDED_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                          tarfile.GNUTYPE_LONGLINK)
# What the stdlib decoders raise on malformed input (RecursionError is a RuntimeError: chained pax headers).
_DECODING_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, UnicodeError,
                    OverflowError, struct.error, ValueError, NotImplementedError, RuntimeError)


class ArchiveError(ValueError):
    """An archive that is unreadable or unsafe to unpack."""


@contextmanager
def _decoding(what: str) -> Iterator[None]:
    """Turn any exception a decoder raises on malformed input into an ArchiveError naming `what`."""
    try:
        yield
    except (ArchiveError, AdapterCheckError):
        raise
    except _DECODING_ERRORS as exc:
        reason = str(exc)[:200] or type(exc).__name__
        raise ArchiveError(f"{what} is unreadable ({reason})") from None


class _Unpacker:
    """The refusal rules and the bookkeeping shared by the tar and zip readers."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.members = self.declared = self.copied = 0
        self.seen: set[tuple[str, ...]] = set()
        self.files: list[tuple[str, ...]] = []
        self.staged: list[tuple[tuple[str, ...], Path]] = []

    def admit(self, name: str, kind: str, size: int) -> tuple[str, ...] | None:
        """Screen one member from its header; the path parts of a file worth extracting, else None."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise ArchiveError(f"the archive has more than {MAX_MEMBERS} members")
        parts = _member_parts(name)
        if kind in ("symlink", "hardlink"):
            raise ArchiveError(f"archive entry {shown(name)} is a {kind}; links are refused")
        if kind not in ("file", "dir"):
            raise ArchiveError(f"archive entry {shown(name)} is a {kind}, not a regular file or folder")
        if not parts:
            if kind == "dir":
                return None
            raise ArchiveError(f"archive entry {shown(name)} has no file name")
        if parts in self.seen:
            raise ArchiveError(f"archive entry {shown(name)} appears twice (duplicate name)")
        self.seen.add(parts)
        if size < 0:
            raise ArchiveError(f"archive entry {shown(name)} declares a negative size")
        self.declared += size
        if self.declared > self.max_bytes:
            raise ArchiveError(f"the archive declares more than the limit of {self.max_bytes} bytes "
                               f"(reached at member {shown(name)}, {size} bytes)")
        if kind == "dir":
            return None
        if PurePosixPath(parts[-1]).suffix.lower() in PICKLE_SUFFIXES:
            # Reported as the adapter `format` check, like a pickle file found in a folder.
            raise AdapterCheckError("format", f"pickle files are refused ({shown(name)}); only safetensors is accepted")
        self.files.append(parts)
        return parts if len(parts) <= 2 and parts[-1] in KEPT_FILES else None

    def stage(self, parts: tuple[str, ...]) -> Path:
        """The staging file one kept member is written to (renamed by `finish`)."""
        staged = self.folder / f".member-{len(self.staged)}"
        self.staged.append((parts, staged))
        return staged

    def write(self, parts: tuple[str, ...], name: str, open_member: Callable[[], IO[bytes]]) -> None:
        """Copy one member's data to a staging file, counting the real bytes against the limit (zip sizes may lie)."""
        staged = self.stage(parts)
        with _decoding(f"archive entry {shown(name)}"):
            source = open_member()
        with source, open(staged, "wb") as out:
            while True:
                with _decoding(f"archive entry {shown(name)}"):
                    chunk = source.read(COPY_CHUNK_BYTES)
                if not chunk:
                    break
                self.copied += len(chunk)
                if self.copied > self.max_bytes:
                    raise ArchiveError(f"the archive unpacks to more than the limit of {self.max_bytes} bytes "
                                       f"(reached in member {shown(name)})")
                out.write(chunk)

    def finish(self) -> Path:
        """Keep the staged files of the adapter folder under their real names; drop the others."""
        configs = [parts for parts in self.files if parts[-1] == CONFIG_FILE]
        if not configs:
            raise ArchiveError(f"the archive holds no {CONFIG_FILE}")
        if len(configs) > 1:
            listed = ", ".join(shown("/".join(parts)) for parts in configs[:4])
            raise ArchiveError(f"the archive holds more than one {CONFIG_FILE} ({listed})")
        home = configs[0][:-1]
        if len(home) > 1:
            raise ArchiveError(f"{CONFIG_FILE} must sit at the archive root or in one top folder, "
                               f"not in {shown('/'.join(home))}")
        for parts, staged in self.staged:
            if parts[:-1] == home:
                staged.rename(self.folder / parts[-1])
            else:
                staged.unlink()
        return self.folder


def _member_parts(name: str) -> tuple[str, ...]:
    """The path parts of a member name (`.` and empty parts dropped), refusing anything unsafe."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ArchiveError(f"archive entry {shown(name)} has a name that is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise ArchiveError(f"archive entry {shown(name)} has a name longer than {MAX_NAME_BYTES} bytes")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in name):
        raise ArchiveError(f"archive entry {shown(name)} has a NUL or control character in its name")
    if "\\" in name:
        raise ArchiveError(f"archive path {shown(name)} has a backslash; it could escape the adapter folder")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/") or ".." in parts:
        raise ArchiveError(f"archive path {shown(name)} escapes the adapter folder")
    if any(len(part.encode("utf-8")) > MAX_COMPONENT_BYTES for part in parts):
        raise ArchiveError(f"archive entry {shown(name)} has a path part longer than {MAX_COMPONENT_BYTES} bytes")
    return parts


class _GuardedTarInfo(tarfile.TarInfo):
    """Refuses negative sizes and oversized pax / GNU long-name records before tarfile reads them into memory."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        """Parse one 512-byte header block, as TarInfo does, then screen its size."""
        info = super().frombuf(buf, encoding, errors)
        if info.size < 0:
            raise ArchiveError(f"archive entry {shown(info.name)} declares a negative size")
        if info.type in _EXTENDED_HEADER_TYPES and info.size > MAX_EXTENDED_HEADER_BYTES:
            raise ArchiveError(f"a tar extended header declares {info.size} bytes "
                               f"(the limit is {MAX_EXTENDED_HEADER_BYTES})")
        return info


class _CappedReader:
    """A read-only stream that refuses to yield more than `cap` bytes in all (bounds what a decompressor emits)."""

    def __init__(self, source: IO[bytes], cap: int) -> None:
        self.source, self.cap, self.total = source, cap, 0

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes; ArchiveError once the stream passes the cap."""
        room = self.cap - self.total + 1
        data = self.source.read(room if size is None or size < 0 else min(size, room))
        self.total += len(data)
        if self.total > self.cap:
            raise ArchiveError(f"the archive decompresses to more than {self.cap} bytes")
        return data


def _tar_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isdir():
        return "dir"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    if member.issparse():
        return "sparse file"
    return "file" if member.isreg() else f"special entry (type {member.type!r})"


def _tar_filter(unpacker: _Unpacker):
    """An extraction filter: our rules (names, kinds, limits, kept files), then tarfile's own `data` filter."""

    def screen(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
        parts = unpacker.admit(member.name, _tar_kind(member), member.size)
        if parts is None:
            return None  # folders, and files that are not the adapter's: read past, never written
        try:
            member = tarfile.data_filter(member, dest)
        except tarfile.FilterError as exc:
            raise ArchiveError(f"archive entry {shown(member.name)} is refused ({exc})") from None
        return member.replace(name=unpacker.stage(parts).name, deep=False)

    return screen


def _unpack_tar(archive: Path, magic: bytes, unpacker: _Unpacker) -> None:
    compression = next(((kind, opener) for prefix, (kind, opener) in _COMPRESSIONS.items()
                        if magic.startswith(prefix)), None)
    what = f"the {compression[0]}-compressed archive" if compression else "the archive"
    with open(archive, "rb") as raw:
        source = compression[1](raw) if compression else raw
        # Tar members are exactly their declared size, which `admit` has counted; the cap bounds the rest.
        stream = _CappedReader(source, unpacker.max_bytes + TAR_OVERHEAD_BYTES)
        with _decoding(what):
            try:  # opening reads the first header
                tf = tarfile.open(fileobj=stream, mode="r|", tarinfo=_GuardedTarInfo, encoding="utf-8",
                                  errors="surrogateescape", errorlevel=2)
            except tarfile.ReadError as exc:
                if compression:
                    raise ArchiveError(f"{what} does not hold a readable tar archive ({exc})") from None
                raise ArchiveError("the upload is neither a tar (plain, gz, bz2 or xz) nor a zip archive") from None
        with tf, _decoding(what):
            tf.extractall(unpacker.folder, filter=_tar_filter(unpacker))


def _zip_kind(info: zipfile.ZipInfo) -> str:
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        return "symlink"
    if info.orig_filename.endswith("/") or file_type == stat.S_IFDIR:  # ZipInfo.is_dir() fails on an empty name
        return "dir"
    if file_type in (0, stat.S_IFREG):
        return "file"
    if file_type in (stat.S_IFCHR, stat.S_IFBLK):
        return "device"
    return "fifo" if file_type == stat.S_IFIFO else "special entry"


def _refuse_large_zip_directory(archive: Path) -> None:
    """Read the end record first: zipfile would parse a whole oversized central directory before we could count."""
    with open(archive, "rb") as fh:
        size = fh.seek(0, 2)
        fh.seek(max(0, size - 65557))
        tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) - at < 22:
        return  # zipfile reports the missing end record
    _disk_entries, entries, directory_bytes = struct.unpack("<HHI", tail[at + 8:at + 16])
    if MAX_MEMBERS < entries != 0xFFFF:
        raise ArchiveError(f"the archive has more than {MAX_MEMBERS} members ({entries})")
    if MAX_ZIP_DIRECTORY_BYTES < directory_bytes != 0xFFFFFFFF:
        raise ArchiveError(f"the zip central directory is too large ({directory_bytes} bytes; "
                           f"more than {MAX_MEMBERS} members?)")


def _unpack_zip(archive: Path, unpacker: _Unpacker) -> None:
    with _decoding("the zip archive"):
        _refuse_large_zip_directory(archive)
        zf = zipfile.ZipFile(archive)
    with zf:
        wanted = []
        for info in zf.infolist():  # every name is screened before anything is extracted
            parts = unpacker.admit(info.orig_filename, _zip_kind(info), info.file_size)
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive entry {shown(info.orig_filename)} is encrypted")
            if info.compress_type not in ZIP_METHODS:
                raise ArchiveError(f"archive entry {shown(info.orig_filename)} uses an unsupported compression "
                                   f"method ({info.compress_type})")
            if parts is not None:
                wanted.append((parts, info))
        for parts, info in wanted:
            unpacker.write(parts, info.orig_filename, lambda info=info: zf.open(info))


def extract_archive(archive: Path, dest: Path, max_bytes: int) -> Path:
    """Unpack the adapter files of a tar (plain, gz, bz2, xz) or zip into a new folder `dest/adapter`; return it.

    The folder holds only KEPT_FILES. Raises ArchiveError for an unreadable or unsafe archive (and
    AdapterCheckError `format` for a pickle file); on any failure nothing is left behind.
    """
    dest.mkdir(parents=True, exist_ok=True)
    folder = dest / "adapter"
    folder.mkdir()
    try:
        with open(archive, "rb") as fh:
            magic = fh.read(8)
        if not magic:
            raise ArchiveError("the upload is empty, neither a tar nor a zip archive")
        unpacker = _Unpacker(folder, max_bytes)
        if magic.startswith(_ZIP_MAGICS):
            _unpack_zip(archive, unpacker)
        else:
            _unpack_tar(archive, magic, unpacker)
        return unpacker.finish()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def write_tar_gz(folder: Path, target: Path, arcname: str) -> Path:
    """Pack a folder's files into `target` as tar.gz under `arcname/`."""
    with tarfile.open(target, "w:gz") as tf:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tf.add(path, arcname=f"{arcname}/{path.name}")
    return target
