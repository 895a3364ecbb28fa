"""`api.replica_directory` over a real migrated database: one read per burst, registered rows win over static."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from api.replica_directory import ReplicaDirectory
from api.upstream_client import close_upstream_client
from core.db import session_scope
from core.replicas import announce_replica
from core.schemas.replicas import ReplicaStatus
from core.settings import get_settings
from tests.support.live_server import live_server
from tests.support.migrated import migrated_database


def _status(url: str, base_model: str = "tiny") -> ReplicaStatus:
    return ReplicaStatus(url=url, base_model=base_model, engine="vllm", state="ready", kinds=["lora"],
                         max_resident_adapters=4, max_batch=8, resident_adapters=["adp-1"], load=3)


def _static_replicas() -> FastAPI:
    app = FastAPI()

    @app.get("/good/status")
    async def good() -> dict:
        return _status("http://its-own-idea-of-its-url", base_model="static-base").model_dump()

    @app.get("/garbled/status")
    async def garbled() -> PlainTextResponse:
        return PlainTextResponse("not a status")

    return app


def _in_loop(coroutine_function):
    async def main():
        try:
            return await coroutine_function()
        finally:
            await close_upstream_client()

    return asyncio.run(main())


def test_a_burst_reads_once_and_registered_rows_win_over_static_entries(tmp_path):
    with live_server(_static_replicas()) as url:
        statics = f"{url}/good,{url}/garbled,{url}/registered"
        with migrated_database(tmp_path, PATCHBAY_INFERENCE_URL=statics):
            with session_scope() as session:
                announce_replica(session, "reg-1", _status(f"{url}/registered"))

            async def burst():
                directory = ReplicaDirectory(get_settings(), cache_seconds=60)
                views = await asyncio.gather(*(directory.replicas() for _ in range(20)))
                return directory.generation, views

            generation, views = _in_loop(burst)
    assert generation == 1 and all(view is views[0] for view in views)
    by_id = {r.id: r for r in views[0]}
    assert sorted(by_id) == ["reg-1", f"static:{url}/good"]
    assert by_id["reg-1"].source == "registered" and by_id["reg-1"].resident_adapters == ["adp-1"]
    static = by_id[f"static:{url}/good"]
    assert static.source == "static" and static.url == f"{url}/good" and static.base_model == "static-base"


def test_the_view_is_read_again_once_its_moment_has_passed(tmp_path):
    with migrated_database(tmp_path):
        async def twice():
            directory = ReplicaDirectory(get_settings(), cache_seconds=1.0)
            first = await directory.replicas()
            with session_scope() as session:
                announce_replica(session, "late", _status("http://late"))
            cached = await directory.replicas()
            await asyncio.sleep(1.1)
            return first, cached, await directory.replicas(), directory.generation

        first, cached, fresh, generation = _in_loop(twice)
    assert first == [] and cached == [] and [r.id for r in fresh] == ["late"] and generation == 2
