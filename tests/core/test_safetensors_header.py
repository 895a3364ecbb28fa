"""The torch-free safetensors header reader: it accepts what the format allows and names what it refuses."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from core.safetensors_header import (
    MAX_HEADER_BYTES,
    SafetensorsError,
    TensorInfo,
    count_folder_params,
    read_folder_shapes,
    read_header,
    read_shapes,
    shape_numel,
)


def write(path: Path, header: dict | bytes, data_bytes: int = 0, *, length: int | None = None) -> Path:
    """A file of: length prefix (the real one unless given), header, `data_bytes` zero bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + bytes(data_bytes))
    return path


def entry(dtype="F32", shape=(2, 3), offsets=(0, 24)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_reads_a_file_written_by_the_reference_library(tmp_path):
    np = pytest.importorskip("numpy")
    save = pytest.importorskip("safetensors.numpy").save
    data = save({"a": np.zeros((2, 3), np.float32), "b": np.ones(4, np.float16), "empty": np.zeros((0, 5), np.int64)},
                metadata={"format": "pt"})
    (tmp_path / "m.safetensors").write_bytes(data)
    header = read_header(tmp_path / "m.safetensors")
    assert header.metadata == {"format": "pt"}
    assert {name: (info.dtype, info.shape, info.end - info.begin) for name, info in header.tensors.items()} == {
        "a": ("F32", (2, 3), 24), "b": ("F16", (4,), 8), "empty": ("I64", (0, 5), 0)}
    assert read_shapes(tmp_path / "m.safetensors") == {"a": [2, 3], "b": [4], "empty": [0, 5]}


def test_accepts_scalars_zero_sized_tensors_padding_and_any_tensor_order(tmp_path):
    header = {"later": entry(offsets=(4, 28)), "scalar": entry(shape=(), offsets=(0, 4)),
              "none": entry(shape=(0, 7), offsets=(28, 28))}
    path = write(tmp_path / "x.safetensors", json.dumps(header).encode() + b"   ", 28)
    tensors = read_header(path).tensors
    assert tensors["scalar"] == TensorInfo("F32", (), 0, 4)
    assert tensors["later"] == TensorInfo("F32", (2, 3), 4, 28)
    assert tensors["none"].shape == (0, 7)


def test_sub_byte_dtypes_need_whole_bytes(tmp_path):
    assert read_header(write(tmp_path / "ok", {"t": entry("F4", (4,), (0, 2))}, 2)).tensors["t"].dtype == "F4"
    with pytest.raises(SafetensorsError, match="needs 1.5"):
        read_header(write(tmp_path / "odd", {"t": entry("F4", (3,), (0, 2))}, 2))


REFUSALS = [
    (b"\x02\0\0", None, 0, "shorter than 8"),
    (b"{}", 1, 0, "header length 1"),
    (b"{}", MAX_HEADER_BYTES + 1, 0, "outside 2.."),
    (b"{}", 2**63, 0, "outside 2.."),
    (b"{}", 500, 0, "past the end"),
    (b'{"a": 1', None, 0, "invalid JSON"),
    (b"\xef\xbb\xbf{}", None, 0, "invalid JSON"),
    (b'{"\xc3": 1}', None, 0, "not UTF-8"),
    (b"[" * 50_000 + b"]" * 50_000, None, 0, "nested too deeply"),
    (b'{"t": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', None, 4, "integers"),
    (b'"just a string"', None, 0, "not a JSON object"),
    ({"__metadata__": ["format", "pt"]}, None, 0, "__metadata__"),
    ({"__metadata__": {"format": None}}, None, 0, "__metadata__"),
    ({"t": [1, 2]}, None, 0, "exactly dtype, shape and data_offsets"),
    ({"t": {"dtype": "F32", "shape": [1]}}, None, 0, "exactly dtype, shape and data_offsets"),
    ({"t": entry(dtype="f32")}, None, 24, "unknown dtype"),
    ({"t": entry(dtype=4)}, None, 24, "unknown dtype"),
    ({"t": {**entry(), "shape": "2x3"}}, None, 24, "list of at most 64 integers"),
    ({"t": entry(shape=(True, 3))}, None, 24, "list of at most 64 integers"),
    ({"t": entry(shape=(2.0, 3))}, None, 24, "list of at most 64 integers"),
    ({"t": entry(shape=(-2, -3))}, None, 24, "negative"),
    ({"t": entry(shape=(2**31 + 1, 1))}, None, 24, "too large"),
    ({"t": entry(shape=(2**21, 2**21))}, None, 24, "too many elements"),
    ({"t": {**entry(), "data_offsets": [0]}}, None, 24, "two integers"),
    ({"t": entry(offsets=(False, 24))}, None, 24, "two integers"),
    ({"t": entry(offsets=(0.0, 24))}, None, 24, "two integers"),
    ({"t": entry(offsets=(24, 0))}, None, 24, "begin <= end"),
    ({"t": entry(offsets=(-24, 0))}, None, 24, "begin <= end"),
    ({"t": entry(offsets=(0, 20))}, None, 20, "needs 24"),
    ({"t": entry(offsets=(8, 32))}, None, 24, "out of range"),
    ({"a": entry(), "b": entry(offsets=(12, 36))}, None, 36, "'a' and 'b' overlap"),
    ({"a": entry(), "b": entry()}, None, 24, "'a' and 'b' overlap"),
    ({"a": entry(), "b": entry(offsets=(32, 56))}, None, 56, "hole of 8 bytes lies before tensor 'b'"),
    ({"a": entry(offsets=(8, 32))}, None, 32, "hole of 8 bytes lies before tensor 'a'"),
    ({"a": entry()}, None, 30, "hole of 6 bytes lies after the last tensor"),
    ({}, None, 1, "hole of 1 bytes"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', None, 4, "duplicate key 'a'"),
]

# Refused here, though the reference reader would load them.
STRICTER_THAN_REFERENCE = [
    ({"": entry()}, None, 24, "empty name"),
    ({"t": {**entry(), "extra": 1}}, None, 24, "exactly dtype, shape and data_offsets"),
    ({"t": entry(shape=[1] * 65, offsets=(0, 4))}, None, 4, "list of at most 64 integers"),
]


@pytest.mark.parametrize(("header", "length", "data_bytes", "words"), REFUSALS + STRICTER_THAN_REFERENCE)
def test_refusals_name_the_problem(tmp_path, header, length, data_bytes, words):
    path = tmp_path / "weights.safetensors"
    if header == b"\x02\0\0":
        path.write_bytes(header)
    else:
        write(path, header, data_bytes, length=length)
    with pytest.raises(SafetensorsError) as caught:
        read_header(path)
    assert words in str(caught.value) and "weights.safetensors" in str(caught.value)


@pytest.mark.parametrize(("header", "length", "data_bytes", "words"), REFUSALS)
def test_the_reference_library_refuses_the_same_files(tmp_path, header, length, data_bytes, words):
    """Our refusals are the format's rules, not inventions (except STRICTER_THAN_REFERENCE)."""
    safetensors = pytest.importorskip("safetensors")
    path = tmp_path / "weights.safetensors"
    if header == b"\x02\0\0":
        path.write_bytes(header)
    else:
        write(path, header, data_bytes, length=length)
    with pytest.raises(Exception):  # the Rust reader raises one generic error type
        safetensors.deserialize(path.read_bytes())


def test_long_tensor_names_are_cut_in_messages(tmp_path):
    with pytest.raises(SafetensorsError) as caught:
        read_header(write(tmp_path / "w", {"x" * 5000: entry(dtype="Q")}, 24))
    assert "5000 characters" in str(caught.value) and len(str(caught.value)) < 400


def test_unreadable_path_is_a_safetensors_error(tmp_path):
    with pytest.raises(SafetensorsError, match="cannot be read"):
        read_header(tmp_path)


def test_error_pickles():
    error = pickle.loads(pickle.dumps(SafetensorsError("bad header")))
    assert type(error) is SafetensorsError and str(error) == "bad header"


def test_folder_shapes_and_param_count(tmp_path):
    write(tmp_path / "model-00001-of-00002.safetensors", {"a": entry(), "__metadata__": {"format": "pt"}}, 24)
    write(tmp_path / "model-00002-of-00002.safetensors", {"b": entry("F16", (5, 7), (0, 70))}, 70)
    (tmp_path / "notes.txt").write_text("not weights")
    assert read_folder_shapes(tmp_path) == {"a": [2, 3], "b": [5, 7]}
    assert count_folder_params(tmp_path) == 6 + 35
    assert shape_numel([]) == 1 and shape_numel((4, 0, 2)) == 0


def test_folder_reading_validates_every_file(tmp_path):
    write(tmp_path / "model.safetensors", {"a": entry(offsets=(0, 20))}, 20)
    with pytest.raises(SafetensorsError, match="needs 24"):
        count_folder_params(tmp_path)
