"""An in-process API over a fresh SQLite database, for fast request-level tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient


def clear_caches() -> None:
    """Forget cached settings, engines and the Celery app (after changing PATCHBAY_* env)."""
    from core.db import get_engine, get_sessionmaker
    from core.queue import get_celery
    from core.settings import get_settings
    from core.storage import _s3

    for cached in (get_settings, get_engine, get_sessionmaker, get_celery, _s3):
        cached.cache_clear()


@dataclass
class ApiHarness:
    """A TestClient plus keys for two teams."""

    client: TestClient
    key: str
    other_key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def _serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model_dir: Path, database_url: str | None,
           **env: str) -> Iterator[ApiHarness]:
    monkeypatch.setenv("PATCHBAY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PATCHBAY_RUN_DISPATCHER", "false")
    monkeypatch.setenv("PATCHBAY_MAX_UPLOAD_BYTES", str(1024 * 1024))
    for name in ("PATCHBAY_DATABASE_URL", "PATCHBAY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    if database_url:
        monkeypatch.setenv("PATCHBAY_DATABASE_URL", database_url)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    clear_caches()
    from api.main import create_app
    from core.auth import create_api_key, create_team
    from core.base_models import register_base_model
    from core.db import session_scope
    from core.migrate import upgrade_head

    upgrade_head()
    with session_scope() as session:
        key = create_api_key(session, create_team(session, "acme"))
        other = create_api_key(session, create_team(session, "globex"))
        register_base_model(session, "tiny-llama", model_dir)
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            yield ApiHarness(client=client, key=key, other_key=other)
    finally:
        clear_caches()


@pytest.fixture
def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> Iterator[ApiHarness]:
    """The API on SQLite with teams `acme` and `globex` and the tiny model as `tiny-llama`."""
    yield from _serve(tmp_path, monkeypatch, tiny_model_dir, None)


@pytest.fixture(params=["sqlite", "postgres"])
def api_on_both(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                tiny_model_dir: Path) -> Iterator[ApiHarness]:
    """The same API, once on SQLite and once on a fresh Postgres database."""
    url = request.getfixturevalue("fresh_postgres_url") if request.param == "postgres" else None
    yield from _serve(tmp_path, monkeypatch, tiny_model_dir, url)


@pytest.fixture
def api_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path):
    """A factory: the API on SQLite with extra PATCHBAY_* settings, e.g. `api_with(TEAM_MAX_QUEUED_JOBS="2")`."""
    harnesses = []

    def start(**settings: str) -> ApiHarness:
        generator = _serve(tmp_path, monkeypatch, tiny_model_dir, None,
                           **{f"PATCHBAY_{name}": value for name, value in settings.items()})
        harnesses.append(generator)
        return next(generator)

    yield start
    for generator in harnesses:
        generator.close()
