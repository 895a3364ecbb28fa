"""The inference server's /metrics on a real socket: Prometheus text that parses, request and token counters
per base and adapter that move, latency histograms, batch sizes, adapter loads and evictions, and state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from core.db import session_scope
from core.models import Adapter
from core.schemas.inference import AdapterRef
from core.settings import get_settings
from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.api_app import _serve
from tests.support.live_server import live_server

BASE = "tiny-llama"


@dataclass
class Replica:
    """The inference server's client and two imported adapters' refs."""

    server: httpx.Client
    refs: list[AdapterRef]


@pytest.fixture(scope="module")
def replica(tiny_model_dir, tmp_path_factory) -> Iterator[Replica]:
    """An inference server of the tiny model with one adapter slot, and two adapters in the registry."""
    tmp = tmp_path_factory.mktemp("metrics")
    with pytest.MonkeyPatch.context() as monkeypatch:
        harness = _serve(tmp, monkeypatch, tiny_model_dir, None)
        api = next(harness)
        try:
            refs = []
            for seed in (1, 2):
                folder = save_peft_lora(tiny_model_dir, tmp / f"a{seed}", seed=seed)
                imported = api.client.post("/v1/adapters/import", headers=api.headers(),
                                           data={"name": f"a{seed}", "base_model": BASE},
                                           files={"file": ("a.tar.gz", tar_gz(folder))})
                assert imported.status_code == 200, imported.text
                with session_scope() as session:
                    refs.append(AdapterRef.of(session.get(Adapter, imported.json()["id"])))
            monkeypatch.setenv("PATCHBAY_INFERENCE_BASE_MODEL", BASE)
            monkeypatch.setenv("PATCHBAY_MAX_LOADED_ADAPTERS", "1")
            get_settings.cache_clear()
            from worker.inference.server import create_inference_app

            with live_server(create_inference_app(), lifespan=True, startup_seconds=180, ready_path="/readyz") as url:
                with httpx.Client(base_url=url, timeout=60) as server:
                    yield Replica(server, refs)
        finally:
            harness.close()


def scrape(server: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of the server's /metrics by (name, sorted labels)."""
    response = server.get("/metrics")
    assert response.status_code == 200, response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(replica: Replica, ref: AdapterRef | None, *, stream: bool = False) -> int:
    """One greedy chat of 6 tokens; the completion tokens it generated."""
    headers = {"X-Patchbay-Adapter": ref.model_dump_json()} if ref is not None else {}
    body = {"model": ref.id if ref else BASE, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6, "temperature": 0, "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {})}
    answer = replica.server.post("/v1/chat/completions", json=body, headers=headers)
    assert answer.status_code == 200, answer.text
    if not stream:
        return answer.json()["usage"]["completion_tokens"]
    chunks = [json.loads(line.removeprefix("data: ")) for line in answer.text.splitlines()
              if line.startswith("data: {")]
    return next(c["usage"] for c in reversed(chunks) if c.get("usage"))["completion_tokens"]


def test_requests_and_tokens_move_per_base_and_adapter_with_their_latencies(replica):
    before = scrape(replica.server)
    base_tokens = chat(replica, None) + chat(replica, None, stream=True)
    adapter_tokens = chat(replica, replica.refs[0])
    after = scrape(replica.server)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    adapter = replica.refs[0].id
    assert moved("patchbay_inference_requests_total", base=BASE, adapter="base") == 2
    assert moved("patchbay_inference_requests_total", base=BASE, adapter=adapter) == 1
    assert moved("patchbay_inference_generated_tokens_total", base=BASE, adapter="base") == base_tokens > 0
    assert moved("patchbay_inference_generated_tokens_total", base=BASE, adapter=adapter) == adapter_tokens
    assert moved("patchbay_inference_time_to_first_token_seconds_count", base=BASE, adapter="base") == 2
    assert moved("patchbay_inference_inter_token_latency_seconds_count", base=BASE, adapter="base") == base_tokens - 2
    assert moved("patchbay_inference_batch_size_count", base=BASE) >= base_tokens + adapter_tokens - 3
    assert value(after, "patchbay_inference_ready", base=BASE, engine="patchbay") == 1
    assert value(after, "patchbay_inference_max_resident_adapters", base=BASE, engine="patchbay") == 1
    assert value(after, "patchbay_inference_queue_length", base=BASE, engine="patchbay") == 0
    # the second base chat repeats the first's prompt: its template's opening came from a stored prefix
    assert moved("patchbay_inference_prefix_cache_hit_tokens_total", base=BASE, engine="patchbay") >= 16


def test_adapter_loads_evictions_and_residency_are_counted(replica):
    chat(replica, replica.refs[0])  # resident, or loaded now
    before = scrape(replica.server)
    chat(replica, replica.refs[1])  # one slot: evicts the first
    chat(replica, replica.refs[0])  # and back
    after = scrape(replica.server)

    def moved(name: str) -> float:
        return value(after, name, base=BASE) - value(before, name, base=BASE)

    assert moved("patchbay_inference_adapter_loads_total") == 2
    assert moved("patchbay_inference_adapter_evictions_total") == 2
    assert moved("patchbay_inference_adapter_load_seconds_count") == 2
    assert value(after, "patchbay_inference_resident_adapters", base=BASE, engine="patchbay") == 1
