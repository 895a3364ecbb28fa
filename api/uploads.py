"""Streaming multipart upload: chunks go straight to storage, hashed and validated line by line."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from core.datasets import ReportBuilder, ValidationReport
from core.errors import ApiError, invalid
from core.storage import LocalStorage

MAX_FIELD_BYTES = 4096


@dataclass
class UploadResult:
    """What the upload stream held."""

    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0
    sha256: str = ""
    report: ValidationReport | None = None


class _LineValidator:
    """Splits a byte stream into lines and validates each as it completes."""

    def __init__(self) -> None:
        self.builder = ReportBuilder()
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        data = self._pending + chunk
        *lines, self._pending = data.split(b"\n")
        for line in lines:
            self.builder.feed(line.rstrip(b"\r"))

    def finish(self) -> ValidationReport:
        if self._pending:
            self.builder.feed(self._pending.rstrip(b"\r"))
        return self.builder.report


class _FormSink:
    """Parser callbacks: the `file` part streams to storage, other parts are small fields."""

    def __init__(self, storage: LocalStorage, key: str, limit: int, validate_lines: bool) -> None:
        self.storage, self.key, self.limit = storage, key, limit
        self.result = UploadResult()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()
        self._out = None
        self._hash = hashlib.sha256()
        self._lines = _LineValidator() if validate_lines else None

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
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == "file":
            if self._out is not None:
                raise invalid("Only one 'file' part may be sent.", "file")
            self.result.filename = options.get(b"filename", b"upload.jsonl").decode("utf-8", "replace")
            self._out = self.storage.open_write(self.key)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._name == "file":
            self.result.bytes += len(chunk)
            if self.result.bytes > self.limit:
                raise ApiError(413, f"The file is larger than the limit of {self.limit} bytes.", param="file",
                               code="file_too_large")
            self._hash.update(chunk)
            if self._lines:
                self._lines.feed(chunk)
            self._out.write(chunk)
        else:
            self._value += chunk
            if len(self._value) > MAX_FIELD_BYTES:
                raise invalid(f"Form field '{self._name}' is too long.", self._name)

    def on_part_end(self) -> None:
        if self._name and self._name != "file":
            self.result.fields[self._name] = self._value.decode("utf-8", "replace")

    def close(self) -> UploadResult:
        if self._out is not None:
            self._out.close()
            self.result.sha256 = self._hash.hexdigest()
            self.result.report = self._lines.finish() if self._lines else None
        return self.result

    def abort(self) -> None:
        if self._out is not None:
            self._out.close()
        self.storage.delete(self.key)


async def receive_upload(request: Request, storage: LocalStorage, key: str, limit: int,
                         validate_lines: bool = True) -> UploadResult:
    """Stream a multipart/form-data body: its `file` part lands at `key` in storage.

    With `validate_lines`, the file is also checked as a JSONL dataset while it streams.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise ApiError(413, f"The request body is larger than the limit of {limit} bytes.", code="file_too_large")
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise invalid("Send the upload as multipart/form-data with fields 'file' and 'purpose'.", "file")
    sink = _FormSink(storage, key, limit, validate_lines)
    callbacks = {name: getattr(sink, name) for name in dir(sink) if name.startswith("on_")}
    parser = MultipartParser(boundary, callbacks)
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except ApiError:
        sink.abort()
        raise
    except Exception as exc:  # a malformed body from the client
        sink.abort()
        raise invalid(f"The multipart body could not be parsed: {exc}", "file") from None
    return sink.close()


def multipart_openapi(fields: dict[str, str], required: list[str]) -> dict:
    """OpenAPI for a streamed multipart body (FastAPI cannot infer it from a raw request)."""
    properties = {name: ({"type": "string", "format": "binary"} if kind == "file" else {"type": "string"})
                  for name, kind in fields.items()}
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}
