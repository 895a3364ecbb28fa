"""Registry announcements: inference servers learn of every registry change.

Each change in core/registry.py writes a row of the change feed (`RegistryChange`) in its own
transaction and calls `announce_on_commit`. When that transaction commits, the change is published
on Redis pub/sub (best effort, and only when the broker is Redis); when it rolls back, nothing is.
Servers read the feed itself (`changes_since`): at once when a message wakes them, otherwise every
`registry_poll_seconds`. Both paths therefore see the same changes, in commit order.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session, SessionTransaction

from core.models import RegistryChange
from core.settings import get_settings

CHANNEL = "patchbay:registry"
_PENDING = "patchbay.registry_announcements"  # key in Session.info: payloads waiting for the commit
log = logging.getLogger("patchbay.notify")


def redis_url() -> str | None:
    """The Redis URL announcements travel over, when the broker is Redis."""
    url = get_settings().resolved_broker_url
    return url if url.startswith(("redis://", "rediss://")) else None


def change_payload(row: RegistryChange) -> dict[str, Any]:
    """A feed row as the JSON object that pub/sub carries and pollers read."""
    return {"id": row.id, "kind": row.kind, "team_id": row.team_id, "adapter_id": row.adapter_id,
            "name": row.name, "version": row.version, "alias": row.alias,
            "previous_adapter_id": row.previous_adapter_id}


def publish(payload: dict[str, Any]) -> None:
    """Publish one change on pub/sub now; best effort (servers catch up from the feed regardless)."""
    url = redis_url()
    if url is None:
        return
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.publish(CHANNEL, json.dumps(payload))
        finally:
            client.close()
    except Exception:
        log.warning("could not announce %s", payload.get("kind"), exc_info=True)


def announce_on_commit(session: Session, row: RegistryChange) -> None:
    """Publish the (flushed) feed row once `session` commits; a rollback drops it."""
    session.info.setdefault(_PENDING, []).append(change_payload(row))


@event.listens_for(Session, "after_commit")
def _publish_committed(session: Session) -> None:
    for payload in session.info.pop(_PENDING, []):
        publish(payload)


@event.listens_for(Session, "after_transaction_end")
def _drop_uncommitted(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:  # the outermost transaction ended without a commit (after_commit ran first)
        session.info.pop(_PENDING, None)


def changes_since(session: Session, last_id: int) -> list[dict[str, Any]]:
    """Feed changes after id `last_id`, oldest first, as `change_payload` objects."""
    rows = session.scalars(select(RegistryChange).where(RegistryChange.id > last_id).order_by(RegistryChange.id))
    return [change_payload(row) for row in rows]


def latest_change_id(session: Session) -> int:
    """The newest feed id (0 when the feed is empty): where a new follower starts."""
    return session.scalar(select(func.max(RegistryChange.id))) or 0
