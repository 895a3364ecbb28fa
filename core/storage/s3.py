"""Storage in an S3-compatible bucket (AWS S3, SeaweedFS, MinIO, ...) through boto3.

Objects live at `<prefix>/<key>`. A folder is its files under `<prefix>/<key>/` plus a marker object
(`DIR_MARKER`, listing the files) written last: readers, `exists` and `get_dir` go by the marker, so a
half-uploaded checkpoint or adapter is invisible. Writes stream as multipart uploads of `part_bytes`.
Credentials and region come from boto3's usual sources (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_REGION, ...). Failures to reach the store become `StorageUnavailable` (503), a missing key `StorageError`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from core.storage.base import CHUNK_BYTES, DIR_MARKER, StorageError, StorageUnavailable, checked_key
from core.storage.cache import DownloadCache

PART_BYTES = 8 * 1024 * 1024
MISSING = {"404", "NoSuchKey", "NotFound"}


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


@contextmanager
def _translated(what: str):
    """Turn botocore's errors into ours: a missing key is StorageError, anything else StorageUnavailable."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        if _code(exc) in MISSING:
            raise StorageError(f"no object at {what!r}") from exc
        raise StorageUnavailable(f"Object storage is unavailable ({_code(exc) or exc.__class__.__name__})") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"Object storage is unavailable ({exc.__class__.__name__})") from exc


def _current_credentials() -> dict[str, str]:
    """The standard AWS_* credentials of this process, as boto3 Session arguments (empty when unset)."""
    names = {"aws_access_key_id": "AWS_ACCESS_KEY_ID", "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
             "aws_session_token": "AWS_SESSION_TOKEN", "region_name": "AWS_REGION"}
    return {arg: os.environ[env] for arg, env in names.items() if os.environ.get(env)}


class S3Storage:
    """Storage in `bucket` under `prefix`, fetched objects cached in `cache` (see the module docstring)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None, cache: DownloadCache,
                 part_bytes: int = PART_BYTES) -> None:
        self.bucket, self.prefix, self.endpoint_url = bucket, prefix.strip("/"), endpoint_url
        self.cache, self.part_bytes = cache, part_bytes
        self._client = None

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix})"

    def __getstate__(self) -> dict:
        """Picklable for the checker processes: the client is made again there, with this process's credentials
        (a long-lived checker process may have started before they were set or rotated)."""
        return {**self.__dict__, "_client": None, "_credentials": _current_credentials()}

    @property
    def client(self):
        """The boto3 S3 client (made on first use)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=3, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"},
                            s3={"addressing_style": "path"})
            # A session of its own: boto3's default one keeps the credentials it first found.
            session = boto3.session.Session(**(getattr(self, "_credentials", None) or {}))
            self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def _full(self, key: str) -> str:
        checked_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _transfer(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.part_bytes, multipart_chunksize=self.part_bytes,
                              max_concurrency=4)

    def _has_object(self, full: str) -> bool:
        try:
            with _translated(full):
                self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except StorageError:
            return False

    def _manifest(self, key: str) -> list[str]:
        with _translated(key):
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self._full(key)}/{DIR_MARKER}")["Body"]
            return json.loads(body.read())["files"]

    def _listing(self, full_prefix: str) -> Iterator[dict]:
        with _translated(full_prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full_prefix)
            for page in pages:
                yield from page.get("Contents", [])

    def open_write(self, key: str) -> BinaryIO:
        """A multipart upload to `key`: parts go out as they fill, close completes, abort drops it."""
        return MultipartWriter(self, self._full(key))  # type: ignore[return-value]

    def open_read(self, key: str) -> BinaryIO:
        """The object's body, streamed and buffered."""
        with _translated(key):
            body = self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"]
        return io.BufferedReader(_BodyReader(body), CHUNK_BYTES)  # type: ignore[return-value]

    def iter_bytes(self, key: str) -> Iterator[bytes]:
        """The object's body in chunks (requested at once)."""
        fh = self.open_read(key)

        def chunks() -> Iterator[bytes]:
            with fh, _translated(key):
                while chunk := fh.read(CHUNK_BYTES):
                    yield chunk
        return chunks()

    def exists(self, key: str) -> bool:
        """Whether `key` is an object or a complete folder."""
        full = self._full(key)
        return self._has_object(full) or self._has_object(f"{full}/{DIR_MARKER}")

    def put_dir(self, key: str, source: Path) -> None:
        """Upload the folder's files, then its marker: until then readers see no folder at `key`."""
        full = self._full(key)
        self.delete(key)
        files = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        with _translated(key):
            for name in files:
                self.client.upload_file(str(source / name), self.bucket, f"{full}/{name}", Config=self._transfer())
            self.client.put_object(Bucket=self.bucket, Key=f"{full}/{DIR_MARKER}",
                                   Body=json.dumps({"files": files}).encode())

    def get_dir(self, key: str, dest: Path) -> Path:
        """Download the files the folder's marker lists into `dest`."""
        try:
            files = self._manifest(key)
        except StorageError:
            raise StorageError(f"no folder at {key!r}") from None
        full = self._full(key)
        with _translated(key):
            for name in files:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, f"{full}/{name}", str(target), Config=self._transfer())
        return dest

    def local_dir(self, key: str, scratch: Path) -> Path:
        """A copy of the folder under `scratch`."""
        return self.get_dir(key, scratch / key.rsplit("/", 1)[-1])

    def local_copy(self, key: str, sha256: str | None = None) -> Path:
        """A cached download of the object, checked against `sha256` when given."""
        full = self._full(key)

        def download(path: Path) -> None:
            with _translated(key):
                self.client.download_file(self.bucket, full, str(path), Config=self._transfer())
        return self.cache.get(f"{self.bucket}/{full}", download, sha256)

    def _copy(self, source: str, target: str) -> None:
        self.client.copy({"Bucket": self.bucket, "Key": source}, self.bucket, target, Config=self._transfer())

    def rename(self, source: str, target: str) -> None:
        """Copy, then delete the source; a folder's marker is copied last, so the target appears whole."""
        src, dst = self._full(source), self._full(target)
        with _translated(source):
            if self._has_object(src):
                self._copy(src, dst)
                self.client.delete_object(Bucket=self.bucket, Key=src)
                return
        files = self._manifest(source)
        self.delete(target)
        with _translated(source):
            for name in [*files, DIR_MARKER]:
                self._copy(f"{src}/{name}", f"{dst}/{name}")
        self.delete(source)

    def children(self, prefix: str) -> list[tuple[str, float]]:
        """The keys directly under `prefix` (objects and folders, complete or not), with their newest mtime."""
        full = self._full(prefix) + "/"
        newest: dict[str, float] = {}
        for item in self._listing(full):
            name = item["Key"][len(full):].split("/", 1)[0]
            stamp = item["LastModified"].timestamp()
            newest[name] = max(newest.get(name, stamp), stamp)
        return [(f"{prefix.rstrip('/')}/{name}", stamp) for name, stamp in newest.items()]

    def delete(self, key: str) -> None:
        """Remove the object and everything under `key/`, the folder's marker first."""
        full = self._full(key)
        with _translated(key):
            self.client.delete_object(Bucket=self.bucket, Key=f"{full}/{DIR_MARKER}")
            self.client.delete_object(Bucket=self.bucket, Key=full)
            batch: list[dict] = []
            for item in self._listing(full + "/"):
                batch.append({"Key": item["Key"]})
                if len(batch) == 1000:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
                    batch = []
            if batch:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def create_bucket(self) -> None:
        """Create the bucket unless it exists (for a fresh deployment; `check` never creates it)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket"):
                return  # check() names the reason
            with _translated(self.bucket):
                self.client.create_bucket(Bucket=self.bucket)
        except BotoCoreError:
            return

    def check(self) -> None:
        """The bucket exists and our credentials may use it."""
        from botocore.exceptions import BotoCoreError, ClientError

        where = f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _code(exc)
            reason = {"404": "the bucket does not exist", "NoSuchBucket": "the bucket does not exist",
                      "403": "access denied (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"}.get(code, code)
            raise StorageUnavailable(f"Object storage {where}: {reason}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"Object storage {where} is unreachable: {exc}") from exc


class _BodyReader(io.RawIOBase):
    """A raw stream over botocore's StreamingBody, so io.BufferedReader can give readline(limit)."""

    def __init__(self, body) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


class MultipartWriter(io.RawIOBase):
    """Bytes written go to S3 in parts of `part_bytes`; at most one part is held in memory."""

    def __init__(self, storage: S3Storage, full_key: str) -> None:
        self.storage, self.key = storage, full_key
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict] = []
        self.done = False

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.buffer += data
        while len(self.buffer) >= self.storage.part_bytes:
            part = bytes(self.buffer[: self.storage.part_bytes])
            del self.buffer[: self.storage.part_bytes]
            self._upload_part(part)
        return len(data)

    def _upload_part(self, part: bytes) -> None:
        client, bucket = self.storage.client, self.storage.bucket
        try:
            with _translated(self.key):
                if self.upload_id is None:
                    self.upload_id = client.create_multipart_upload(Bucket=bucket, Key=self.key)["UploadId"]
                number = len(self.parts) + 1
                etag = client.upload_part(Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                                          PartNumber=number, Body=part)["ETag"]
            self.parts.append({"PartNumber": number, "ETag": etag})
        except BaseException:
            self.abort()
            raise

    def close(self) -> None:
        """Complete the upload (a small object goes in one request)."""
        if self.done:
            return super().close()
        client, bucket = self.storage.client, self.storage.bucket
        try:
            if self.upload_id is None:
                with _translated(self.key):
                    client.put_object(Bucket=bucket, Key=self.key, Body=bytes(self.buffer))
            else:
                if self.buffer:
                    self._upload_part(bytes(self.buffer))
                with _translated(self.key):
                    client.complete_multipart_upload(Bucket=bucket, Key=self.key, UploadId=self.upload_id,
                                                     MultipartUpload={"Parts": self.parts})
        except BaseException:
            self.abort()
            raise
        finally:
            self.done, self.buffer = True, bytearray()
            super().close()

    def abort(self) -> None:
        """Drop the upload and its parts; nothing appears at the key."""
        if self.upload_id is not None and not self.done:
            try:
                self.storage.client.abort_multipart_upload(Bucket=self.storage.bucket, Key=self.key,
                                                           UploadId=self.upload_id)
            except Exception:  # the store's own lifecycle removes what an abort could not
                pass
        self.done, self.buffer = True, bytearray()
        super().close()

    def __del__(self) -> None:  # a writer dropped without close() must not publish a partial object
        if not self.done:
            self.abort()

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()
        else:
            self.close()
