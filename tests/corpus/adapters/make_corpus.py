"""Regenerate the junk adapter-upload corpus in this folder, deterministically and without torch.

Run: `python tests/corpus/adapters/make_corpus.py`. Every file is a malformed or unsafe upload for the tiny test
Llama (hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads, tied embeddings, vocab 49152);
manifest.json gives, per file, the expected error kind ("archive" for ArchiveError, else the AdapterCheckError
check) and a word the message must contain.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_BYTES = 8 * 1024 * 1024
MAX_RANK = 64
HIDDEN, KV_WIDTH, VOCAB = 64, 32, 49152
MODULE_OUT = {"q_proj": HIDDEN, "v_proj": KV_WIDTH}
ZIP_DATE = (2024, 1, 1, 0, 0, 0)
CASES: list[dict] = []


def case(kind: str, word: str, about: str) -> Callable:
    """Register a builder returning (file name, bytes) with its expected error kind and message word."""
    def register(build: Callable[[], tuple[str, bytes]]) -> Callable:
        CASES.append({"build": build, "kind": kind, "word": word, "about": about})
        return build
    return register


# --- valid parts ---------------------------------------------------------------------------------------------

def lora_tensors(rank: int = 8, dtype: str = "F32") -> dict[str, tuple[str, list[int]]]:
    """A LoRA on q_proj and v_proj of both layers, as PEFT names it: key -> (dtype, shape)."""
    tensors = {}
    for layer in range(2):
        for module, out in MODULE_OUT.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (dtype, [rank, HIDDEN])
            tensors[f"{prefix}.lora_B.weight"] = (dtype, [out, rank])
    return tensors


def config(**changes) -> dict:
    """A PEFT LoRA adapter_config.json (the fields that matter), with `changes` applied (None deletes)."""
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
            "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "task_type": None}
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None or key == "task_type"}


def safetensors(tensors: dict[str, tuple[str, list[int]]], metadata: dict | None = None) -> bytes:
    """A well-formed safetensors file of zero-filled tensors."""
    itemsize = {"F32": 4, "F16": 2, "I32": 4}
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        numel = 1
        for dim in shape:
            numel *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + numel * itemsize[dtype]]}
        offset += numel * itemsize[dtype]
    return raw_safetensors(json.dumps(header).encode(), offset)


def raw_safetensors(header: bytes, data_bytes: int, length: int | None = None) -> bytes:
    """Length prefix (the real one unless given), header bytes and `data_bytes` zero bytes."""
    return struct.pack("<Q", len(header) if length is None else length) + header + bytes(data_bytes)


def adapter_files(weights: bytes | None = None, cfg: dict | bytes | None = None) -> dict[str, bytes]:
    """The files of an adapter folder; the defaults are valid."""
    cfg = config() if cfg is None else cfg
    return {"adapter_config.json": cfg if isinstance(cfg, bytes) else json.dumps(cfg).encode(),
            "adapter_model.safetensors": safetensors(lora_tensors()) if weights is None else weights}


def with_header(header: dict | bytes, data_bytes: int = 0) -> bytes:
    """A tar.gz of a valid config and a safetensors file with this header."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return tgz(adapter_files(raw_safetensors(raw, data_bytes)))


def entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    """One safetensors header entry (F32 [8, 64] at the start by default)."""
    return {"dtype": dtype, "shape": [8, 64] if shape is None else shape,
            "data_offsets": [0, 2048] if offsets is None else offsets}


# --- archive writers -----------------------------------------------------------------------------------------

def tar_info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    """A TarInfo with fixed metadata, so the output is byte-for-byte reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mtime, info.mode = size, kind, 0, 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def tar_bytes(files: dict[str, bytes], prefix: str = "adapter/",
              extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> bytes:
    """An uncompressed tar of `files` under `prefix`, then `extra` raw members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in files.items():
            tf.addfile(tar_info(prefix + name, len(data)), io.BytesIO(data))
        for info, data in extra:
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buffer.getvalue()


def raw_members(files: dict[str, bytes], prefix: str = "adapter/") -> bytes:
    """Tar member blocks (ustar header, data padded to 512) without the end-of-archive marker."""
    return b"".join(tar_header(tar_info(prefix + name, len(data))) + data.ljust(-(-len(data) // 512) * 512, b"\0")
                    for name, data in files.items())


def tgz(files: dict[str, bytes], prefix: str = "adapter/", extra: list[tuple[tarfile.TarInfo, bytes]] = ()) -> bytes:
    """tar_bytes, gzip-compressed with a fixed mtime."""
    return gzip.compress(tar_bytes(files, prefix, extra), mtime=0)


def zip_bytes(members: list[tuple[str, bytes]], attrs: dict[str, int] | None = None,
              method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip of (name, data) members; `attrs` sets a member's unix mode (file type included)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are the point of one case
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
            info.compress_type = method
            info.create_system = 3
            info.external_attr = (attrs or {}).get(name, stat.S_IFREG | 0o644) << 16
            zf.writestr(info, data)
    return buffer.getvalue()


def patch_zip(data: bytes, *, flags: int = 0, method: int | None = None, file_size: int | None = None) -> bytes:
    """Rewrite fields of every local and central header (OR `flags`, set the method or declared size)."""
    out = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        offsets = [info.header_offset for info in zf.infolist()]
        central = zf.start_dir
    for local in offsets:
        _patch_zip_header(out, local, flags_at=6, method_at=8, size_at=22, flags=flags, method=method, size=file_size)
    at = central
    while out[at:at + 4] == b"PK\x01\x02":
        _patch_zip_header(out, at, flags_at=8, method_at=10, size_at=24, flags=flags, method=method, size=file_size)
        name_len, extra_len, comment_len = struct.unpack("<HHH", out[at + 28:at + 34])
        at += 46 + name_len + extra_len + comment_len
    return bytes(out)


def _patch_zip_header(out: bytearray, at: int, *, flags_at: int, method_at: int, size_at: int, flags: int,
                      method: int | None, size: int | None) -> None:
    (old_flags,) = struct.unpack("<H", out[at + flags_at:at + flags_at + 2])
    out[at + flags_at:at + flags_at + 2] = struct.pack("<H", old_flags | flags)
    if method is not None:
        out[at + method_at:at + method_at + 2] = struct.pack("<H", method)
    if size is not None:
        out[at + size_at:at + size_at + 4] = struct.pack("<I", size)


def tar_header(info: tarfile.TarInfo, field_at: int | None = None, field: bytes = b"") -> bytes:
    """One ustar header block for `info`, with raw bytes written at `field_at` and the checksum redone."""
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape"))
    if field_at is not None:
        block[field_at:field_at + len(field)] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


# --- safetensors header cases --------------------------------------------------------------------------------

@case("format", "exactly", "a tensor entry without 'shape' (was KeyError 'shape')")
def header_shape_missing():
    return "header_shape_missing.tar.gz", with_header({"t": {"dtype": "F32", "data_offsets": [0, 4]}}, 4)


@case("format", "integers", "shape [1e18, 1e18] given as floats")
def header_shape_floats():
    return "header_shape_floats.tar.gz", with_header({"t": entry(shape=[1e18, 1e18])})


@case("format", "too large", "shape [10**18, 10**18] (was OverflowError downstream)")
def header_shape_huge_ints():
    return "header_shape_huge_ints.tar.gz", with_header({"t": entry(shape=[10**18, 10**18])})


@case("format", "too many elements", "each dimension allowed, but 2**62 elements")
def header_numel_huge():
    return "header_numel_huge.tar.gz", with_header({"t": entry(shape=[2**31, 2**31])})


@case("format", "negative", "a negative dimension")
def header_negative_dim():
    return "header_negative_dim.tar.gz", with_header({"t": entry(shape=[-8, -64], offsets=[0, 2048])}, 2048)


@case("format", "nested", "a header nested 100000 deep (was RecursionError)")
def header_deep_nesting():
    return "header_deep_nesting.tar.gz", with_header(b"[" * 100_000 + b"]" * 100_000)


@case("format", "past the end", "the header length runs past the end of the file")
def header_length_past_eof():
    return "header_length_past_eof.tar.gz", tgz(adapter_files(raw_safetensors(b"{}", 0, length=10**6)))


@case("format", "header length", "a zero header length")
def header_length_zero():
    return "header_length_zero.tar.gz", tgz(adapter_files(raw_safetensors(b"", 16, length=0)))


@case("format", "shorter than 8", "a 4-byte weights file")
def header_too_short():
    return "header_too_short.tar.gz", tgz(adapter_files(b"\x02\0\0\0"))


@case("format", "__metadata__", "metadata that is not str -> str")
def header_metadata_not_str():
    return "header_metadata_not_str.tar.gz", with_header({"__metadata__": {"format": 1}, "t": entry()}, 2048)


@case("format", "overlap", "two tensors sharing bytes")
def header_offsets_overlap():
    return "header_offsets_overlap.tar.gz", with_header(
        {"a": entry(offsets=[0, 2048]), "b": entry(offsets=[1024, 3072])}, 3072)


@case("format", "hole", "bytes between two tensors")
def header_offsets_hole():
    return "header_offsets_hole.tar.gz", with_header(
        {"a": entry(offsets=[0, 2048]), "b": entry(offsets=[4096, 6144])}, 6144)


@case("format", "hole", "data bytes after the last tensor")
def header_trailing_data():
    return "header_trailing_data.tar.gz", with_header({"a": entry()}, 4096)


@case("format", "out of range", "offsets past the data region")
def header_offsets_out_of_range():
    return "header_offsets_out_of_range.tar.gz", with_header({"a": entry(offsets=[10**9, 10**9 + 2048])}, 2048)


@case("format", "needs", "offsets that do not span numel * itemsize")
def header_offsets_size_mismatch():
    return "header_offsets_size_mismatch.tar.gz", with_header({"a": entry(offsets=[0, 1000])}, 1000)


@case("format", "two integers", "offsets given as strings")
def header_offsets_not_ints():
    return "header_offsets_not_ints.tar.gz", with_header({"a": entry(offsets=["0", "2048"])}, 2048)


@case("format", "unknown dtype", "a dtype outside the safetensors set")
def header_bad_dtype():
    return "header_bad_dtype.tar.gz", with_header({"a": entry(dtype="F128")}, 2048)


@case("format", "UTF-8", "header bytes that are not UTF-8")
def header_not_utf8():
    return "header_not_utf8.tar.gz", with_header(b'{"\xff\xfe": 1}')


@case("format", "not a JSON object", "a header that is a JSON list")
def header_not_object():
    return "header_not_object.tar.gz", with_header(b"[1, 2]")


@case("format", "duplicate", "the same tensor name twice")
def header_duplicate_key():
    raw = b'{"a": %s, "a": %s}' % (json.dumps(entry()).encode(), json.dumps(entry()).encode())
    return "header_duplicate_key.tar.gz", with_header(raw, 2048)


@case("format", "exactly", "an entry with an extra field")
def header_extra_field():
    return "header_extra_field.tar.gz", with_header({"a": {**entry(), "bias": True}}, 2048)


# --- adapter cases -------------------------------------------------------------------------------------------

@case("format", "no LoRA", "a safetensors file with no tensors")
def no_tensors():
    return "no_tensors.tar.gz", tgz(adapter_files(safetensors({})))


@case("rank", "r=8", "rank 64 tensors under r=8")
def rank64_under_r8():
    return "rank64_under_r8.tar.gz", tgz(adapter_files(safetensors(lora_tensors(rank=64))))


@case("rank", "r=16", "tensors of rank 8 where rank_pattern says 16")
def rank_pattern_mismatch():
    return "rank_pattern_mismatch.tar.gz", tgz(adapter_files(cfg=config(rank_pattern={"q_proj": 16})))


@case("config", "module name suffix", "a regex key in rank_pattern")
def rank_pattern_regex():
    return "rank_pattern_regex.tar.gz", tgz(adapter_files(cfg=config(rank_pattern={"(q|v)_proj": 8})))


@case("config", "lora_alpha", "lora_alpha NaN")
def alpha_nan():
    return "alpha_nan.tar.gz", tgz(adapter_files(cfg=config(lora_alpha=float("nan"))))


@case("config", "lora_alpha", "lora_alpha Infinity")
def alpha_infinity():
    return "alpha_infinity.tar.gz", tgz(adapter_files(cfg=config(lora_alpha=float("inf"))))


@case("config", "lora_alpha", "lora_alpha as a string")
def alpha_string():
    return "alpha_string.tar.gz", tgz(adapter_files(cfg=config(lora_alpha="16")))


@case("config", "alpha_pattern", "an alpha_pattern value of -1")
def alpha_pattern_negative():
    return "alpha_pattern_negative.tar.gz", tgz(adapter_files(cfg=config(alpha_pattern={"q_proj": -1})))


@case("config", "lora_dropout", "lora_dropout 1.5")
def dropout_out_of_range():
    return "dropout_out_of_range.tar.gz", tgz(adapter_files(cfg=config(lora_dropout=1.5)))


@case("rank", "integer", "r = 'abc' (was int('abc'))")
def rank_not_int():
    return "rank_not_int.tar.gz", tgz(adapter_files(cfg=config(r="abc")))


@case("rank", "integer", "r = true")
def rank_bool():
    return "rank_bool.tar.gz", tgz(adapter_files(cfg=config(r=True)))


@case("rank", "integer", "r = 8.0")
def rank_float():
    return "rank_float.tar.gz", tgz(adapter_files(cfg=config(r=8.0)))


@case("method", "not supported", "peft_type IA3")
def peft_type_ia3():
    return "peft_type_ia3.tar.gz", tgz(adapter_files(cfg=config(peft_type="IA3")))


@case("target_modules", "non-empty", "target_modules []")
def target_modules_empty():
    return "target_modules_empty.tar.gz", tgz(adapter_files(cfg=config(target_modules=[])))


@case("format", "nested", "a config nested 100000 deep (was RecursionError)")
def config_deep_nesting():
    return "config_deep_nesting.tar.gz", tgz(adapter_files(cfg=b"[" * 100_000 + b"]" * 100_000))


@case("format", "too large", "a 1.1 MB config")
def config_huge():
    padded = json.dumps(config()).encode()[:-1] + b" " * 1_100_000 + b"}"
    return "config_huge.tar.gz", tgz(adapter_files(cfg=padded))


@case("format", "JSON object", "a config that is a JSON string")
def config_not_object():
    return "config_not_object.tar.gz", tgz(adapter_files(cfg=b'"LORA"'))


@case("format", "not valid JSON", "a config that is not JSON")
def config_not_json():
    return "config_not_json.tar.gz", tgz(adapter_files(cfg=b"r: 8\nlora_alpha: 16\n"))


@case("format", "no lora_B", "lora_A without its lora_B")
def missing_lora_b():
    tensors = lora_tensors()
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    return "missing_lora_b.tar.gz", tgz(adapter_files(safetensors(tensors)))


@case("format", "floating point", "LoRA factors stored as I32")
def dtype_i32():
    return "dtype_i32.tar.gz", tgz(adapter_files(safetensors(lora_tensors(dtype="I32"))))


@case("format", "unexpected tensor", "a tensor that is neither LoRA nor embedding")
def unknown_tensor():
    tensors = {**lora_tensors(), "base_model.model.model.norm.weight": ("F32", [HIDDEN])}
    return "unknown_tensor.tar.gz", tgz(adapter_files(safetensors(tensors)))


@case("shapes", "matrices", "a 3-D lora_A")
def lora_a_3d():
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = ("F32", [8, 8, 8])
    return "lora_a_3d.tar.gz", tgz(adapter_files(safetensors(tensors)))


@case("shapes", "shape", "lora_A of in_features 32 for a 64-wide base")
def wrong_in_features():
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = ("F32", [8, 32])
    return "wrong_in_features.tar.gz", tgz(adapter_files(safetensors(tensors)))


@case("target_modules", "does not exist", "a module the base lacks")
def missing_module():
    tensors = {key.replace("q_proj", "qkv_fused"): value for key, value in lora_tensors().items()}
    return "missing_module.tar.gz", tgz(adapter_files(safetensors(tensors)))


@case("vocabulary", "vocabulary", "an lm_head with 1000 rows for a 49152-token base")
def vocab_mismatch():
    tensors = {**lora_tensors(), "base_model.model.lm_head.weight": ("F16", [1000, HIDDEN])}
    return "vocab_mismatch.tar.gz", tgz(adapter_files(safetensors(tensors)))


@case("format", "missing", "a config without weights")
def weights_missing():
    return "weights_missing.tar.gz", tgz({"adapter_config.json": json.dumps(config()).encode()})


# --- archive cases -------------------------------------------------------------------------------------------

@case("archive", "escapes", "a member named ../evil")
def path_traversal():
    return "path_traversal.tar.gz", tgz(adapter_files(), extra=[(tar_info("../evil", 1), b"x")])


@case("archive", "escapes", "an absolute member path")
def absolute_path():
    return "absolute_path.tar.gz", tgz(adapter_files(), extra=[(tar_info("/tmp/evil", 1), b"x")])


@case("archive", "backslash", "a zip member named ..\\evil")
def backslash_name():
    return "backslash_name.zip", zip_bytes([*adapter_files().items(), ("..\\evil", b"x")])


@case("archive", "NUL", "a zip member name holding a NUL byte")
def nul_in_name():
    data = zip_bytes([*adapter_files().items(), ("evilXname.txt", b"x")])
    return "nul_in_name.zip", data.replace(b"evilXname.txt", b"evil\0name.txt")


@case("archive", "control character", "a member name holding \\x01")
def control_char_name():
    return "control_char_name.tar.gz", tgz(adapter_files(), extra=[(tar_info("adapter/a\x01b", 1), b"x")])


@case("archive", "UTF-8", "a member name that is not UTF-8")
def name_not_utf8():
    header = tar_header(tar_info("adapter/\udcff.txt", 1))
    return "name_not_utf8.tar", raw_members(adapter_files()) + header + b"x".ljust(512, b"\0") + bytes(1024)


@case("archive", "longer than 255", "a 300-byte path component")
def long_component():
    return "long_component.tar.gz", tgz(adapter_files(), extra=[(tar_info("adapter/" + "a" * 300, 1), b"x")])


@case("archive", "longer than 1024", "a 1200-byte member name")
def long_name():
    return "long_name.tar.gz", tgz(adapter_files(), extra=[(tar_info("d/" * 600 + "x", 1), b"x")])


@case("archive", "no file name", "a zip member with an empty name")
def empty_name_zip():
    return "empty_name.zip", zip_bytes([*adapter_files().items(), ("", b"x")])


@case("archive", "link", "a symlink member")
def symlink_tar():
    link = tar_info("adapter/evil", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
    return "symlink.tar.gz", tgz(adapter_files(), extra=[(link, b"")])


@case("archive", "link", "a hardlink member")
def hardlink_tar():
    link = tar_info("adapter/evil", kind=tarfile.LNKTYPE, linkname="adapter/adapter_config.json")
    return "hardlink.tar.gz", tgz(adapter_files(), extra=[(link, b"")])


@case("archive", "link", "a zip member with a symlink mode")
def symlink_zip():
    members = [*adapter_files().items(), ("evil", b"/etc/passwd")]
    return "symlink.zip", zip_bytes(members, attrs={"evil": stat.S_IFLNK | 0o777})


@case("archive", "device", "a character device member")
def device_tar():
    device = tar_info("adapter/null", kind=tarfile.CHRTYPE, devmajor=1, devminor=3)
    return "device.tar.gz", tgz(adapter_files(), extra=[(device, b"")])


@case("archive", "fifo", "a fifo member")
def fifo_tar():
    return "fifo.tar.gz", tgz(adapter_files(), extra=[(tar_info("adapter/pipe", kind=tarfile.FIFOTYPE), b"")])


@case("archive", "fifo", "a zip member with a fifo mode")
def fifo_zip():
    members = [*adapter_files().items(), ("pipe", b"")]
    return "fifo.zip", zip_bytes(members, attrs={"pipe": stat.S_IFIFO | 0o644})


@case("archive", "sparse", "a GNU sparse member")
def sparse_tar():
    sparse = tar_info("adapter/holes", kind=tarfile.GNUTYPE_SPARSE)
    return "sparse.tar", raw_members(adapter_files()) + sparse.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)


@case("archive", "members", "70 members in a tar")
def too_many_members_tar():
    extra = [(tar_info(f"adapter/notes-{i}.txt", 1), b"x") for i in range(70)]
    return "too_many_members.tar.gz", tgz(adapter_files(), extra=extra)


@case("archive", "members", "70 members in a zip")
def too_many_members_zip():
    return "too_many_members.zip", zip_bytes([*adapter_files().items(), *((f"n{i}.txt", b"x") for i in range(70))])


@case("archive", "duplicate", "the same tar member twice")
def duplicate_tar():
    again = tar_info("./adapter/adapter_config.json", 2)
    return "duplicate_names.tar.gz", tgz(adapter_files(), extra=[(again, b"{}")])


@case("archive", "duplicate", "the same zip member twice")
def duplicate_zip():
    files = adapter_files()
    return "duplicate_names.zip", zip_bytes([*files.items(), ("adapter_config.json", b"{}")])


@case("format", "pickle", "a pickle file beside the config")
def pickle_member():
    files = {"adapter_config.json": json.dumps(config()).encode(), "adapter_model.bin": b"\x80\x04K\x01."}
    return "pickle.tar.gz", tgz(files)


@case("format", "pickle", "a pickle file in a zip, listed after the weights")
def pickle_zip():
    return "pickle.zip", zip_bytes([*adapter_files().items(), ("extra/optimizer.pt", b"\x80\x04K\x01.")])


@case("archive", "more than one", "two adapter_config.json files")
def two_configs():
    files = adapter_files()
    extra = [(tar_info("other/adapter_config.json", len(files["adapter_config.json"])), files["adapter_config.json"])]
    return "two_configs.tar.gz", tgz(files, extra=extra)


@case("archive", "top folder", "the adapter two folders deep")
def config_too_deep():
    return "config_too_deep.tar.gz", tgz(adapter_files(), prefix="a/b/")


@case("archive", "no adapter_config.json", "weights without a config")
def no_config():
    return "no_config.tar.gz", tgz({"adapter_model.safetensors": safetensors(lora_tensors())})


@case("archive", "neither", "a text file")
def not_an_archive():
    return "not_an_archive.txt", b"definitely not an archive, just words\n" * 20


@case("archive", "empty", "an empty file")
def empty():
    return "empty.tar.gz", b""


@case("archive", "encrypted", "a zip whose members are flagged encrypted")
def encrypted_zip():
    return "encrypted.zip", patch_zip(zip_bytes(list(adapter_files().items())), flags=0x1)


@case("archive", "compression", "a zip member compressed with PPMd (method 98)")
def unsupported_compression_zip():
    return "unsupported_compression.zip", patch_zip(zip_bytes(list(adapter_files().items())), method=98)


@case("archive", "declares", "a zip whose members declare 2 GiB each (zip bomb by declared size)")
def zip_bomb_declared():
    return "zip_bomb_declared.zip", patch_zip(zip_bytes(list(adapter_files().items())), file_size=2**31)


@case("archive", "declares", "a tar.gz whose first member declares 2 GiB, followed by 4 KiB")
def tar_bomb_declared():
    header = tar_header(tar_info("adapter/adapter_model.safetensors", 2**31))
    return "tar_bomb_declared.tar.gz", gzip.compress(header + bytes(4096), mtime=0)


@case("archive", "declares", "an xz tar whose first member declares 2 GiB")
def xz_bomb_declared():
    header = tar_header(tar_info("adapter/adapter_model.safetensors", 2**31))
    return "xz_bomb_declared.tar.xz", lzma.compress(header + bytes(4096))


@case("archive", "negative", "a tar member with a base-256 size of -1")
def negative_size():
    header = tar_header(tar_info("adapter/adapter_config.json"), 124, b"\xff" * 12)
    return "negative_size.tar.gz", gzip.compress(header + bytes(2048), mtime=0)


@case("archive", "extended header", "a pax header declaring 1 GiB")
def pax_header_huge():
    header = tar_header(tar_info("././@PaxHeader", 2**30, kind=tarfile.XHDTYPE))
    return "pax_header_huge.tar.gz", gzip.compress(header + bytes(8192), mtime=0)


@case("archive", "unreadable", "3000 chained pax headers (RecursionError in tarfile)")
def pax_chain():
    record = b"30 comment=" + b"x" * 18 + b"\n"
    block = tar_header(tar_info("././@PaxHeader", len(record), kind=tarfile.XHDTYPE)) + record.ljust(512, b"\0")
    return "pax_chain.tar.gz", gzip.compress(block * 3000 + bytes(1024), mtime=0)


@case("archive", "unreadable", "a zip local header followed by junk (BadZipFile)")
def bad_zip():
    return "bad_zip.zip", b"PK\x03\x04" + b"\x07junk" * 40


@case("archive", "CRC", "a stored zip member whose data fails its CRC")
def zip_crc_mismatch():
    data = bytearray(zip_bytes(list(adapter_files().items()), method=zipfile.ZIP_STORED))
    data[data.index(b'"peft_type"')] ^= 0xFF
    return "zip_crc_mismatch.zip", bytes(data)


@case("archive", "decompressing", "a deflated zip member with a corrupted body (zlib.error)")
def zip_deflate_corrupt():
    data = bytearray(zip_bytes(list(adapter_files().items())))
    at = data.index(b"adapter_config.json") + len("adapter_config.json")
    data[at:at + 8] = b"\xff" * 8
    return "zip_deflate_corrupt.zip", bytes(data)


@case("archive", "unreadable", "a zip member declaring 100 bytes but holding more (size lie)")
def zip_size_lie():
    return "zip_size_lie.zip", patch_zip(zip_bytes(list(adapter_files().items())), file_size=100)


@case("archive", "unreadable", "a tar.gz cut in half (EOFError)")
def truncated_gzip():
    data = tgz(adapter_files())
    return "truncated.tar.gz", data[: len(data) // 2]


@case("archive", "zlib", "a gzip stream with a corrupted deflate body (zlib.error)")
def corrupt_gzip():
    data = bytearray(tgz(adapter_files()))
    data[20:40] = b"\xff" * 20
    return "corrupt_gzip.tar.gz", bytes(data)


@case("archive", "readable tar", "gzip of plain text")
def gzip_not_tar():
    return "gzip_not_tar.tar.gz", gzip.compress(b"hello, this is not a tar\n" * 40, mtime=0)


@case("archive", "unreadable", "a bzip2 tar cut short")
def truncated_bz2():
    data = bz2.compress(tar_bytes(adapter_files()))
    return "truncated.tar.bz2", data[: len(data) // 2]


@case("archive", "unreadable", "an xz tar with a corrupted body (LZMAError)")
def corrupt_xz():
    data = bytearray(lzma.compress(tar_bytes(adapter_files())))
    data[40:60] = b"\x00" * 20
    return "corrupt.tar.xz", bytes(data)


@case("archive", "unreadable", "a gzip with a bad header flag byte (BadGzipFile, an OSError)")
def bad_gzip_header():
    data = bytearray(tgz(adapter_files()))
    data[2] = 0x07  # compression method must be 8 (deflate)
    return "bad_gzip_header.tar.gz", bytes(data)


def build() -> tuple[dict[str, bytes], dict]:
    """Every case's file name -> bytes, and the manifest document (limits to inspect with, each file's expectation)."""
    files, cases = {}, []
    for spec in CASES:
        name, data = spec["build"]()
        files[name] = data
        cases.append({"file": name, "kind": spec["kind"], "word": spec["word"], "about": spec["about"]})
    assert len(files) == len(CASES), "two cases write the same file"
    document = {"max_bytes": MAX_BYTES, "max_rank": MAX_RANK, "cases": sorted(cases, key=lambda c: c["file"])}
    return files, document


def main(out: Path = HERE) -> None:
    """Write every case and manifest.json into `out`; remove files of cases that no longer exist."""
    files, document = build()
    for name, data in files.items():
        (out / name).write_bytes(data)
    for stale in out.iterdir():
        if stale.name not in files and stale.name not in ("make_corpus.py", "manifest.json"):
            stale.unlink()
    (out / "manifest.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
