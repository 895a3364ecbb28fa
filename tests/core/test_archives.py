"""Safe unpacking of uploaded adapter archives: what is kept, skipped and refused, and how fast bombs are refused."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import random
import shutil
import stat
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from core.adapter_check import AdapterCheckError
from core.archives import MAX_MEMBERS, ArchiveError, _Unpacker, extract_archive, write_tar_gz

ADAPTER = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"\x08" + bytes(300),
           "README.md": b"# notes\n"}
LIMIT = 1 << 20


def tar_bytes(members: dict[str, bytes], *, compression: str = "gz", extra: list[tarfile.TarInfo] = ()) -> bytes:
    """A tar of regular members (name -> data), then `extra` data-less members, compressed as asked."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra:
            tf.addfile(info)
    raw = buffer.getvalue()
    return {"": raw, "gz": gzip.compress(raw, mtime=0), "bz2": bz2.compress(raw), "xz": lzma.compress(raw)}[compression]


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def under(prefix: str, members: dict[str, bytes] = ADAPTER) -> dict[str, bytes]:
    return {prefix + name: data for name, data in members.items()}


def extract(tmp_path: Path, data: bytes, max_bytes: int = LIMIT) -> Path:
    """Unpack `data` into a fresh `tmp_path/dest`."""
    shutil.rmtree(tmp_path / "dest", ignore_errors=True)
    archive = tmp_path / "upload"
    archive.write_bytes(data)
    return extract_archive(archive, tmp_path / "dest", max_bytes)


def refusal(tmp_path: Path, data: bytes, max_bytes: int = LIMIT) -> str:
    """The ArchiveError message for `data`, after checking that nothing was left under dest."""
    with pytest.raises(ArchiveError) as caught:
        extract(tmp_path, data, max_bytes)
    assert list((tmp_path / "dest").rglob("*")) == []
    return str(caught.value)


def contents(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
@pytest.mark.parametrize("prefix", ["", "adapter/", "./", "./my-adapter/"])
def test_tar_flavours_and_layouts_unpack_the_kept_files(tmp_path, compression, prefix):
    folder = extract(tmp_path, tar_bytes(under(prefix), compression=compression))
    assert folder == tmp_path / "dest" / "adapter"
    assert contents(folder) == ADAPTER


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_methods_unpack_the_kept_files(tmp_path, method):
    assert contents(extract(tmp_path, zip_bytes(under("adapter/"), method))) == ADAPTER


def test_unknown_files_and_other_folders_are_skipped_not_written(tmp_path):
    members = {"README.md": b"root readme, not the adapter's", "notes/log.txt": b"x" * 1000, "adapter/": b"",
               **under("adapter/", {k: v for k, v in ADAPTER.items() if k != "README.md"}),
               "adapter/training_args.json": b"{}", "adapter/sub/README.md": b"deeper"}
    for data in (tar_bytes({k: v for k, v in members.items() if k != "adapter/"}), zip_bytes(members)):
        folder = extract(tmp_path, data)
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
        assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["adapter"]


def test_skipped_files_count_against_the_declared_limit(tmp_path):
    data = tar_bytes({**ADAPTER, "notes/big.dat": bytes(5000)})
    message = refusal(tmp_path, data, max_bytes=5000)
    assert "5000 bytes" in message and "notes/big.dat" in message and "declares" in message
    assert extract(tmp_path, data, max_bytes=5000 + sum(map(len, ADAPTER.values())))


def test_exactly_the_limit_passes_one_byte_more_is_refused(tmp_path):
    total = sum(map(len, ADAPTER.values()))
    assert extract(tmp_path, zip_bytes(ADAPTER), max_bytes=total)
    assert "declares more than the limit of" in refusal(tmp_path, zip_bytes(ADAPTER), max_bytes=total - 1)


def test_real_bytes_are_counted_while_copying(tmp_path):
    """Declared sizes can lie; the copy stops at the limit whatever was declared."""
    folder = tmp_path / "out"
    folder.mkdir()
    unpacker = _Unpacker(folder, max_bytes=1000)
    parts = unpacker.admit("adapter_model.safetensors", "file", 10)
    with pytest.raises(ArchiveError, match="unpacks to more than the limit of 1000 bytes"):
        unpacker.write(parts, "adapter_model.safetensors", lambda: io.BytesIO(bytes(300_000)))


def test_decompressed_stream_is_capped_beyond_member_data(tmp_path):
    """Chained pax records (each under the per-record limit) add up past what the stream may decompress to."""
    record = b"65000 comment=" + b"x" * (65000 - 15) + b"\n"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, len(record)
    block = pax.tobuf(format=tarfile.USTAR_FORMAT) + record.ljust(65024, b"\0")
    message = refusal(tmp_path, gzip.compress(block * 150, mtime=0), max_bytes=1000)
    assert "decompresses to more than" in message


def bomb_with_real_data() -> bytes:
    """A tar.gz whose first member declares 2 GiB and which really decompresses to 512 MiB (about 0.5 MB)."""
    header = tarfile.TarInfo("adapter/adapter_model.safetensors")
    header.size = 2**31
    return gzip.compress(header.tobuf(), mtime=0) + gzip.compress(bytes(1 << 20), mtime=0) * 512


def test_declared_size_bombs_are_refused_before_decompressing(tmp_path):
    zip_bomb = bytearray(zip_bytes(ADAPTER))
    for at in (22, zip_bomb.index(b"PK\x01\x02") + 24):  # uncompressed size: local header, central directory
        zip_bomb[at:at + 4] = struct.pack("<I", 2**31)
    for data in (bomb_with_real_data(), bytes(zip_bomb)):
        started = time.perf_counter()
        message = refusal(tmp_path, data, max_bytes=512 * 1024 * 1024)
        assert time.perf_counter() - started < 0.5
        assert "declares more than the limit of 536870912 bytes" in message and "2147483648" in message


def test_member_count_limit(tmp_path):
    notes = {f"n{i}.txt": b"" for i in range(MAX_MEMBERS - len(ADAPTER))}
    assert extract(tmp_path, tar_bytes({**ADAPTER, **notes}))
    for data in (tar_bytes({**ADAPTER, **notes, "one-more": b""}), zip_bytes({**ADAPTER, **notes, "one-more": b""})):
        assert f"more than {MAX_MEMBERS} members" in refusal(tmp_path, data)


def test_an_oversized_zip_central_directory_is_refused_before_parsing(tmp_path):
    data = bytearray(zip_bytes(ADAPTER))
    end = data.rindex(b"PK\x05\x06")
    data[end + 12:end + 16] = struct.pack("<I", 10**8)
    assert "central directory is too large" in refusal(tmp_path, bytes(data))


@pytest.mark.parametrize(("name", "words"), [
    ("../x", "escapes"), ("adapter/../../x", "escapes"), ("/x", "escapes"), ("a\\b", "backslash"),
    ("a\x7fb", "control character"), ("a\x85b", "control character"), ("a\nb", "control character"),
    ("a/" + "b" * 256, "longer than 255"), ("a/" * 520, "longer than 1024"),
])
def test_unsafe_names_are_refused(tmp_path, name, words):
    for data in (tar_bytes({**ADAPTER, name: b"x"}), zip_bytes({**ADAPTER, name: b"x"})):
        assert words in refusal(tmp_path, data)


def test_names_at_the_length_limits_pass(tmp_path):
    longest = "d/" * 380 + "e" * 255
    assert len(longest.encode()) <= 1024
    assert extract(tmp_path, tar_bytes({**ADAPTER, longest: b"x", "ünïcode-名前.txt": b"x"}))


def special(name: str, kind: bytes, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(("member", "words"), [
    (special("evil", tarfile.SYMTYPE, linkname="/etc/passwd"), "symlink; links are refused"),
    (special("evil", tarfile.LNKTYPE, linkname="adapter_config.json"), "hardlink; links are refused"),
    (special("dev", tarfile.BLKTYPE), "is a device"),
    (special("dev", tarfile.CHRTYPE), "is a device"),
    (special("pipe", tarfile.FIFOTYPE), "is a fifo"),
    (special("vol", b"V"), "not a regular file or folder"),
])
def test_special_tar_members_are_refused(tmp_path, member, words):
    message = refusal(tmp_path, tar_bytes(ADAPTER, extra=[member]))
    assert words in message and repr(member.name) in message


@pytest.mark.parametrize(("mode", "words"), [(stat.S_IFLNK | 0o777, "symlink"), (stat.S_IFCHR | 0o644, "device"),
                                             (stat.S_IFIFO | 0o644, "fifo"), (stat.S_IFSOCK | 0o644, "special")])
def test_special_zip_members_are_refused(tmp_path, mode, words):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in ADAPTER.items():
            zf.writestr(name, data)
        info = zipfile.ZipInfo("odd")
        info.external_attr = mode << 16
        zf.writestr(info, b"target")
    assert words in refusal(tmp_path, buffer.getvalue())


def test_duplicates_are_refused_even_when_spelled_differently(tmp_path):
    assert "duplicate" in refusal(tmp_path, tar_bytes({**ADAPTER, "./README.md": b"again"}))
    assert "duplicate" in refusal(tmp_path, tar_bytes({**ADAPTER, "x//y": b"", "x/./y": b""}))


@pytest.mark.parametrize("name", ["adapter_model.bin", "ADAPTER.PT", "deep/dir/opt.pkl", "x.ckpt", "m.pth", "z.pickle"])
def test_pickle_files_are_refused_by_name_without_being_written(tmp_path, name):
    archive = tmp_path / "upload"
    for data in (tar_bytes({**ADAPTER, name: b"\x80\x04K\x01."}), zip_bytes({name: b"\x80\x04K\x01.", **ADAPTER})):
        archive.write_bytes(data)
        with pytest.raises(AdapterCheckError, match="pickle") as caught:
            extract_archive(archive, tmp_path / "dest", LIMIT)
        assert caught.value.check == "format"
        assert list((tmp_path / "dest").rglob("*")) == []


def test_config_location_rules(tmp_path):
    assert "more than one adapter_config.json" in refusal(
        tmp_path, tar_bytes({**under("a/"), "b/adapter_config.json": b"{}"}))
    assert "more than one" in refusal(tmp_path, tar_bytes({**ADAPTER, "b/adapter_config.json": b"{}"}))
    assert "root or in one top folder" in refusal(tmp_path, tar_bytes(under("a/b/")))
    assert "holds no adapter_config.json" in refusal(tmp_path, tar_bytes({"README.md": b"hi"}))


@pytest.mark.parametrize(("data", "words"), [
    (b"", "empty"),
    (b"plain words, not an archive", "neither a tar"),
    (bytes(2048), "holds no adapter_config.json"),  # zero blocks are a valid, empty tar
    (gzip.compress(b"not a tar" * 100, mtime=0), "gz-compressed archive does not hold a readable tar"),
    (b"\x1f\x8b\x08\x00" + bytes(20), "gz-compressed archive"),
    (bz2.compress(b"x" * 1000)[:30], "bz2-compressed archive is unreadable"),
    (b"\xfd7zXZ\x00" + bytes(40), "xz-compressed archive is unreadable"),
    (b"PK\x03\x04" + bytes(100), "zip archive is unreadable"),
])
def test_undecodable_uploads_are_archive_errors(tmp_path, data, words):
    assert words in refusal(tmp_path, data)


def test_encrypted_and_unsupported_zip_members_are_refused_before_extraction(tmp_path):
    plain = zip_bytes(ADAPTER)
    with zipfile.ZipFile(io.BytesIO(plain)) as zf:
        local = zf.infolist()[0].header_offset
        central = zf.start_dir
    for field_at, value, ending in ((6, 1, "is encrypted"), (8, 99, "unsupported compression method (99)")):
        data = bytearray(plain)
        data[local + field_at:local + field_at + 2] = struct.pack("<H", value)
        data[central + field_at + 2:central + field_at + 4] = struct.pack("<H", value)
        assert refusal(tmp_path, bytes(data)).endswith(ending)  # our words, not zipfile's at extraction


def test_a_failure_after_some_files_were_written_leaves_nothing(tmp_path):
    truncated = tar_bytes(under("adapter/"), compression="")[:1800]  # the config is complete, the weights are not
    assert "unreadable" in refusal(tmp_path, truncated)


def test_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(ArchiveError("archive entry 'x' is a symlink")))
    assert type(error) is ArchiveError and str(error) == "archive entry 'x' is a symlink"


def test_write_tar_gz_round_trips(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name, data in ADAPTER.items():
        (source / name).write_bytes(data)
    archive = write_tar_gz(source, tmp_path / "a.tar.gz", "support-bot-v1")
    assert contents(extract_archive(archive, tmp_path / "dest", LIMIT)) == ADAPTER


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(out))
        choice = rng.random()
        if choice < 0.6:
            out[at] = rng.choice([0, 0xFF, 0x80, 0x2F, 0x2E, rng.randrange(256)])
        elif choice < 0.8:
            del out[at:at + rng.randint(1, 40)]
        else:
            out = out[:at]
        if not out:
            break
    return bytes(out)


def test_mutated_archives_raise_only_archive_or_check_errors(tmp_path):
    rng = random.Random(1234)
    raw_tar = tar_bytes(under("adapter/"), compression="")
    seeds = [raw_tar, zip_bytes(ADAPTER), zip_bytes(ADAPTER, zipfile.ZIP_STORED), tar_bytes(ADAPTER)]
    for round_ in range(400):
        seed = seeds[round_ % len(seeds)]
        data = mutate(seed, rng)
        if round_ % 8 == 0:  # fuzz the tar structure beneath the compression too
            data = gzip.compress(mutate(raw_tar, rng), mtime=0)
        archive, dest = tmp_path / "upload", tmp_path / f"d{round_}"
        archive.write_bytes(data)
        try:
            extract_archive(archive, dest, LIMIT)
        except (ArchiveError, AdapterCheckError):  # anything else fails the test
            assert list(dest.rglob("*")) == []
