"""Streaming multipart upload: the `file` part goes straight to a destination file, hashed on the way.

Disk writes and hashing run in worker threads, a megabyte at a time, so the event loop only parses.
The body's idle timeout and total size are enforced where it is read (api/edge.py); the `file` part's
own limit here. Checking what was uploaded is the caller's job, after the body is in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

from core.db import session_scope
from core.errors import ApiError, invalid
from core.models import Team
from core.quotas import storage_full, storage_room
from core.settings import Settings
from core.stores import StoreUnavailable

MAX_FIELD_BYTES = 4096
MAX_FILENAME_CHARS = 255
WRITE_BATCH_BYTES = 1024 * 1024


@dataclass
class UploadResult:
    """What the upload stream held."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0
    sha256: str = ""


def _clean_filename(raw: bytes) -> str:
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name:
        return "upload.jsonl"
    if len(name) > MAX_FILENAME_CHARS:
        raise invalid(f"The file name is longer than {MAX_FILENAME_CHARS} characters.", "file", "filename_too_long")
    if any(ord(c) < 32 for c in name) or "\ufffd" in name:
        raise invalid("The file name holds control characters or is not valid UTF-8.", "file", "invalid_filename")
    return name


class _HashedFile:
    """The destination file; every method blocks, so callers run it in a thread."""

    def __init__(self, open_destination: Callable[[], BinaryIO]) -> None:
        self._open = open_destination
        self._out: BinaryIO | None = None
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        if self._out is None:
            self._out = self._open()
        self.hash.update(data)
        self._out.write(data)

    def close(self, create_if_empty: bool, complete: bool = True) -> None:
        """Commit the destination, or, when the body failed, drop it where the destination can (`abort`)."""
        if not complete and hasattr(self._out, "abort"):
            self._out.abort()  # type: ignore[union-attr]
            return
        if self._out is None and create_if_empty:
            self._out = self._open()
        if self._out is not None:
            self._out.close()


class _FormSink:
    """Parser callbacks: `file` bytes collect in a buffer the upload loop flushes; other parts are small fields."""

    def __init__(self, file_limit: int, over_limit: Callable[[int], ApiError]) -> None:
        self.file_limit, self.over_limit = file_limit, over_limit
        self.result = UploadResult()
        self.pending = bytearray()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()
        self._seen_file = False

    def on_part_begin(self) -> None:
        self._headers, self._name, self._value = {}, None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")[:64]
        if self._name == "file":
            if self._seen_file:
                raise invalid("Only one 'file' part may be sent.", "file")
            self._seen_file = True
            self.result.filename = _clean_filename(options.get(b"filename", b""))
        elif len(self.result.fields) >= 16:
            raise invalid("The form has too many fields.", self._name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            self.result.bytes += end - start
            if self.result.bytes > self.file_limit:
                raise self.over_limit(self.result.bytes)
            self.pending += data[start:end]
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise invalid(f"Form field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes.", self._name)

    def on_part_end(self) -> None:
        if self._name and self._name != "file":
            value = self._value.decode("utf-8", "replace")
            if "\x00" in value or "\ufffd" in value:
                raise invalid(f"Form field '{self._name}' holds a NUL character or invalid UTF-8.", self._name,
                              "invalid_characters")
            self.result.fields[self._name] = value


def upload_allowance(team: Team, settings: Settings) -> tuple[int, Callable[[int], ApiError]]:
    """The largest file the team may upload now, and the error past it: the upload limit, or the storage quota."""
    with session_scope() as session:
        quota = storage_room(session, team, settings)
    if quota is None or quota[0] - quota[1] >= settings.max_upload_bytes:
        return settings.max_upload_bytes, too_large(settings.max_upload_bytes)
    limit, used = quota
    return limit - used, lambda size: storage_full(team, limit, used)


def too_large(limit: int) -> Callable[[int], ApiError]:
    """The 413 for a file part over `limit` bytes."""
    return lambda _: ApiError(413, f"The file is larger than the limit of {limit} bytes.", param="file",
                              code="file_too_large")


async def receive_upload(request: Request, open_destination: Callable[[], BinaryIO], *, file_limit: int,
                         over_limit: Callable[[int], ApiError] | None = None) -> UploadResult:
    """Stream a multipart/form-data body: its `file` part is written to `open_destination()`.

    `over_limit(size)` gives the error once the file part passes `file_limit` bytes. On any error the
    destination may hold a partial file: the caller removes it (it owns the key or path).
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise invalid("Send the upload as multipart/form-data with fields 'file' and 'purpose'.", "file")
    sink = _FormSink(file_limit, over_limit or too_large(file_limit))
    callbacks = {name: getattr(sink, name) for name in dir(sink) if name.startswith("on_")}
    parser = MultipartParser(boundary, callbacks)
    destination = _HashedFile(open_destination)
    complete = False
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if len(sink.pending) >= WRITE_BATCH_BYTES:
                await _flush(sink, destination)
        parser.finalize()
        await _flush(sink, destination)
        complete = True
    except ApiError:
        raise
    except StoreUnavailable:
        raise
    except Exception as exc:  # a malformed body from the client
        raise invalid(f"The multipart body could not be parsed: {exc.__class__.__name__}.", "file") from None
    finally:
        await run_in_threadpool(destination.close, sink.result.filename is not None, complete)
    sink.result.sha256 = destination.hash.hexdigest()
    return sink.result


async def _flush(sink: _FormSink, destination: _HashedFile) -> None:
    if sink.pending:
        data, sink.pending = bytes(sink.pending), bytearray()
        await run_in_threadpool(destination.write, data)


def multipart_openapi(fields: dict[str, dict | str], required: list[str]) -> dict:
    """OpenAPI for a streamed multipart body (FastAPI cannot infer it from a raw request).

    Each field is "file" (the upload) or the JSON schema of a text field.
    """
    properties = {name: ({"type": "string", "format": "binary"} if kind == "file" else kind)
                  for name, kind in fields.items()}
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
