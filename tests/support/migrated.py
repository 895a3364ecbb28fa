"""A database migrated by Patchbay's own migrations, used through its own engine and settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def migrated_database(data_dir: Path, database_url: str | None = None, broker_url: str | None = None,
                      **env: str) -> Iterator[None]:
    """Point PATCHBAY_* at a new data dir and the given stores (default: the embedded SQLite ones) plus any
    extra `PATCHBAY_*` settings in `env`, migrate to head, and forget the cached settings afterwards."""
    from core.migrate import upgrade_head
    from tests.support.api_app import clear_caches

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATCHBAY_DATA_DIR", str(data_dir))
        for name, value in (("PATCHBAY_DATABASE_URL", database_url), ("PATCHBAY_BROKER_URL", broker_url)):
            if value:
                patch.setenv(name, value)
            else:
                patch.delenv(name, raising=False)
        patch.delenv("PATCHBAY_STORAGE_DIR", raising=False)
        for name, value in env.items():
            patch.setenv(name, value)
        clear_caches()
        upgrade_head()
        try:
            yield
        finally:
            clear_caches()
