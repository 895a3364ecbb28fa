"""Database engine and sessions. The schema itself comes only from Alembic (migrations/)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from core.settings import get_settings


def make_engine(url: str, pool_timeout: float | None = None, *, pooled: bool = True) -> Engine:
    """An engine tuned for the backend: WAL and a busy timeout on SQLite, pre-ping on servers.

    A request waits at most `pool_timeout` seconds for a free connection; then it fails (and the API
    answers 503) rather than queueing without bound. `pooled=False` opens a connection per use (for a
    thread in a process that forks, so no child inherits an open connection).
    """
    sqlite = url.startswith("sqlite")
    if pooled:
        # SQLite connections are cheap; its pool only bounds how many threads wait on its one writer.
        pooling = {"pool_size": 20 if sqlite else 10, "max_overflow": 20 if sqlite else 10,
                   "pool_timeout": pool_timeout if pool_timeout is not None else get_settings().db_pool_timeout_seconds}
    else:
        pooling = {"poolclass": NullPool}
    if not sqlite:
        return create_engine(url, pool_pre_ping=True, **pooling)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pooling)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


@lru_cache
def get_engine() -> Engine:
    """The process-wide engine for the configured database."""
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    """The process-wide session factory."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
