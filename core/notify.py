"""Registry announcements: inference servers learn of new versions and moved aliases.

With a Redis broker they arrive at once over pub/sub; otherwise servers poll the
alias history table (`changes_since`).
"""

from __future__ import annotations

import json
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.models import AdapterAliasEvent
from core.settings import get_settings

CHANNEL = "patchbay:registry"
log = logging.getLogger("patchbay.notify")


def redis_url() -> str | None:
    """The Redis URL announcements travel over, when the broker is Redis."""
    url = get_settings().resolved_broker_url
    return url if url.startswith(("redis://", "rediss://")) else None


def announce(kind: str, **payload) -> None:
    """Publish a registry change; best effort (pollers catch up regardless)."""
    url = redis_url()
    if url is None:
        return
    try:
        import redis

        client = redis.Redis.from_url(url)
        client.publish(CHANNEL, json.dumps({"kind": kind, **payload}))
        client.close()
    except Exception:
        log.warning("could not announce %s", kind, exc_info=True)


def changes_since(session: Session, last_id: int) -> list[AdapterAliasEvent]:
    """Alias moves after event id `last_id`, oldest first (the polling path)."""
    return list(session.scalars(select(AdapterAliasEvent).where(AdapterAliasEvent.id > last_id)
                                .order_by(AdapterAliasEvent.id)))
