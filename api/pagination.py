"""Cursor paging for list endpoints: newest first, `after=<id>` and `limit`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Query
from sqlalchemy import Select, and_, or_, select
from sqlalchemy.orm import Session

MAX_LIMIT = 100
After = Annotated[str | None, Query(max_length=64, description="the id of the last item of the previous page")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")]


def page_newest_first(session: Session, query: Select, model, after: str | None, limit: int) -> tuple[list, bool]:
    """Rows of `query` ordered newest first, starting after the row with id `after` (`Limit` bounds `limit`)."""
    if after:
        cursor = session.execute(select(model.created_at, model.id).where(model.id == after)).first()
        if cursor is not None:
            created, cursor_id = cursor
            query = query.where(
                or_(model.created_at < created, and_(model.created_at == created, model.id < cursor_id))
            )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
