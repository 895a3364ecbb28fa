"""A dataset's first lines and its invalid lines, each with the validator's verdict (the console's preview)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from core.datasets import ReportBuilder, skip_rest_of_line

if TYPE_CHECKING:
    from core.storage import Storage

MAX_PREVIEW_CHARS = 4000
"""A previewed line is cut after this many characters."""


@dataclass
class PreviewLine:
    """One line as the file holds it, and why it is invalid (None when it is fine)."""

    line: int
    text: str
    error: str | None


@dataclass
class FilePreview:
    """The first `rows` of a file and up to `max_invalid` of its invalid lines."""

    rows: list[PreviewLine] = field(default_factory=list)
    invalid_rows: list[PreviewLine] = field(default_factory=list)
    truncated: bool = False


def _shown(raw: bytes) -> str:
    return raw[: MAX_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")[:MAX_PREVIEW_CHARS]


def preview_file(path: str | Path, max_line_bytes: int, first: int, max_invalid: int) -> FilePreview:
    """Read until the first `first` lines and `max_invalid` invalid lines are found (or the file ends).

    Lines are judged by the upload validator itself, so the numbers and reasons match the file's errors.
    """
    with open(path, "rb") as fh:
        return preview_stream(fh, max_line_bytes, first, max_invalid)


def preview_stored(storage: Storage, key: str, max_line_bytes: int, first: int, max_invalid: int) -> FilePreview:
    """`preview_file` of a stored object, read as a stream (on S3 only as far as the preview needs)."""
    with storage.open_read(key) as fh:
        return preview_stream(fh, max_line_bytes, first, max_invalid)


def preview_stream(fh: BinaryIO, max_line_bytes: int, first: int, max_invalid: int) -> FilePreview:
    """`preview_file` over a buffered binary stream."""
    builder, preview = ReportBuilder(), FilePreview()
    while raw := fh.readline(max_line_bytes + 1):
        errors_before = builder.report.n_errors
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            skip_rest_of_line(fh)
            builder.refuse_line(f"longer than the limit of {max_line_bytes} bytes")
        else:
            raw = raw.rstrip(b"\r\n")
            builder.feed(raw)
        error = builder.last_error if builder.report.n_errors > errors_before else None
        line = PreviewLine(builder.line_no, _shown(raw), error)
        if line.line <= first:
            preview.rows.append(line)
        if error is not None and len(preview.invalid_rows) < max_invalid:
            preview.invalid_rows.append(line)
        if line.line >= first and len(preview.invalid_rows) >= max_invalid:
            preview.truncated = bool(fh.read(1))
            break
    return preview
