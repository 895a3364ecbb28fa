"""An inference replica's Prometheus metrics, served at `GET /metrics` on its own port (both engines).

Requests and generated tokens per base model and adapter, time to first token and inter-token latency,
decode batch sizes, adapter loads, evictions and load time are counted as they happen; the replica's
state (ready, resident adapters, queue length, sequences in flight) is read from its `/status` at scrape
time. The adapter label is the adapter version's id (bounded by the registry), `base` for the base model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from core.schemas.replicas import ReplicaStatus
from core.settings import get_settings

BASE_LABEL = "base"
"""The adapter label of requests for the base model itself."""
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 30)

REQUESTS = Counter("patchbay_inference_requests", "Generation requests received, by base model and adapter.",
                   ["base", "adapter"], registry=None)
GENERATED_TOKENS = Counter("patchbay_inference_generated_tokens", "Tokens generated, by base model and adapter.",
                           ["base", "adapter"], registry=None)
TIME_TO_FIRST_TOKEN = Histogram(
    "patchbay_inference_time_to_first_token_seconds",
    "From a generation's submission to the engine until its first token, by base model and adapter.",
    ["base", "adapter"], buckets=_LATENCY_BUCKETS, registry=None)
INTER_TOKEN_LATENCY = Histogram(
    "patchbay_inference_inter_token_latency_seconds",
    "Time between two consecutive tokens of one generation, by base model and adapter.",
    ["base", "adapter"], buckets=_LATENCY_BUCKETS, registry=None)
BATCH_SIZE = Histogram("patchbay_inference_batch_size", "Sequences in each decode step of the engine's batch.",
                       ["base"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=None)
ADAPTER_LOADS = Counter("patchbay_inference_adapter_loads", "Adapters loaded into a slot (or registered with "
                        "vLLM), reloads after an eviction included.", ["base"], registry=None)
ADAPTER_EVICTIONS = Counter("patchbay_inference_adapter_evictions", "Resident adapters evicted (least recently "
                            "used) to make room for another.", ["base"], registry=None)
ADAPTER_LOAD_SECONDS = Histogram(
    "patchbay_inference_adapter_load_seconds", "Time to make an adapter resident: fetch (or local cache) and load.",
    ["base"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=None)
SHARED = (REQUESTS, GENERATED_TOKENS, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, BATCH_SIZE, ADAPTER_LOADS,
          ADAPTER_EVICTIONS, ADAPTER_LOAD_SECONDS)


class SequenceMetrics:
    """One generation's series: its first token's latency, then the gaps between tokens, and the count."""

    def __init__(self, base: str, adapter: str) -> None:
        self._tokens = GENERATED_TOKENS.labels(base, adapter)
        self._first = TIME_TO_FIRST_TOKEN.labels(base, adapter)
        self._gap = INTER_TOKEN_LATENCY.labels(base, adapter)
        self._last = time.perf_counter()
        self._seen = False

    def token(self) -> None:
        """A token was generated now."""
        at = time.perf_counter()
        (self._gap if self._seen else self._first).observe(at - self._last)
        self._last, self._seen = at, True
        self._tokens.inc()


class ServingMetrics:
    """The metrics of one base model's engine; `adapter` is an engine's adapter name (None: the base)."""

    def __init__(self, base: str) -> None:
        self.base = base

    def request(self, adapter: str | None) -> None:
        """Count one generation request."""
        REQUESTS.labels(self.base, adapter or BASE_LABEL).inc()

    def sequence(self, adapter: str | None) -> SequenceMetrics:
        """The series of one generation, submitted now."""
        return SequenceMetrics(self.base, adapter or BASE_LABEL)

    def batch(self, size: int) -> None:
        """One decode step ran `size` sequences."""
        BATCH_SIZE.labels(self.base).observe(size)

    def adapter_loaded(self, seconds: float) -> None:
        """An adapter became resident after `seconds`."""
        ADAPTER_LOADS.labels(self.base).inc()
        ADAPTER_LOAD_SECONDS.labels(self.base).observe(seconds)

    def adapter_evicted(self) -> None:
        """A resident adapter was evicted."""
        ADAPTER_EVICTIONS.labels(self.base).inc()


class ReplicaStateCollector:
    """The replica's state at scrape time, from what its `/status` says."""

    def __init__(self, status: Callable[[], ReplicaStatus]) -> None:
        self._status = status

    def collect(self):
        status = self._status()
        labels = [status.base_model, status.engine]

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=["base", "engine"])
            family.add_metric(labels, value)
            return family

        yield gauge("patchbay_inference_ready", "1 once the base model is loaded and the replica serves.",
                    float(status.state == "ready"))
        yield gauge("patchbay_inference_resident_adapters", "Adapters resident now.", len(status.resident_adapters))
        yield gauge("patchbay_inference_max_resident_adapters", "Adapters this replica keeps resident at most.",
                    status.max_resident_adapters)
        yield gauge("patchbay_inference_in_flight", "Generations waiting or running now.", status.load)
        yield gauge("patchbay_inference_queue_length", "Generations waiting to join the batch (vLLM: its in-flight "
                    "requests, whose queue it keeps).", status.stats.get("waiting", status.load))
        if "prefix_cache_hit_tokens" in status.stats:  # our engine, with stored prefixes on
            family = CounterMetricFamily("patchbay_inference_prefix_cache_hit_tokens", "Prompt tokens whose keys and "
                                         "values came from a stored prefix instead of a prefill.",
                                         labels=["base", "engine"])
            family.add_metric(labels, status.stats["prefix_cache_hit_tokens"])
            yield family


def metrics_registry(status: Callable[[], ReplicaStatus]) -> CollectorRegistry:
    """A registry of the shared series plus this replica's state (one per app)."""
    registry = CollectorRegistry()
    for metric in SHARED:
        registry.register(metric)
    registry.register(ReplicaStateCollector(status))
    return registry


def install_metrics(app: FastAPI) -> None:
    """`GET /metrics` on the app (unless `PATCHBAY_METRICS_ENABLED=false`), over `app.state.replica`'s status."""
    if not get_settings().metrics_enabled:
        return
    registry = metrics_registry(lambda: app.state.replica.status())

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Every metric of this replica in Prometheus' text format."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
