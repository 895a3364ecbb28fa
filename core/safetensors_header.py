"""Read and fully validate a safetensors file's header (tensor names, dtypes, shapes, offsets), without torch."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000  # the limit of the reference (Rust) safetensors reader
MAX_DIM = 2**31
MAX_NUMEL = 2**40
MAX_NDIM = 64
# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32,
    "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsError(ValueError):
    """A file that is not valid safetensors."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; `begin`/`end` are byte offsets into the data region."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: every tensor by name, and the string metadata."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def shown(text: str, limit: int = 100) -> str:
    """A client-supplied name as it appears in messages: quoted, cut to about `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate the header of `path`; raise SafetensorsError naming the file and the problem."""
    try:
        with open(path, "rb") as fh:
            file_size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise SafetensorsError(f"{path.name} is not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > MAX_HEADER_BYTES:
                raise SafetensorsError(
                    f"{path.name} is not a safetensors file (header length {length} is outside 2..{MAX_HEADER_BYTES})")
            if length > file_size - 8:
                raise SafetensorsError(
                    f"{path.name} is not a safetensors file (header length {length} runs past the end of the file)")
            raw = fh.read(length)
    except OSError as exc:
        raise SafetensorsError(f"{path.name} cannot be read: {exc.strerror or exc}") from None
    if len(raw) != length:
        raise SafetensorsError(f"{path.name} is not a safetensors file (the file changed while being read)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except RecursionError:
        raise SafetensorsError(f"{path.name} has an unreadable header (JSON nested too deeply)") from None
    except UnicodeDecodeError as exc:
        raise SafetensorsError(f"{path.name} has an unreadable header (not UTF-8: {exc.reason})") from None
    except ValueError as exc:
        raise SafetensorsError(f"{path.name} has an unreadable header (invalid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name} has an invalid header (not a JSON object)")
    metadata = _metadata(path, header.pop("__metadata__", {}))
    tensors = {name: _entry(path, name, entry) for name, entry in header.items()}
    _check_tiling(path, tensors, file_size - 8 - length)
    return SafetensorsHeader(tensors=tensors, metadata=metadata)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a repeated key would silently hide an entry, so refuse it."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {shown(key)}")
        result[key] = value
    return result


def _metadata(path: Path, metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path.name} has an invalid header (__metadata__ must map strings to strings)")
    return metadata


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, name: str, entry: object) -> TensorInfo:
    where = f"{path.name}: tensor {shown(name)}"
    if not name:
        raise SafetensorsError(f"{path.name}: a tensor has an empty name")
    if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
        fields = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise SafetensorsError(f"{where} must have exactly dtype, shape and data_offsets (found {fields})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise SafetensorsError(f"{where} has unknown dtype {shown(str(dtype))}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) for d in shape):
        raise SafetensorsError(f"{where}: shape must be a list of at most {MAX_NDIM} integers")
    if any(d < 0 for d in shape):
        raise SafetensorsError(f"{where}: shape {shape} has a negative dimension")
    if any(d > MAX_DIM for d in shape):
        raise SafetensorsError(f"{where}: shape {shape} has a dimension too large (over {MAX_DIM})")
    numel = shape_numel(shape)
    if numel > MAX_NUMEL:
        raise SafetensorsError(f"{where}: shape {shape} holds too many elements (over {MAX_NUMEL})")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
        raise SafetensorsError(f"{where}: data_offsets must be two integers")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{where}: data_offsets {offsets} are not 0 <= begin <= end")
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise SafetensorsError(
            f"{where}: data_offsets {offsets} span {end - begin} bytes, but {dtype} {shape} needs {bits / 8:g}")
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_bytes: int) -> None:
    """The format requires the tensors to cover the data region exactly, without overlap or hole."""
    cursor, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.end > data_bytes:
            raise SafetensorsError(
                f"{path.name}: tensor {shown(name)} data_offsets [{info.begin}, {info.end}] are out of range "
                f"(the data region holds {data_bytes} bytes)")
        if info.begin < cursor:
            raise SafetensorsError(f"{path.name}: tensors {shown(previous)} and {shown(name)} overlap")
        if info.begin > cursor:
            raise SafetensorsError(
                f"{path.name}: a hole of {info.begin - cursor} bytes lies before tensor {shown(name)}")
        cursor, previous = info.end, name
    if cursor != data_bytes:
        raise SafetensorsError(
            f"{path.name}: a hole of {data_bytes - cursor} bytes lies after the last tensor (data not covered)")


def read_shapes(path: Path) -> dict[str, list[int]]:
    """Map every tensor name in the file to its shape (the header is fully validated)."""
    return {name: list(info.shape) for name, info in read_header(path).tensors.items()}


def read_folder_shapes(folder: Path) -> dict[str, list[int]]:
    """Shapes of every tensor in every safetensors file of a model folder."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update(read_shapes(path))
    return shapes


def shape_numel(shape: list[int] | tuple[int, ...]) -> int:
    """How many elements a tensor of this shape holds."""
    total = 1
    for dim in shape:
        total *= dim
    return total


def count_folder_params(folder: Path) -> int:
    """How many parameters the safetensors files of a model folder hold (a tied weight stored once counts once)."""
    return sum(shape_numel(shape) for shape in read_folder_shapes(folder).values())
