"""Liveness and readiness probes (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import select, text
from starlette.concurrency import run_in_threadpool

from api.fleet import get_fleet
from core.db import get_engine, session_scope
from core.models import BaseModelRecord
from core.queue import get_celery
from core.schemas.replicas import ReplicaPublic
from core.storage import get_storage
from core.stores import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict:
    """The process is up."""
    return {"status": "ok"}


def _store_checks() -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # report, never raise: this is a probe
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        with get_celery().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {exc.__class__.__name__}"
    try:
        get_storage().check()
        checks["storage"] = "ok"
    except Exception as exc:  # StorageUnavailable names the reason; anything else by its type
        checks["storage"] = f"error: {exc}" if isinstance(exc, StoreUnavailable) else f"error: {exc.__class__.__name__}"
    return checks


def _base_model_ids() -> list[str]:
    with session_scope() as session:
        return list(session.scalars(select(BaseModelRecord.id).order_by(BaseModelRecord.id)))


def serving_state(base_model: str, replicas: list[ReplicaPublic]) -> str:
    """'ok' when a live replica of the base is ready, 'loading' when one is starting, else 'no replica'."""
    states = {r.state for r in replicas if r.base_model == base_model}
    return "ok" if "ready" in states else "loading" if states else "no replica"


@router.get("/readyz", responses={503: {"description": "The database, the broker or storage is unreachable; see "
                                                     "Retry-After."}})
async def readyz() -> JSONResponse:
    """The database, the broker and storage are reachable; also how each registered base model is served.

    The status code depends on the database, the broker and storage only: a base model without a ready replica
    shows in `base_models` (`ok`, `loading` or `no replica`) but leaves the API ready, since every other
    route still works and replicas come and go on their own.
    """
    checks = await run_in_threadpool(_store_checks)
    ready = all(v == "ok" for v in checks.values())
    body: dict = {"status": "ok" if ready else "unavailable", "checks": checks}
    if checks["database"] == "ok":
        try:
            base_models = await run_in_threadpool(_base_model_ids)
            replicas = await get_fleet().replicas()
            body["base_models"] = {base: serving_state(base, replicas) for base in base_models}
        except Exception as exc:  # a probe reports, never raises
            body["base_models_error"] = exc.__class__.__name__
    return JSONResponse(body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"})
