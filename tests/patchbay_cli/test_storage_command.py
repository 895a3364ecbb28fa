"""`patchbay storage check`: says why storage is unusable, and creates a missing bucket when asked."""

from __future__ import annotations

import secrets

from typer.testing import CliRunner

from core.settings import get_settings
from patchbay_cli import app


def test_check_names_the_missing_bucket_then_creates_it(s3_server, s3_env, monkeypatch, tmp_path):
    bucket = f"fresh-{secrets.token_hex(4)}"
    monkeypatch.setenv("PATCHBAY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("PATCHBAY_STORAGE_URL", f"s3://{bucket}/p")
    monkeypatch.setenv("PATCHBAY_S3_ENDPOINT_URL", s3_server.endpoint)
    get_settings.cache_clear()
    try:
        refused = CliRunner().invoke(app, ["storage", "check"])
        assert refused.exit_code == 2 and "the bucket does not exist" in refused.output
        created = CliRunner().invoke(app, ["storage", "check", "--create-bucket"])
        assert created.exit_code == 0, created.output
        assert "storage ok" in created.output
        s3_server.client().head_bucket(Bucket=bucket)
    finally:
        get_settings.cache_clear()


def test_check_passes_on_local_storage(monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHBAY_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("PATCHBAY_STORAGE_URL", raising=False)
    get_settings.cache_clear()
    try:
        done = CliRunner().invoke(app, ["storage", "check"])
        assert done.exit_code == 0 and "LocalStorage" in done.output
    finally:
        get_settings.cache_clear()
