"""Tell a store outage (database, broker, storage) from a bug, so that clients hear 503, not 500."""

from __future__ import annotations

import sqlalchemy.exc as sa_exc
from botocore.exceptions import BotoCoreError, ClientError
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class StoreUnavailable(RuntimeError):
    """A store the request needs cannot be reached right now."""


OUTAGES: dict[type[BaseException], str] = {
    sa_exc.OperationalError: "The database is unavailable",
    sa_exc.InterfaceError: "The database is unavailable",
    sa_exc.DisconnectionError: "The database is unavailable",
    sa_exc.TimeoutError: "The database is busy (no connection free)",
    RedisConnectionError: "Redis is unavailable",
    RedisTimeoutError: "Redis is unavailable",
    BrokerError: "The broker is unavailable",
    OSError: "Storage is unavailable",
    BotoCoreError: "Object storage is unavailable",
    ClientError: "Object storage is unavailable",
}
"""Exception types that mean a store is down or saturated, and how clients hear it."""


def store_outage(exc: BaseException) -> str | None:
    """What is unavailable, when `exc` (or what caused it) is a store outage; None for anything else."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, StoreUnavailable):
            return str(exc)
        for kind, message in OUTAGES.items():
            if isinstance(exc, kind):
                return message
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None
