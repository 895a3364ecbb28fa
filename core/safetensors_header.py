"""Read a safetensors file's tensor names and shapes from its header, without torch."""

from __future__ import annotations

import json
import struct
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A file that is not valid safetensors."""


def read_shapes(path: Path) -> dict[str, list[int]]:
    """Map every tensor name in the file to its shape."""
    with open(path, "rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise SafetensorsError(f"{path.name} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length <= 0 or length > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{path.name} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name} is not a safetensors file (header is not an object)")
    return {name: list(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def read_folder_shapes(folder: Path) -> dict[str, list[int]]:
    """Shapes of every tensor in every safetensors file of a model folder."""
    shapes: dict[str, list[int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update(read_shapes(path))
    return shapes


def shape_numel(shape: list[int]) -> int:
    """How many elements a tensor of this shape holds."""
    total = 1
    for dim in shape:
        total *= dim
    return total


def count_folder_params(folder: Path) -> int:
    """How many parameters the safetensors files of a model folder hold (a tied weight stored once counts once)."""
    return sum(shape_numel(shape) for shape in read_folder_shapes(folder).values())
