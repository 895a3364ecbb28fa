"""The API routing to a fleet of real stand-in replicas (registered in a real database, or static), over HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from core.auth import create_api_key
from core.db import session_scope
from core.models import BaseModelRecord, Team
from core.replicas import announce_replica
from core.schemas.replicas import ReplicaStatus
from core.serving_kinds import ENGINE_KINDS
from tests.support.live_server import live_server
from tests.support.registry_rows import add_version
from tests.support.services import free_port

BASE = "tiny-llama"
OTHER = "other-base"
FLEET = {"REPLICA_TTL_SECONDS": "60", "KEY_REQUESTS_PER_MINUTE": "0"}


class StandIn:
    """A replica stand-in: says what it is at `GET /status`, and answers each completion with its own name."""

    def __init__(self, name: str, base_model: str = BASE, engine: str = "patchbay", state: str = "ready") -> None:
        self.name, self.base_model, self.engine, self.state = name, base_model, engine, state
        self.url = ""
        self.received: list[dict] = []
        self.busy = False

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(url=self.url, base_model=self.base_model, engine=self.engine, state=self.state,
                             kinds=list(ENGINE_KINDS[self.engine]), max_resident_adapters=2, max_batch=4,
                             stats={"requests": len(self.received)})

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/status")
        async def status() -> dict:
            return self.status().model_dump()

        @app.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request) -> dict | JSONResponse:
            header = request.headers.get("x-patchbay-adapter")
            self.received.append({"path": "chat", "adapter": json.loads(header) if header else None})
            if self.busy:
                return JSONResponse({"error": {"message": f"{self.name} is busy", "type": "api_error", "param": None,
                                               "code": "adapter_slots_busy"}}, status_code=503,
                                    headers={"Retry-After": "1"})
            return {"object": "chat.completion", "choices": [{"index": 0, "message": {"content": self.name}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

        @app.post("/internal/adapters/{action}")
        async def adapters(action: str, request: Request) -> dict:
            self.received.append({"path": action, "body": await request.json()})
            return {"state": action + "ed"}

        return app

    def register(self) -> None:
        """Announce (or renew) this stand-in's row in the API's database, as a replica's heartbeat does."""
        with session_scope() as session:
            announce_replica(session, self.name, self.status())


@contextmanager
def serving(*stand_ins: StandIn) -> Iterator[None]:
    """Serve every stand-in on a port of its own while the block runs."""
    with ExitStack() as stack:
        for stand_in in stand_ins:
            stand_in.url = stack.enter_context(live_server(stand_in.app()))
        yield


def dead_replica(name: str, base_model: str = BASE) -> None:
    """Register a replica whose port nobody listens on."""
    with session_scope() as session:
        announce_replica(session, name, ReplicaStatus(
            url=f"http://127.0.0.1:{free_port()}", base_model=base_model, engine="patchbay", state="ready",
            kinds=list(ENGINE_KINDS["patchbay"]), max_resident_adapters=2, max_batch=4))


def add_base(model_id: str) -> None:
    with session_scope() as session:
        session.add(BaseModelRecord(id=model_id, path="/nonexistent"))


def acme_id() -> str:
    with session_scope() as session:
        return session.query(Team).filter_by(name="acme").one().id


def admin_key() -> str:
    with session_scope() as session:
        return create_api_key(session, session.query(Team).filter_by(name="acme").one(), is_admin=True)


def chat(api, model: str, key: str | None = None):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return api.client.post("/v1/chat/completions", headers=api.headers(key), json=body)


def answered_by(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def test_requests_reach_only_their_bases_replicas_passing_over_a_dead_one(api_with):
    mine, other = StandIn("mine"), StandIn("other", base_model=OTHER)
    with serving(mine, other):
        api = api_with(**FLEET)
        add_base(OTHER)
        mine.register(), other.register()
        dead_replica("dead")
        add_version(acme_id(), "support", base_model=BASE)
        assert [answered_by(chat(api, BASE)) for _ in range(4)] == ["mine"] * 4
        assert answered_by(chat(api, "support")) == "mine"
        assert answered_by(chat(api, OTHER)) == "other"
    assert [r["adapter"] for r in other.received] == [None]
    adapter = mine.received[-1]["adapter"]
    assert adapter["base_model"] == BASE and adapter["kinds"] == ["lora"]


def test_a_busy_replica_passes_the_request_on_and_the_last_ones_answer_is_the_clients(api_with):
    busy, free = StandIn("busy"), StandIn("free")
    busy.busy = True
    with serving(busy, free):
        api = api_with(**FLEET)
        busy.register(), free.register()
        assert {answered_by(chat(api, BASE)) for _ in range(4)} == {"free"}
        assert busy.received  # it was asked, and said it was busy
        free.busy = True
        answer = chat(api, BASE)
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "adapter_slots_busy"
        assert answer.headers["Retry-After"] == "1"


def test_no_replica_of_the_base_is_a_503_saying_how_to_start_one(api_with):
    api = api_with(**FLEET)
    refused = chat(api, BASE)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "no_replica" and f"patchbay inference --base-model {BASE}" in error["message"]


def test_a_request_is_held_for_a_loading_replica_and_answered_once_it_is_ready(api_with):
    starting = StandIn("starting", state="loading")
    with serving(starting):
        api = api_with(**FLEET, REPLICA_WAIT_SECONDS="30")
        starting.register()

        def ready() -> None:
            starting.state = "ready"
            starting.register()

        timer = threading.Timer(1.0, ready)
        timer.start()
        try:
            assert answered_by(chat(api, BASE)) == "starting"
        finally:
            timer.cancel()
    assert starting.state == "ready"


def test_a_replica_that_stays_loading_is_a_503_after_the_wait(api_with):
    starting = StandIn("starting", state="loading")
    with serving(starting):
        api = api_with(**FLEET, REPLICA_WAIT_SECONDS="0.5")
        starting.register()
        refused = chat(api, BASE)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    assert refused.json()["error"]["code"] == "replica_loading" and not starting.received


def test_an_adapter_kind_no_replica_serves_is_a_400_naming_the_engine_that_does(api_with):
    vllm = StandIn("vllm", engine="vllm")
    with serving(vllm):
        api = api_with(**FLEET)
        vllm.register()
        add_version(acme_id(), "plain", base_model=BASE, method="lora")
        add_version(acme_id(), "fancy", base_model=BASE, method="dora")
        assert answered_by(chat(api, "plain")) == "vllm"
        refused = chat(api, "fancy")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("model", "adapter_kind_unserved")
    assert "'dora'" in error["message"] and "patchbay engine" in error["message"]


def test_static_replicas_are_asked_what_they_serve(api_with):
    mine, other = StandIn("static-mine"), StandIn("static-other", base_model=OTHER)
    dead = f"http://127.0.0.1:{free_port()}"
    with serving(mine, other):
        api = api_with(**FLEET, INFERENCE_URL=f"{other.url},{dead},{mine.url}")
        add_base(OTHER)
        assert {answered_by(chat(api, BASE)) for _ in range(3)} == {"static-mine"}
        assert answered_by(chat(api, OTHER)) == "static-other"


def test_replicas_are_listed_for_admins_registered_and_static_once_each(api_with):
    registered, static = StandIn("registered"), StandIn("static", base_model=OTHER)
    with serving(registered, static):
        dead = f"http://127.0.0.1:{free_port()}"
        api = api_with(**FLEET, INFERENCE_URL=f"{registered.url},{static.url},{dead}")
        registered.register()
        listed = api.client.get("/v1/replicas", headers=api.headers(admin_key()))
        refused = api.client.get("/v1/replicas", headers=api.headers())
    assert listed.status_code == 200, listed.text
    body = listed.json()
    assert body["object"] == "list"
    by_url = {r["url"]: r for r in body["data"]}
    assert sorted(by_url) == sorted([registered.url, static.url]) and len(body["data"]) == 2
    assert (by_url[registered.url]["source"], by_url[registered.url]["id"]) == ("registered", "registered")
    listed_static = by_url[static.url]
    assert listed_static["source"] == "static" and listed_static["base_model"] == OTHER
    assert listed_static["state"] == "ready" and "dora" in listed_static["kinds"]
    assert listed_static["heartbeat_at"] and listed_static["stats"] == {"requests": 0}
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"


def test_readyz_tells_how_each_base_model_is_served_without_changing_its_status(api_with):
    ready, starting = StandIn("ready"), StandIn("starting", base_model=OTHER, state="loading")
    with serving(ready, starting):
        api = api_with(**FLEET)
        add_base(OTHER)
        add_base("unserved")
        ready.register(), starting.register()
        answer = api.client.get("/readyz")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
    assert answer.json()["base_models"] == {BASE: "ok", OTHER: "loading", "unserved": "no replica"}


def test_runtime_adapter_loading_goes_to_the_replicas_of_the_adapters_base(api_with):
    mine, other = StandIn("mine"), StandIn("other", base_model=OTHER)
    with serving(mine, other):
        api = api_with(**FLEET)
        add_base(OTHER)
        mine.register(), other.register()
        version = add_version(acme_id(), "support", base_model=BASE)
        admin = api.headers(admin_key())
        loaded = api.client.post("/v1/load_lora_adapter", headers=admin, json={"lora_name": "support"})
        unloaded = api.client.post("/v1/unload_lora_adapter", headers=admin, json={"lora_name": "support"})
    assert loaded.status_code == 200, loaded.text
    assert [(r["replica_id"], r["status"]) for r in loaded.json()["replicas"]] == [("mine", 200)]
    assert [(r["replica_id"], r["status"]) for r in unloaded.json()["replicas"]] == [("mine", 200)]
    assert [r["path"] for r in mine.received] == ["load", "unload"] and not other.received
    assert mine.received[0]["body"]["adapter"]["id"] == version.id and mine.received[0]["body"]["pinned"] is True


def test_an_adapter_keeps_to_one_replica_while_base_requests_spread(api_with):
    first, second = StandIn("first"), StandIn("second")
    with serving(first, second):
        api = api_with(**FLEET)
        first.register(), second.register()
        add_version(acme_id(), "support", base_model=BASE)
        adapter_replicas = {answered_by(chat(api, "support")) for _ in range(4)}
        base_replicas = {answered_by(chat(api, BASE)) for _ in range(4)}
    assert len(adapter_replicas) == 1 and base_replicas == {"first", "second"}
