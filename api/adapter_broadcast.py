"""Runtime adapter loading: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter` on every replica of its base."""

from __future__ import annotations

import asyncio
import json

import httpx
from pydantic import BaseModel

from api.fleet import get_fleet, kind_unserved, no_replica
from api.replica_routing import shortlist
from api.upstream_client import upstream_client
from core.schemas.inference import AdapterRef, InternalLoadAdapter, InternalUnloadAdapter
from core.schemas.replicas import ReplicaPublic


async def broadcast(path: str, body: BaseModel, replicas: list[ReplicaPublic]) -> list[dict]:
    """POST `body` to each of `replicas` at once; returns each one's answer, in their order."""
    return list(await asyncio.gather(*(_post(replica, path, body) for replica in replicas)))


async def _post(replica: ReplicaPublic, path: str, body: BaseModel) -> dict:
    answer = {"replica": replica.url, "replica_id": replica.id}
    try:
        response = await upstream_client().post(f"{replica.url}{path}", json=body.model_dump(mode="json"))
        return {**answer, "status": response.status_code, "body": response.json()}
    except (httpx.TransportError, json.JSONDecodeError) as exc:
        return {**answer, "status": 503, "body": {"error": str(exc) or exc.__class__.__name__}}


async def load_everywhere(adapter: AdapterRef, pinned: bool = True) -> list[dict]:
    """Load (and pin) `adapter` on every live replica of its base that serves its kinds.

    503 `no_replica` when its base has no live replica, 400 `adapter_kind_unserved` when none serves it.
    """
    fleet = get_fleet()
    short = shortlist(await fleet.replicas(), adapter.base_model, adapter.kinds)
    if not short.of_base:
        raise no_replica(adapter.base_model)
    targets = short.ready + short.starting
    if not targets:
        raise kind_unserved(adapter.base_model, adapter.kinds, short)
    answers = await broadcast("/internal/adapters/load", InternalLoadAdapter(adapter=adapter, pinned=pinned), targets)
    for replica, answer in zip(targets, answers):
        if answer["status"] == 200:
            fleet.tracker.place(replica, adapter.id)
    return answers


async def unload_everywhere(adapter: AdapterRef) -> list[dict]:
    """Unpin and unload `adapter` on every live replica of its base (none live: nothing to do)."""
    fleet = get_fleet()
    targets = [replica for replica in await fleet.replicas() if replica.base_model == adapter.base_model]
    for replica in targets:
        fleet.tracker.unplace(replica.id, adapter.id)
    return await broadcast("/internal/adapters/unload", InternalUnloadAdapter(adapter_id=adapter.id), targets)
