"""The inference server on a real socket, behind the in-process API: typed admin bodies, adapter errors
answered at the edge, and completions streamed as the same text they answer whole."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from core.auth import create_api_key
from core.db import session_scope
from core.models import Adapter, Team
from core.schemas.inference import AdapterRef
from core.settings import get_settings
from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.api_app import _serve
from tests.support.live_server import live_server

QUESTION = [{"role": "user", "content": "What colour is item 7?"}]


@dataclass
class Served:
    """The API harness, an admin key, the inference server's client, and the imported adapters' refs."""

    api: object
    admin_key: str
    server: httpx.Client
    refs: dict[str, AdapterRef]

    def header(self, ref: AdapterRef) -> dict[str, str]:
        return {"X-Patchbay-Adapter": ref.model_dump_json()}


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory) -> Iterator[Served]:
    """Two imported adapters, and an inference server (two slots: one pinned adapter at most) the API forwards to."""
    tmp = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as monkeypatch:
        harness = _serve(tmp, monkeypatch, tiny_model_dir, None)
        try:
            yield from _serving(next(harness), monkeypatch, tiny_model_dir, tmp)
        finally:
            harness.close()


def _serving(api, monkeypatch, model_dir, tmp) -> Iterator[Served]:
    refs = {}
    for seed, name in enumerate(("one", "two"), start=1):
        folder = save_peft_lora(model_dir, tmp / name, seed=seed, scale=30.0)
        imported = api.client.post("/v1/adapters/import", headers=api.headers(), data={"name": name,
                                   "base_model": "tiny-llama"}, files={"file": ("a.tar.gz", tar_gz(folder))})
        assert imported.status_code == 200, imported.text
        with session_scope() as session:
            refs[name] = AdapterRef.of(session.get(Adapter, imported.json()["id"]))
    with session_scope() as session:
        admin_key = create_api_key(session, session.query(Team).filter_by(name="acme").one(), is_admin=True)
    monkeypatch.setenv("PATCHBAY_INFERENCE_BASE_MODEL", "tiny-llama")
    monkeypatch.setenv("PATCHBAY_MAX_LOADED_ADAPTERS", "2")
    get_settings.cache_clear()
    from worker.inference.server import create_inference_app

    with live_server(create_inference_app(), lifespan=True, startup_seconds=180, ready_path="/readyz") as url:
        monkeypatch.setenv("PATCHBAY_INFERENCE_URL", url)
        get_settings.cache_clear()
        with httpx.Client(base_url=url, timeout=60) as server:
            yield Served(api, admin_key, server, refs)


def test_admin_routes_take_typed_bodies_and_answer_adapter_errors_at_the_edge(served):
    api, admin = served.api, served.api.headers(served.admin_key)
    assert served.server.get("/healthz").json() == {"status": "ok"}
    loaded = api.client.post("/v1/load_lora_adapter", headers=admin, json={"lora_name": "one"}).json()
    assert loaded["adapter_id"] == served.refs["one"].id
    assert [(r["status"], r["body"]["adapter_id"]) for r in loaded["replicas"]] == [(200, served.refs["one"].id)]
    status = served.server.get("/internal/status").json()
    assert status["base_model"] == "tiny-llama" and served.refs["one"].id in status["adapters"]

    refused = api.client.post("/v1/load_lora_adapter", headers=admin, json={"lora_name": "two"}).json()["replicas"][0]
    assert refused["status"] == 409
    assert (refused["body"]["error"]["code"], refused["body"]["error"]["param"]) == ("pin_limit", "lora_name")

    untyped = served.server.post("/internal/adapters/load", json={"pinned": True})
    assert untyped.status_code == 400 and untyped.json()["error"]["param"] == "adapter"
    tampered = _missing(served.refs["two"])
    failed = served.server.post("/internal/adapters/load", json={"adapter": tampered.model_dump()})
    assert failed.status_code == 400
    error = failed.json()["error"]
    assert (error["code"], error["param"]) == ("adapter_load_failed", "lora_path")
    assert error["message"].startswith(f"adapter {tampered.id} could not be loaded: ")

    unloaded = api.client.post("/v1/unload_lora_adapter", headers=admin, json={"lora_name": "one"}).json()
    assert unloaded["replicas"][0]["body"] == {"adapter_id": served.refs["one"].id, "state": "unloaded"}


def _missing(ref: AdapterRef) -> AdapterRef:
    """A reference to an adapter version that storage does not hold."""
    return ref.model_copy(update={"id": "adp-missing", "storage_key": "adapters/adp-missing"})


def _chat(served: Served, stream: bool, **headers: str) -> httpx.Response:
    body = {"model": "two", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    return served.server.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None},
                              headers=headers)


def test_a_stream_carries_the_text_it_answers_whole_and_refusals_come_first(served):
    header = served.header(served.refs["two"])
    whole = _chat(served, False, **header)
    assert whole.status_code == 200, whole.text
    answer = whole.json()
    streamed = _chat(served, True, **header)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    frames = [line for line in streamed.text.split("\n\n") if line]
    assert frames[-1] == "data: [DONE]" and all(f.startswith("data: {") for f in frames[:-1])
    chunks = [json.loads(f[6:]) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == answer["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == answer["usage"]

    via_api = served.api.client.post("/v1/chat/completions", headers=served.api.headers(), json={
        "model": "two", "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": True})
    relayed = [json.loads(f[6:]) for f in via_api.text.split("\n\n") if f.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in relayed) == text

    missing = _chat(served, True, **served.header(_missing(served.refs["two"])))
    assert missing.status_code == 400
    assert (missing.json()["error"]["code"], missing.json()["error"]["param"]) == ("adapter_load_failed", "model")
    other_base = served.refs["two"].model_copy(update={"base_model": "another-base"})
    unavailable = _chat(served, True, **served.header(other_base))
    assert unavailable.status_code == 400
    error = unavailable.json()["error"]
    assert (error["code"], error["param"]) == ("adapter_unavailable", "model") and "another-base" in error["message"]
    unknown = _chat(served, True)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
